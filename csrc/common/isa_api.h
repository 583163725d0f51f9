// What the translation units of one ISA build export to each other and to that ISA's kernel
// table (csrc/isa/table.cpp). Include only from ISA translation units.
#pragma once
#include "../gemm/gemm.h"
#include "geometry.h"
#include "simd.h"

namespace fastconv {
namespace FASTCONV_ISA {

template <typename T> ConvKernels<T> direct_kernels();
template <typename T> ConvKernels<T> im2col_kernels();
template <typename T> void gemm(const GemmArgs<T>& args, int nthreads);
template <typename T> GemmBlocking gemm_blocking();
// Pack all of A (or B) of `args` into `out` (gemm_packed_size elements), see GemmArgs.
template <typename T> int64_t gemm_packed_size_a(int64_t M, int64_t K);
template <typename T> int64_t gemm_packed_size_b(int64_t K, int64_t N);
template <typename T> void gemm_pack_a(const GemmArgs<T>& args, T* out, int nthreads);
template <typename T> void gemm_pack_b(const GemmArgs<T>& args, T* out, int nthreads);
// Per-channel sums of grad_y, shared by every algorithm.
template <typename T> void grad_bias(const ConvGeom&, const T* gy, int gy_layout, T* gb, int nthreads);

}  // namespace FASTCONV_ISA
}  // namespace fastconv
