// Shapes shared by every kernel and the bindings. Plain data, no ISA-specific code.
#pragma once
#include <cstdint>

#include "../gemm/gemm.h"

namespace fastconv {

enum Layout : int { kNCHW = 0, kNHWC = 1 };

// One 2-D convolution problem. Input N x C x H x W, weight K x (C/groups) x R x S (OIHW,
// contiguous), output N x K x OH x OW. Padding is explicit per side so that 'same' with
// even kernels (asymmetric padding) needs no special case.
struct ConvGeom {
  int64_t N, C, H, W;
  int64_t K, R, S;
  int64_t OH, OW;
  int64_t sh, sw;          // stride
  int64_t dh, dw;          // dilation
  int64_t pt, pb, pl, pr;  // zero padding: top, bottom, left, right
  int64_t groups;

  int64_t Cg() const { return C / groups; }
  int64_t Kg() const { return K / groups; }
  int64_t flops() const { return 2 * N * K * Cg() * R * S * OH * OW; }
};

// Kernels for one ISA and one element type. Every pointer is a dense tensor in the layout
// named beside it; weights are always OIHW-contiguous.
template <typename T>
struct ConvKernels {
  void (*forward)(const ConvGeom&, const T* x, int x_layout, const T* w, const T* bias, T* y,
                  int y_layout, int nthreads);
  void (*grad_input)(const ConvGeom&, const T* gy, int gy_layout, const T* w, T* gx,
                     int gx_layout, int nthreads);
  void (*grad_weight)(const ConvGeom&, const T* gy, int gy_layout, const T* x, int x_layout,
                      T* gw, int nthreads);
  void (*grad_bias)(const ConvGeom&, const T* gy, int gy_layout, T* gb, int nthreads);
};

// Algorithm codes shared with Python (fastconv/ops.py).
enum Algorithm : int { kDirect = 0, kIm2col = 1, kAlgorithms = 2 };

// The GEMM's register tile (MR x NR) and cache blocks, reported to tests and benchmarks.
struct GemmBlocking {
  int64_t mr, nr, kc, mc, nc;
};

struct IsaKernels {
  const char* name;
  ConvKernels<float> f32[kAlgorithms];
  ConvKernels<double> f64[kAlgorithms];
  void (*gemm_f32)(const GemmArgs<float>&, int nthreads);
  void (*gemm_f64)(const GemmArgs<double>&, int nthreads);
  GemmBlocking gemm_blocking_f32, gemm_blocking_f64;
};

// One table per ISA, each defined in a translation unit compiled with that ISA's flags.
namespace scalar { const IsaKernels& kernels(); }
namespace avx2 { const IsaKernels& kernels(); }
namespace avx512 { const IsaKernels& kernels(); }


// Per-calling-thread scratch memory that grows and is kept, so steady-state calls neither
// allocate nor page-fault (a fresh 4 KiB page costs ~1 us here). `slot` names independent
// buffers that are live at the same time. Never called from inside a parallel region.
void* workspace(int slot, int64_t bytes);
void release_workspaces();
enum WorkspaceSlot : int {
  kWsInput, kWsWeight, kWsGrad, kWsAccum, kWsGemmA, kWsGemmB, kWsPacked, kWsSlots
};

}  // namespace fastconv
