// The kernel table: what each ISA build exports to the bindings. One entry per algorithm,
// listed once in table.cpp (FASTCONV_ALGORITHMS); each algorithm lives in its own folder
// csrc/<name>/ and defines  template <typename T> ConvKernels<T> <name>_kernels();  in
// namespace fastconv::<isa>. Any kernel pointer may be null (an algorithm without a
// float64 grad-weight, say): the bindings look kernels up through find_kernel and report a
// missing one as an error, never call it.
#pragma once
#include <cstdint>

#include "../common/epilogue.h"
#include "../common/problem.h"
#include "../common/workspace.h"
#include "../gemm/gemm.h"

namespace fastconv {

// What an algorithm's forward makes of the weights before it runs (a packed or transformed
// copy) for one geometry and pair of layouts: `elements` values of T, 0 if it makes none.
// Packings with different `variant`s (im2col: packed B for its NHWC GEMM, packed A for its
// native NCHW one) are different layouts of the same size class.
struct WeightPacking {
  int64_t elements = 0;
  int variant = 0;
};

// Kernels of one algorithm for one element type. Pointers are dense tensors in the layout
// named beside them (kNCHW or kNHWC); weights are always OIHW-contiguous.
//
// Weight prepacking (the inference weight cache, fastconv/weight_cache.py): forward packs its
// weights on every call unless handed `packed`, what pack_weights wrote for the same geometry
// (N aside) and layouts; then it reads only `packed`, never w. The bindings check that
// weight_packing agrees before passing it on.
template <typename T>
struct ConvKernels {
  // y = epi(conv(x, w)): epi.shift is the bias; epi.act and epi.stats fuse an activation
  // or batch-norm's statistics into the output's one pass (csrc/common/epilogue.h; never
  // both; epi.scale and epi.per_row unused).
  void (*forward)(const ConvGeom&, const T* x, int x_layout, const T* w, const T* packed,
                  const Epilogue<T>& epi, T* y, int y_layout, int nthreads) = nullptr;
  void (*grad_input)(const ConvGeom&, const T* gy, int gy_layout, const T* w, T* gx,
                     int gx_layout, int nthreads) = nullptr;
  void (*grad_weight)(const ConvGeom&, const T* gy, int gy_layout, const T* x, int x_layout,
                      T* gw, int nthreads) = nullptr;
  // Optional: grad_weight that also writes grad-bias (gb, K values: grad_y summed over n,
  // h, w) from its own sweep over grad_y. Null where a separate pass costs no more; the
  // bindings then run SharedKernels::grad_bias after grad_weight.
  void (*grad_weight_bias)(const ConvGeom&, const T* gy, int gy_layout, const T* x,
                           int x_layout, T* gw, T* gb, int nthreads) = nullptr;
  // Upper estimate of the workspace bytes one call of `pass` takes, NCHW tensors assumed
  // (other layouts may take other paths and other amounts); grad-weight's covers
  // grad_weight_bias's own sums, not the shared grad-bias pass run after it.
  int64_t (*workspace_bytes)(const ConvGeom&, Pass) = nullptr;
  WeightPacking (*weight_packing)(const ConvGeom&, int x_layout, int y_layout) = nullptr;
  void (*pack_weights)(const ConvGeom&, int x_layout, int y_layout, const T* w, T* packed,
                       int nthreads) = nullptr;

  // An algorithm with every pass (the signatures differ, so arguments cannot be swapped).
  static ConvKernels all(decltype(forward) f, decltype(grad_input) gi,
                         decltype(grad_weight) gw, decltype(workspace_bytes) ws) {
    ConvKernels k;
    k.forward = f;
    k.grad_input = gi;
    k.grad_weight = gw;
    k.workspace_bytes = ws;
    return k;
  }
  ConvKernels with_packing(decltype(weight_packing) wp, decltype(pack_weights) pw) const {
    ConvKernels k = *this;
    k.weight_packing = wp;
    k.pack_weights = pw;
    return k;
  }
  ConvKernels with_grad_weight_bias(decltype(grad_weight_bias) gwb) const {
    ConvKernels k = *this;
    k.grad_weight_bias = gwb;
    return k;
  }
};

// What a forward convolves with: `packed` when the caller has its packed weights (the
// weight cache), else w packed now by `pack` into the workspace slot `slot`.
template <typename T>
const T* packed_or_pack_now(const T* packed, const ConvGeom& g, int x_layout, int y_layout,
                            const T* w, WorkspaceSlot slot,
                            WeightPacking (*size)(const ConvGeom&, int, int),
                            void (*pack)(const ConvGeom&, int, int, const T*, T*, int),
                            int nthreads) {
  if (packed) return packed;
  T* buf = workspace_as<T>(slot, size(g, x_layout, y_layout).elements);
  pack(g, x_layout, y_layout, w, buf, nthreads);
  return buf;
}

struct AlgorithmEntry {
  const char* name;
  ConvKernels<float> f32;
  ConvKernels<double> f64;
};

template <typename T>
struct SharedKernels {
  void (*gemm)(const GemmArgs<T>&, int nthreads) = nullptr;
  GemmBlocking gemm_blocking{};
  // Per-channel sums of grad_y (grad-bias), the same for every algorithm.
  void (*grad_bias)(const ConvGeom&, const T* gy, int gy_layout, T* gb, int nthreads) = nullptr;
  // Batch-norm with batch statistics + activation around a convolution's output, forward and
  // backward (csrc/batchnorm; the fused Conv-BN-activation op).
  void (*bn_act_forward)(const ConvGeom&, int layout, const T* z, const T* mean,
                         const T* invstd, const T* gamma, const T* beta, int act, T* y,
                         int nthreads) = nullptr;
  void (*bn_act_backward)(const ConvGeom&, int layout, const T* gy, const T* y, const T* z,
                          const T* mean, const T* invstd, const T* gamma, int act, T* gz,
                          T* grad_gamma, T* grad_beta, int nthreads) = nullptr;
  // Winograd F(m, 3)'s vectorised transforms applied to `count` tiles, for tests
  // (csrc/winograd: which = 0 input, 1 filter, 2 output).
  void (*winograd_transform)(int m, int which, const T* in, T* out, int64_t count) = nullptr;
};

struct IsaKernels {
  const char* isa;
  const AlgorithmEntry* algorithms;
  int num_algorithms;
  SharedKernels<float> f32;
  SharedKernels<double> f64;
};

// One table per ISA build: scalar always, the x86 ones where setup.py built them
// (FASTCONV_X86_ISAS).
namespace scalar { const IsaKernels& kernels(); }
#if defined(FASTCONV_X86_ISAS)
namespace avx2 { const IsaKernels& kernels(); }
namespace avx512 { const IsaKernels& kernels(); }
#endif

}  // namespace fastconv
