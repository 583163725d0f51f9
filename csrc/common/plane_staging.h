// Input planes staged for kernels that run vectors along the output width (NCHW depthwise and
// grouped convolutions), per ISA (include from ISA translation units): zero-bordered rows
// split into stride phases, so every tap of a row of outputs is one unaligned vector load.
#pragma once
#include "problem.h"
#include "simd.h"

namespace fastconv {
namespace FASTCONV_ISA {

// How an input plane is staged for the NCHW kernels: `rows` zero-padded rows (the ones the
// output rows' taps read), each split into `stride` phases of `span` values: phase q of
// padded row p at plane + (p * sw + q) * span, element i = input column i * sw + q - pl of
// input row p - pt.
struct PlaneStaging {
  int64_t span, row_elems, rows;
  // `tile`: the output values a row's vector loop computes at a time (it reads a whole
  // tile past OW, so rows are padded to whole tiles).
  PlaneStaging(const ConvGeom& g, int64_t tile)
      : span(round_up(g.OW, tile) + ((g.S - 1) * g.dw) / g.sw + 1),
        row_elems(span * g.sw),
        rows((g.OH - 1) * g.sh + (g.R - 1) * g.dh + 1) {}
  int64_t scratch() const { return (rows + 1) * row_elems; }
  // Where tap (r, s) of an output row reads its input for output column 0, from where tap
  // (0, 0) does.
  int64_t tap_offset(const ConvGeom& g, int64_t r, int64_t s) const {
    const int64_t o = s * g.dw;
    return (r * g.dh * g.sw + o % g.sw) * span + o / g.sw;
  }
  // Where tap (r, s) of output row oh reads its inputs for output column 0.
  template <typename T>
  const T* tap(const ConvGeom& g, const T* plane, int64_t oh, int64_t r, int64_t s) const {
    return plane + oh * g.sh * g.sw * span + tap_offset(g, r, s);
  }
};

// Stages input plane xp (H x W) into plane (PlaneStaging layout); `scratch` holds
// PlaneStaging::scratch() values, the plane first.
template <typename T>
void stage_plane(const ConvGeom& g, const PlaneStaging& st, const T* xp, T* scratch) {
  T* plane = scratch;                           // [padded row][phase][span]
  T* padded = scratch + st.rows * st.row_elems;  // one row in padded column order
  // Input columns [c0, c1) of a padded row hold x; the rest are zeros.
  const int64_t c0 = min64(g.pl, st.row_elems), c1 = min64(g.pl + g.W, st.row_elems);
  for (int64_t pr = 0; pr < st.rows; ++pr) {
    const int64_t ih = pr - g.pt;
    T* dst = g.sw == 1 ? plane + pr * st.row_elems : padded;
    if (ih < 0 || ih >= g.H) {
      zero_n(plane + pr * st.row_elems, st.row_elems);
      continue;
    }
    zero_n(dst, c0);
    copy_n(dst + c0, xp + ih * g.W + (c0 - g.pl), c1 - c0);
    zero_n(dst + c1, st.row_elems - c1);
    for (int64_t q = 0; g.sw > 1 && q < g.sw; ++q)
      copy_strided_n(plane + (pr * g.sw + q) * st.span, padded + q, st.span, g.sw);
  }
}

// Small maps, flat: a plane's rows are too short to fill vectors, so the whole plane is
// computed as one flat run of OH x P values (P = OW plus the taps' reach, the extra columns
// computed and dropped). The input is staged as sh x sw stride-phase sub-planes of pitch P,
// sub-plane (a, b) holding padded input rows a, a + sh, .. and columns b, b + sw, ..; then
// tap (r, s) of flat output f = oh * P + ow reads sub-plane ((r dh) % sh, (s dw) % sw) at
// f + ((r dh) / sh) P + (s dw) / sw: every tap is one unaligned vector load for any stride.
struct FlatStaging {
  int64_t pitch, rows, flat, sub;
  FlatStaging(const ConvGeom& g, int64_t tile)
      : pitch(g.OW + ((g.S - 1) * g.dw) / g.sw),
        rows(g.OH + ((g.R - 1) * g.dh) / g.sh),
        flat(round_up(g.OH * pitch, tile)),
        // Each sub-plane also holds what the last tile's furthest tap reads past its rows.
        sub(round_up(g.OH * pitch, tile) + rows * pitch) {}
  // Where tap (r, s) of flat output 0 reads, from the first sub-plane's start.
  int64_t tap_offset(const ConvGeom& g, int64_t r, int64_t s) const {
    return ((r * g.dh) % g.sh * g.sw + (s * g.dw) % g.sw) * sub + (r * g.dh) / g.sh * pitch +
           (s * g.dw) / g.sw;
  }
};

template <typename T>
void stage_flat(const ConvGeom& g, const FlatStaging& st, const T* xp, T* planes) {
  for (int64_t a = 0; a < g.sh; ++a) {
    for (int64_t b = 0; b < g.sw; ++b) {
      T* dst = planes + (a * g.sw + b) * st.sub;
      // Columns j with 0 <= j * sw + b - pl < W hold x; the others are zeros.
      const int64_t j0 = min64(st.pitch, max64(0, ceil_div(g.pl - b, g.sw)));
      const int64_t j1 = min64(st.pitch, max64(j0, ceil_div(g.W + g.pl - b, g.sw)));
      for (int64_t i = 0; i < st.rows; ++i, dst += st.pitch) {
        const int64_t ih = i * g.sh + a - g.pt;
        if (ih < 0 || ih >= g.H) {
          zero_n(dst, st.pitch);
          continue;
        }
        const T* src = xp + ih * g.W + j0 * g.sw + b - g.pl;
        zero_n(dst, j0);
        if (g.sw == 1)
          copy_n(dst + j0, src, j1 - j0);
        else
          copy_strided_n(dst + j0, src, j1 - j0, g.sw);
        zero_n(dst + j1, st.pitch - j1);
      }
      zero_n(dst, st.sub - st.rows * st.pitch);
    }
  }
}

}  // namespace FASTCONV_ISA
}  // namespace fastconv
