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
// Per-channel sums of grad_y, shared by every algorithm.
template <typename T> void grad_bias(const ConvGeom&, const T* gy, int gy_layout, T* gb, int nthreads);

}  // namespace FASTCONV_ISA
}  // namespace fastconv
