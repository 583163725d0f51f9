// The convolution problem every kernel and the bindings share. Plain data: no kernels, no
// ISA-specific code, and no dependency on any algorithm.
#pragma once
#include <cstdint>
#include <numeric>

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

// Grad-input is a transposed convolution. Split by stride phase, it is a few ordinary ones:
// along an axis with stride s, dilation d and padding p, grad_x positions a, a + s, ..
// receive grad_y only through the taps r with r d = a + p (mod s), tap r from grad_y
// position i + (a + p - r d) / s. So each phase (a, b) is a stride-1 forward over
// grad_y with those taps (rotated, dilation d / gcd(s, d), cropping or padding grad_y), each
// group's filters transposed (Kg <-> Cg). Every tap is used once: no multiplications by
// inserted zeros. A stride-1 layer is the one phase (0, 0), with every tap rotated by 180
// degrees and padding d(R-1) - p per side.
struct PhaseAxis {
  int64_t size = 0;      // grad_x positions in the phase
  int64_t taps = 0;      // taps reaching them (0: the phase's gradient is zero)
  int64_t last = 0;      // the largest such tap; rotated tap j is last - j * tap_step
  int64_t tap_step = 1;  // between the phase's taps in the filter
  int64_t dilation = 1;  // between their reads of grad_y
  int64_t pad = 0;       // grad_y positions before the first tap's first read (< 0: skipped)
};

inline PhaseAxis phase_axis(int64_t a, int64_t stride, int64_t dilation, int64_t pad,
                            int64_t taps, int64_t in_size) {
  PhaseAxis p;
  p.size = a < in_size ? (in_size - a + stride - 1) / stride : 0;
  const int64_t gcd = std::gcd(stride, dilation);
  p.tap_step = stride / gcd;
  p.dilation = dilation / gcd;
  for (int64_t r = taps - 1; r >= 0; --r)
    if (((a + pad - r * dilation) % stride + stride) % stride == 0) {
      p.last = r;
      p.taps = r / p.tap_step + 1;
      p.pad = -((a + pad - r * dilation) / stride);  // exact
      break;
    }
  return p;
}

// The stride-1 forward problem of phase (ph, pw) of g's grad-input.
inline ConvGeom phase_geometry(const ConvGeom& g, const PhaseAxis& ph, const PhaseAxis& pw) {
  ConvGeom d = g;
  d.C = g.K, d.K = g.C;
  d.H = g.OH, d.W = g.OW, d.OH = ph.size, d.OW = pw.size;
  d.R = ph.taps, d.S = pw.taps;
  d.sh = d.sw = 1;
  d.dh = ph.dilation, d.dw = pw.dilation;
  d.pt = ph.pad, d.pl = pw.pad;
  d.pb = d.OH - 1 + d.dh * (d.R - 1) + 1 - d.H - d.pt;
  d.pr = d.OW - 1 + d.dw * (d.S - 1) + 1 - d.W - d.pl;
  return d;
}

// The three passes of a convolution; each algorithm provides a kernel for some of them.
enum class Pass : int { kForward = 0, kGradInput = 1, kGradWeight = 2 };

}  // namespace fastconv
