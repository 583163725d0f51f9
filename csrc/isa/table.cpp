// The kernel table of one ISA build (compiled once per ISA, like every kernel source).
#include "../common/simd.h"
#include "kernel_table.h"

// Every algorithm, once. The name is the one Python's registry (fastconv/registry.py)
// declares it under, and the prefix of the function template <name>_kernels<T>() that its
// folder defines (csrc/<name>/, or csrc/winograd/ for the three Winograd tile sizes).
#define FASTCONV_ALGORITHMS(X) \
  X(direct)                    \
  X(im2col)                    \
  X(winograd_f2)               \
  X(winograd_f4)               \
  X(winograd_f6)               \
  X(depthwise)                 \
  X(grouped)

namespace fastconv {
namespace FASTCONV_ISA {

#define FASTCONV_DECLARE(name) template <typename T> ConvKernels<T> name##_kernels();
FASTCONV_ALGORITHMS(FASTCONV_DECLARE)
#undef FASTCONV_DECLARE

template <typename T>
void grad_bias(const ConvGeom&, const T* gy, int gy_layout, T* gb, int nthreads);

template <typename T>
void winograd_transform(int m, int which, const T* in, T* out, int64_t count);

template <typename T>
void bn_act_forward(const ConvGeom&, int, const T*, const T*, const T*, const T*, const T*, int,
                    T*, int);
template <typename T>
void bn_act_backward(const ConvGeom&, int, const T*, const T*, const T*, const T*, const T*,
                     const T*, int, T*, T*, T*, int);

template <typename T>
SharedKernels<T> shared_kernels() {
  SharedKernels<T> k;
  k.gemm = &gemm<T>;
  k.gemm_blocking = gemm_blocking<T>();
  k.grad_bias = &grad_bias<T>;
  k.winograd_transform = &winograd_transform<T>;
  k.bn_act_forward = &bn_act_forward<T>;
  k.bn_act_backward = &bn_act_backward<T>;
  return k;
}

const IsaKernels& kernels() {
#define FASTCONV_ENTRY(name) AlgorithmEntry{#name, name##_kernels<float>(), name##_kernels<double>()},
  static const AlgorithmEntry algorithms[] = {FASTCONV_ALGORITHMS(FASTCONV_ENTRY)};
#undef FASTCONV_ENTRY
  static const IsaKernels table{FASTCONV_STR(FASTCONV_ISA), algorithms,
                                int(sizeof(algorithms) / sizeof(algorithms[0])),
                                shared_kernels<float>(), shared_kernels<double>()};
  return table;
}

}  // namespace FASTCONV_ISA
}  // namespace fastconv
