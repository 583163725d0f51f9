// The convolution problem every kernel and the bindings share. Plain data: no kernels, no
// ISA-specific code, and no dependency on any algorithm.
#pragma once
#include <cstdint>

namespace fastconv {

enum Layout : int { kNCHW = 0, kNHWC = 1 };

// One 2-D convolution problem. Input N x C x H x W, weight K x (C/groups) x R x S (OIHW,
// contiguous), output N x K x OH x OW. Padding is explicit per side so that 'same' with
// even kernels (asymmetric padding) needs no special case. Kernels may also build derived
// problems (grad-input runs a forward over grad_y), where pt and pl can be negative: rows and
// columns cropped rather than padded.
struct ConvGeom {
  int64_t N = 0, C = 0, H = 0, W = 0;
  int64_t K = 0, R = 0, S = 0;
  int64_t OH = 0, OW = 0;
  int64_t sh = 1, sw = 1;                  // stride
  int64_t dh = 1, dw = 1;                  // dilation
  int64_t pt = 0, pb = 0, pl = 0, pr = 0;  // zero padding: top, bottom, left, right
  int64_t groups = 1;

  int64_t Cg() const { return C / groups; }
  int64_t Kg() const { return K / groups; }
  int64_t flops() const { return 2 * N * K * Cg() * R * S * OH * OW; }
  bool padded() const { return pt || pb || pl || pr; }
};

// The grad-input of a stride-1 convolution is a forward convolution over grad_y: each group's
// filters transposed (Kg x Cg -> Cg x Kg) and rotated by 180 degrees, padded by d(R-1) - p
// per side (the full correlation, cut back by the forward's padding). These are its
// geometry and when it applies (padding within the kernel's extent).
inline bool grad_input_runs_as_forward(const ConvGeom& g) {
  const int64_t eh = g.dh * (g.R - 1), ew = g.dw * (g.S - 1);
  return g.sh == 1 && g.sw == 1 && g.pt <= eh && g.pb <= eh && g.pl <= ew && g.pr <= ew;
}
inline ConvGeom grad_input_forward_geometry(const ConvGeom& g) {
  const int64_t eh = g.dh * (g.R - 1), ew = g.dw * (g.S - 1);
  ConvGeom d = g;
  d.C = g.K, d.K = g.C;
  d.H = g.OH, d.W = g.OW, d.OH = g.H, d.OW = g.W;
  d.pt = eh - g.pt, d.pb = eh - g.pb, d.pl = ew - g.pl, d.pr = ew - g.pr;
  return d;
}

// The three passes of a convolution; each algorithm provides a kernel for some of them.
enum class Pass : int { kForward = 0, kGradInput = 1, kGradWeight = 2 };

}  // namespace fastconv
