// Layout transforms between NCHW and NHWC, per ISA (include from ISA translation units).
#pragma once
#include <cstring>

#include "problem.h"
#include "simd.h"
#include "transpose.h"
#include "tuning.h"
#include "workspace.h"

namespace fastconv {
namespace FASTCONV_ISA {

// Images of `image_bytes` each that one layout conversion handles at a time, under the
// layout budget (tuning.h), so the extra memory of a call does not grow with the batch.
inline int64_t images_per_group(int64_t image_bytes) {
  return max64(1, tuning().layout_budget_bytes / max64(1, image_bytes));
}

// dst(n, top + h*step_h, left + w*step_w, c) = src(n, c, h, w) for every source element that
// lands inside dst's Hd x Wd; every other element of dst is zero. dst is NHWC (channels C).
// step > 1 inserts zeros between pixels (grad-input of a strided convolution).
template <typename T>
inline void scatter_to_nhwc(const T* src, int layout, int64_t N, int64_t C, int64_t H, int64_t W, T* dst,
                     int64_t Hd, int64_t Wd, int64_t top, int64_t left, int64_t step_h,
                     int64_t step_w, int nthreads) {
  // Source columns w whose destination column lies in [0, Wd).
  int64_t w_lo = 0;
  while (w_lo < W && left + w_lo * step_w < 0) ++w_lo;
  int64_t w_hi = W;
  while (w_hi > w_lo && left + (w_hi - 1) * step_w >= Wd) --w_hi;
  const int64_t HW = H * W;
  const int64_t rows = N * Hd;
  parallel_for(rows, threads_for(rows * Wd * C * 4, nthreads), [&](int64_t row) {
    const int64_t n = row / Hd, hd = row % Hd;
    T* d = dst + row * Wd * C;
    const int64_t hh = hd - top;
    const bool has_src = hh >= 0 && hh % step_h == 0 && hh / step_h < H && w_lo < w_hi;
    if (!has_src) {
      std::memset(d, 0, sizeof(T) * Wd * C);
      return;
    }
    const int64_t h = hh / step_h;
    if (step_w == 1) {  // zero only the margins
      std::memset(d, 0, sizeof(T) * (left + w_lo) * C);
      const int64_t end = left + w_hi;
      std::memset(d + end * C, 0, sizeof(T) * (Wd - end) * C);
    } else {
      std::memset(d, 0, sizeof(T) * Wd * C);
    }
    if (layout == kNHWC) {
      const T* s = src + ((n * H + h) * W) * C;
      if (step_w == 1) {
        std::memcpy(d + (left + w_lo) * C, s + w_lo * C, sizeof(T) * (w_hi - w_lo) * C);
      } else {
        for (int64_t w = w_lo; w < w_hi; ++w)
          std::memcpy(d + (left + w * step_w) * C, s + w * C, sizeof(T) * C);
      }
    } else if (step_w == 1) {
      // NCHW -> NHWC in 16 x 16 (channel x pixel) blocks.
      const T* s = src + n * C * HW + h * W;
      for (int64_t w0 = w_lo; w0 < w_hi; w0 += kTransposeBlock)
        for (int64_t c0 = 0; c0 < C; c0 += kTransposeBlock)
          transpose_block(s + c0 * HW + w0, HW, d + (left + w0) * C + c0, C,
                          int(min64(kTransposeBlock, C - c0)), int(min64(kTransposeBlock, w_hi - w0)));
    } else {
      const T* s = src + n * C * HW + h * W;
      for (int64_t w0 = w_lo; w0 < w_hi; w0 += 16) {
        const int64_t w1 = min64(w0 + 16, w_hi);
        for (int64_t c = 0; c < C; ++c) {
          const T* sc = s + c * HW;
          for (int64_t w = w0; w < w1; ++w) d[(left + w * step_w) * C + c] = sc[w];
        }
      }
    }
  });
}

// dst (NCHW, N x C x HW) = src (NHWC, N x HW x C), in 16 x 16 blocks.
// body(part, x_nhwc, n0) for each group of images of the NCHW input x of problem g, the group
// first transposed to NHWC into the activation workspace (groups sized by the layout budget):
// `part` is g with N = the group's images, n0 its first image.
template <typename T, typename F>
inline void over_nhwc_image_groups(const ConvGeom& g, const T* x, int nthreads, F body) {
  const int64_t image = g.C * g.H * g.W;
  const int64_t group = images_per_group(image * int64_t(sizeof(T)));
  T* buf = workspace_as<T>(kWsActivationNhwc, min64(group, g.N) * image);
  ConvGeom part = g;
  for (int64_t n0 = 0; n0 < g.N; n0 += group) {
    part.N = min64(g.N, n0 + group) - n0;
    scatter_to_nhwc(x + n0 * image, kNCHW, part.N, g.C, g.H, g.W, buf, g.H, g.W, 0, 0, 1, 1,
                    nthreads);
    body(part, static_cast<const T*>(buf), n0);
  }
}

template <typename T>
inline void nhwc_to_nchw(const T* src, int64_t N, int64_t C, int64_t HW, T* dst, int nthreads) {
  const int64_t blocks = ceil_div(HW, kTransposeBlock);
  parallel_for(N * blocks, threads_for(N * HW * C * 4, nthreads), [&](int64_t i) {
    const int64_t n = i / blocks, p0 = (i % blocks) * kTransposeBlock;
    const int64_t np = min64(kTransposeBlock, HW - p0);
    const T* s = src + (n * HW + p0) * C;
    T* d = dst + n * C * HW + p0;
    for (int64_t c0 = 0; c0 < C; c0 += kTransposeBlock)
      transpose_block(s + c0, C, d + c0 * HW, HW, int(np), int(min64(kTransposeBlock, C - c0)));
  });
}

// Per output channel k, transposes the Cg x RS matrix of its weights: dst[k][t][c] =
// src[k][c][t] (to_tap_major) or back, in 16 x 16 blocks.
template <typename T>
inline void permute_taps(const T* src, int64_t K, int64_t Cg, int64_t RS, T* dst,
                         bool to_tap_major, int nthreads) {
  const int64_t rows = to_tap_major ? Cg : RS, cols = to_tap_major ? RS : Cg;
  const int64_t B = kTransposeBlock;
  parallel_for(K, threads_for(K * Cg * RS * 4, nthreads), [&](int64_t k) {
    const T* s = src + k * Cg * RS;
    T* d = dst + k * Cg * RS;
    for (int64_t r0 = 0; r0 < rows; r0 += B)
      for (int64_t c0 = 0; c0 < cols; c0 += B)
        transpose_block(s + r0 * cols + c0, cols, d + c0 * rows + r0, rows,
                        int(min64(B, rows - r0)), int(min64(B, cols - c0)));
  });
}

}  // namespace FASTCONV_ISA
}  // namespace fastconv
