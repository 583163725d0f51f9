// im2col + GEMM convolution for one ISA: forward, grad-input, grad-weight.
//
// The work runs in NHWC. For a chunk of output pixels p (flattened over n, oh, ow) the column
// matrix of group g is
//
//   col[p][t*Cg + c] = x[n][oh*sh - pt + r*dh][ow*sw - pl + s*dw][g*Cg + c]   (t = r*S + s;
//                                                                               0 outside)
// and, with the weights permuted to wt[k][t][c] = w[k][c][r][s] (RSC = R*S*Cg),
//
//   forward:      y[p][g*Kg + k] = sum_i col[p][i] * wt[g*Kg + k][i]       (+ bias epilogue)
//   grad-input:   dcol[p][i]     = sum_k dy[p][g*Kg + k] * wt[g*Kg + k][i], then col2im
//                 adds dcol back onto dx
//   grad-weight:  dwt[g*Kg + k][i] += sum_p dy[p][g*Kg + k] * col[p][i]
//
// The column matrix is built for at most the column budget at a time, and NCHW tensors are
// transposed in groups of images under the layout budget (both in common/tuning.h), so the extra memory is bounded
// whatever the batch size. A 1x1, stride-1, unpadded convolution skips im2col: col is x.
// NCHW forward on large maps runs natively instead, one GEMM per image:
//   y[n][g*Kg + k][p] = sum_i w[g*Kg + k][i] * colT[i][p]   (i = (c, r, s), torch's order),
// with colT generated panel by panel inside the GEMM's packing (implicit im2col).
#include <cstring>
#include <vector>

#include "../common/layout.h"
#include "../common/simd.h"
#include "../common/tuning.h"
#include "../common/workspace.h"
#include "../gemm/gemm.h"
#include "../isa/kernel_table.h"

namespace fastconv {
namespace FASTCONV_ISA {
namespace {

bool is_pointwise(const ConvGeom& g) {
  return g.R == 1 && g.S == 1 && g.sh == 1 && g.sw == 1 && !g.padded();
}

// 1x1 and unpadded, any stride: a strided one is a pointwise one on a subsampled input.
bool is_unpadded_1x1(const ConvGeom& g) { return g.R == 1 && g.S == 1 && !g.padded(); }

// Whether an NCHW pass (the forward, or a pointwise grad-input) runs natively (no
// transposes) rather than in NHWC. A pointwise forward also does on small maps when the
// batch has enough pixels: its one GEMM then spans every image.
bool runs_native(const ConvGeom& g, Pass pass) {
  const Tuning& t = tuning();
  if (pass == Pass::kForward && is_pointwise(g) &&
      g.N * g.OH * g.OW >= t.im2col_native_min_batch_pixels_pointwise_forward)
    return true;
  const int64_t min_pixels = is_pointwise(g)       ? t.im2col_native_min_pixels_pointwise
                             : is_unpadded_1x1(g) ? t.im2col_native_min_pixels_strided_1x1
                                                   : t.im2col_native_min_pixels_spatial;
  return g.OH * g.OW >= min_pixels;
}

// The weights as wt[k][t][c] in a workspace, or w itself for a 1x1 convolution (same layout).
template <typename T>
const T* permuted_weights(const ConvGeom& g, const T* w, int nthreads) {
  if (g.R == 1 && g.S == 1) return w;
  T* buf = workspace_as<T>(kWsWeightsTapMajor, g.K * g.Cg() * g.R * g.S);
  permute_taps(w, g.K, g.Cg(), g.R * g.S, buf, true, nthreads);
  return buf;
}

// The NHWC images of one image group and where output pixel p's window starts.
template <typename T>
struct NhwcView {
  const ConvGeom& g;
  int64_t images;
  int64_t pixels() const { return images * g.OH * g.OW; }
  // For output pixel p: its image and top-left input row / column (may be < 0).
  void locate(int64_t p, int64_t* n, int64_t* ih, int64_t* iw) const {
    const int64_t OHW = g.OH * g.OW, q = p % OHW;
    *n = p / OHW;
    *ih = (q / g.OW) * g.sh - g.pt;
    *iw = (q % g.OW) * g.sw - g.pl;
  }
};

// col[j][t*Cg + c] for output pixels p0 + j, j < rows, of group gi.
template <typename T>
void im2col_nhwc(const NhwcView<T>& v, const T* x, int64_t gi, int64_t p0, int64_t rows, T* col,
                 int nthreads) {
  const ConvGeom& g = v.g;
  const int64_t Cg = g.Cg(), RS = g.R * g.S, RSC = RS * Cg;
  parallel_for(rows, threads_for(rows * RSC * 4, nthreads), [&](int64_t j) {
    int64_t n, ih0, iw0;
    v.locate(p0 + j, &n, &ih0, &iw0);
    T* d = col + j * RSC;
    for (int64_t r = 0; r < g.R; ++r) {
      const int64_t ih = ih0 + r * g.dh;
      for (int64_t s = 0; s < g.S; ++s, d += Cg) {
        const int64_t iw = iw0 + s * g.dw;
        if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W)
          std::memset(d, 0, sizeof(T) * Cg);
        else
          std::memcpy(d, x + ((n * g.H + ih) * g.W + iw) * g.C + gi * Cg, sizeof(T) * Cg);
      }
    }
  });
}

// dx[n][ih][iw][gi*Cg + c] += col[j][t*Cg + c]: the adjoint of im2col_nhwc. Windows of
// different pixels overlap, so threads split the channels rather than the pixels.
template <typename T>
void col2im_nhwc(const NhwcView<T>& v, const T* col, int64_t gi, int64_t p0, int64_t rows, T* dx,
                 int nthreads) {
  const ConvGeom& g = v.g;
  const int64_t Cg = g.Cg(), RSC = g.R * g.S * Cg;
  const int nt = Cg >= 32 ? threads_for(rows * RSC * 4, nthreads) : 1;
  parallel(nt, [&](int tid, int nth) {
    int64_t c0, c1;
    split_range(Cg, nth, tid, &c0, &c1);
    for (int64_t j = 0; j < rows; ++j) {
      int64_t n, ih0, iw0;
      v.locate(p0 + j, &n, &ih0, &iw0);
      const T* s = col + j * RSC;
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t ih = ih0 + r * g.dh;
        for (int64_t q = 0; q < g.S; ++q, s += Cg) {
          const int64_t iw = iw0 + q * g.dw;
          if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
          T* d = dx + ((n * g.H + ih) * g.W + iw) * g.C + gi * Cg;
          for (int64_t c = c0; c < c1; ++c) d[c] += s[c];
        }
      }
    }
  });
}

// Output pixels per column-matrix chunk.
template <typename T>
int64_t chunk_rows(int64_t row_elems, int64_t total) {
  return max64(1, min64(total, tuning().im2col_column_budget_bytes /
                                  (max64(1, row_elems) * int64_t(sizeof(T)))));
}

// Runs body(n0, n1, xn, yn) over groups of images in NHWC: tensors already NHWC are passed
// through; NCHW ones are transposed in before and back out after the call. `in` is an
// N x C x H x W tensor read by the body, `out` an N x Co x OHW tensor it writes (zeroed
// first when zero_out).
template <typename T, typename F>
void over_image_groups(const ConvGeom& g, const T* in, int in_layout, int64_t C, int64_t H,
                       int64_t W, T* out, int out_layout, int64_t Co, int64_t OHW, bool zero_out,
                       int nthreads, F body) {
  const int64_t HW = H * W;
  const bool convert = in_layout != kNHWC || out_layout != kNHWC;
  const int64_t per_image = (in_layout != kNHWC ? C * HW : 0) + (out_layout != kNHWC ? Co * OHW : 0);
  const int64_t group = convert ? images_per_group(per_image * int64_t(sizeof(T))) : max64(1, g.N);
  for (int64_t n0 = 0; n0 < g.N; n0 += group) {
    const int64_t n1 = min64(g.N, n0 + group), images = n1 - n0;
    const T* xn = in + n0 * C * HW;
    if (in_layout != kNHWC) {
      T* buf = workspace_as<T>(kWsActivationNhwc, images * C * HW);
      scatter_to_nhwc(in + n0 * C * HW, kNCHW, images, C, H, W, buf, H, W, 0, 0, 1, 1, nthreads);
      xn = buf;
    }
    T* yn = out_layout == kNHWC ? out + n0 * Co * OHW
                                : workspace_as<T>(kWsOutputNhwc, images * Co * OHW);
    if (zero_out) std::memset(yn, 0, sizeof(T) * images * Co * OHW);
    body(n0, n1, xn, yn);
    if (out_layout != kNHWC) nhwc_to_nchw(yn, images, Co, OHW, out + n0 * Co * OHW, nthreads);
  }
}

// Whether a forward runs natively on NCHW tensors (packed A = weights) or in NHWC (packed
// B = weights): the two layouts its packed weights can have.
bool forward_native(const ConvGeom& g, int x_layout, int y_layout) {
  return x_layout == kNCHW && y_layout == kNCHW && runs_native(g, Pass::kForward);
}
enum PackedVariant : int { kPackedAsB = 0, kPackedAsA = 1 };

// The forward's weights, tap-major and packed whole for the GEMM, one group after another.
template <typename T>
WeightPacking weight_packing(const ConvGeom& g, int x_layout, int y_layout) {
  const int64_t Kg = g.Kg(), RSC = g.R * g.S * g.Cg();
  if (forward_native(g, x_layout, y_layout))
    return {g.groups * gemm_packed_size_a<T>(Kg, RSC), kPackedAsA};
  return {g.groups * gemm_packed_size_b<T>(RSC, Kg), kPackedAsB};
}

template <typename T>
void pack_forward_weights(const ConvGeom& g, int x_layout, int y_layout, const T* w, T* out,
                          int nthreads) {
  const int64_t Kg = g.Kg(), RSC = g.R * g.S * g.Cg();
  const bool as_a = weight_packing<T>(g, x_layout, y_layout).variant == kPackedAsA;
  const int64_t size = as_a ? gemm_packed_size_a<T>(Kg, RSC) : gemm_packed_size_b<T>(RSC, Kg);
  const T* wt = permuted_weights(g, w, nthreads);  // [k][t][c]: the rows' tap-major order
  for (int64_t gi = 0; gi < g.groups; ++gi) {
    GemmArgs<T> a{};
    a.K = RSC;
    if (as_a) {  // A(k, i) = wt[k][i]
      a.M = Kg;
      a.a = wt + gi * Kg * RSC;
      a.rs_a = RSC;
      a.cs_a = 1;
      gemm_pack_a(a, out + gi * size, nthreads);
    } else {  // B(i, k) = wt[k][i]
      a.N = Kg;
      a.b = wt + gi * Kg * RSC;
      a.rs_b = 1;
      a.cs_b = RSC;
      gemm_pack_b(a, out + gi * size, nthreads);
    }
  }
}

template <typename T>
void forward_nchw_native(const ConvGeom& g, const T* x, const T* packed, const T* w,
                         const Epilogue<T>& epi, T* y, int nthreads);

template <typename T>
void forward(const ConvGeom& g, const T* x, int x_layout, const T* w, const T* packed,
             const Epilogue<T>& epi, T* y, int y_layout, int nthreads) {
  // A pointwise layer's native forward is one GEMM per group over every image: without
  // cached weights its A (w as it lies) is packed inside the GEMM, a block at a time into L2,
  // not whole into memory and read back. 1x1 512>2048 @7, batch 1: the weights packed
  // first took 1.29 ms, cached 0.78.
  if (!packed && forward_native(g, x_layout, y_layout) && is_pointwise(g))
    return forward_nchw_native<T>(g, x, nullptr, w, epi, y, nthreads);
  packed = packed_or_pack_now(packed, g, x_layout, y_layout, w, kWsGemmWholeOperand,
                              &weight_packing<T>, &pack_forward_weights<T>, nthreads);
  if (forward_native(g, x_layout, y_layout))
    return forward_nchw_native<T>(g, x, packed, nullptr, epi, y, nthreads);
  const int64_t OHW = g.OH * g.OW;
  const int64_t G = g.groups, Cg = g.Cg(), Kg = g.Kg(), RSC = g.R * g.S * Cg;
  const int64_t packed_group = gemm_packed_size_b<T>(RSC, Kg);
  const bool pointwise = is_pointwise(g);
  over_image_groups<T>(g, x, x_layout, g.C, g.H, g.W, y, y_layout, g.K, OHW, false, nthreads,
                       [&](int64_t n0, int64_t n1, const T* xn, T* yn) {
    const NhwcView<T> v{g, n1 - n0};
    const int64_t P = v.pixels(), rows = pointwise ? P : chunk_rows<T>(RSC, P);
    T* col = pointwise ? nullptr : workspace_as<T>(kWsColumns, rows * RSC);
    for (int64_t gi = 0; gi < G; ++gi) {
      GemmArgs<T> a{};
      a.N = Kg;
      a.K = RSC;
      a.b_packed = packed + gi * packed_group;
      a.epi = epi.from_channel(gi * Kg);
      a.epi.per_row = false;
      for (int64_t p0 = 0; p0 < P; p0 += rows) {
        a.M = min64(rows, P - p0);
        if (pointwise) {
          a.a = xn + p0 * g.C + gi * Cg;
          a.rs_a = g.C;
        } else {
          im2col_nhwc(v, xn, gi, p0, a.M, col, nthreads);
          a.a = col;
          a.rs_a = RSC;
        }
        a.cs_a = 1;
        a.c = yn + p0 * g.K + gi * Kg;
        a.ldc = g.K;
        gemm(a, nthreads);
      }
    }
  });
}

// Implicit im2col for the native NCHW forward: the GEMM's B is colT[i][p] = x[c][ih][iw]
// for i = t*Cg + c (tap-major, like wt) and output pixel p of one image, and each packed
// KC x NR panel is filled straight from the image, so no column matrix is ever stored. The
// packed B block (at most KC x NC) is this path's whole im2col workspace.
//
// The panel's pixels are runs along output rows. For one run and one (tap row r, channel
// c), the S rows of taps (r, 0..S-1) read the same input row at column iw0 + s*dw + q*sw
// (q < the run's length): with s*dw = a*sw + ph, that is position a + q of stride phase ph
// (columns iw0 + ph + m*sw). So each phase that some tap reads is gathered once, padding
// zeros included, into a small staging row, and every tap's row is then a plain copy from
// it. Stem (7x7/2, 3 channels), batch 8, 1 thread: packing was 23 % of the forward when
// each of the 147 rows gathered and bounds-checked its own strided run.
template <typename T>
struct ImplicitCols {
  const T* x;          // the image's first channel of this group
  const ConvGeom* g;   // the convolution (its Cg, S, H, W, OW, strides, dilations, pt, pl)
};

// dst[m] = row[col0 + m * step] for m < n, zero where the column lies outside [0, W).
template <typename T>
void gather_padded(const T* row, int64_t W, int64_t col0, int64_t step, int64_t n, T* dst) {
  const int64_t lo = col0 >= 0 ? 0 : min64(n, ceil_div(-col0, step));
  const int64_t last = col0 + (n - 1) * step;
  const int64_t hi =
      last < W ? n : max64(lo, min64(n, col0 >= W ? 0 : (W - 1 - col0) / step + 1));
  zero_n(dst, lo);
  if (step == 1)
    copy_n(dst + lo, row + col0 + lo, hi - lo);
  else
    copy_strided_n(dst + lo, row + col0 + lo * step, hi - lo, step);
  zero_n(dst + hi, n - hi);
}

template <typename T>
void pack_implicit_cols(const void* ctx, int64_t k0, int64_t kc, int64_t j0, int64_t cols,
                        int64_t nr, T* dst) {
  const ImplicitCols<T>& src = *static_cast<const ImplicitCols<T>*>(ctx);
  const ConvGeom& c = *src.g;
  const int64_t Cg = c.Cg(), HW = c.H * c.W, S = c.S;
  // Per tap column s: its phase, its position in the phase, and its staging row (that of
  // the first tap of its phase). Thread-local buffers, used through plain pointers (each
  // thread_local access is a call).
  thread_local std::vector<int64_t> per_tap;
  per_tap.resize(4 * S);
  int64_t* const phase = per_tap.data();
  int64_t* const at = phase + S;
  int64_t* const slot = at + S;
  int64_t* const gathered = slot + S;  // for which (run, pair) each staging row was gathered
  int64_t stamp = 0;
  for (int64_t s = 0; s < S; ++s) {
    gathered[s] = -1;
    phase[s] = s * c.dw % c.sw;
    at[s] = s * c.dw / c.sw;
    slot[s] = s;
    for (int64_t e = 0; e < s; ++e)
      if (phase[e] == phase[s]) {
        slot[s] = e;
        break;
      }
  }
  // Staging rows of kPairs (r, c) pairs at a time, all gathered before any is read: a copy
  // right behind the gather that wrote its row waited for the stores (a load that spans
  // two of them is not forwarded), which cost as much as the gathers.
  constexpr int64_t kPairs = 16;
  const int64_t reach = (S - 1) * c.dw / c.sw, pitch = round_up(nr + reach, 16);
  thread_local std::vector<T> staging_buffer;
  staging_buffer.resize(kPairs * S * pitch);
  T* const staging = staging_buffer.data();
  // Pairs u = r * Cg + c, r from that of row k0 to that of the block's last row.
  const int64_t u_first = k0 / Cg / S * Cg, u_end = ((k0 + kc - 1) / Cg / S + 1) * Cg;
  // The row of tap s of pair u, if inside the block.
  const auto row_of = [&](int64_t u, int64_t s) {
    return (u / Cg * S + s) * Cg + u % Cg - k0;
  };
  for (int64_t j = 0; j < cols;) {  // runs along output rows
    const int64_t p = j0 + j, oh = p / c.OW, ow = p % c.OW, len = min64(c.OW - ow, cols - j);
    const int64_t ih0 = oh * c.sh - c.pt, iw0 = ow * c.sw - c.pl;
    for (int64_t u0 = u_first; u0 < u_end; u0 += kPairs) {
      const int64_t u1 = min64(u0 + kPairs, u_end);
      for (int64_t u = u0; u < u1; ++u, ++stamp) {  // gather
        const int64_t ih = ih0 + u / Cg * c.dh;
        if (ih < 0 || ih >= c.H) continue;
        const T* row = src.x + (u % Cg) * HW + ih * c.W;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t k = row_of(u, s), e = slot[s];
          if (k < 0 || k >= kc || gathered[e] == stamp) continue;
          gather_padded(row, c.W, iw0 + phase[e], c.sw, len + reach,
                        staging + ((u - u0) * S + e) * pitch);
          gathered[e] = stamp;
        }
      }
      for (int64_t u = u0; u < u1; ++u) {  // copy
        const int64_t ih = ih0 + u / Cg * c.dh;
        const bool inside = ih >= 0 && ih < c.H;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t k = row_of(u, s);
          if (k < 0 || k >= kc) continue;
          T* d = dst + k * nr + j;
          if (inside)
            copy_n(d, staging + ((u - u0) * S + slot[s]) * pitch + at[s], len);
          else
            zero_n(d, len);
        }
      }
    }
    j += len;
  }
  if (cols < nr)
    for (int64_t k = 0; k < kc; ++k) zero_n(dst + k * nr + cols, nr - cols);
}

// NCHW forward, natively. Per group, y[n] (Kg x OHW) = W (Kg x RSC) * cols(x[n]), W packed
// once (`packed`), or, pointwise, read as it lies from w (packed inside the GEMM). A
// pointwise layer runs one GEMM over every image (column segments, gemm.h): B and C are the
// images themselves, so per-image GEMMs' narrow N (49 pixels @7) does not starve the threads
// or reload W's panels once per image.
template <typename T>
void forward_nchw_native(const ConvGeom& g, const T* x, const T* packed, const T* w,
                         const Epilogue<T>& epi, T* y, int nthreads) {
  const int64_t G = g.groups, Cg = g.Cg(), Kg = g.Kg(), RSC = Cg * g.R * g.S;
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  const int64_t packed_group = gemm_packed_size_a<T>(Kg, RSC);
  for (int64_t gi = 0; gi < G; ++gi) {
    GemmArgs<T> a{};
    a.M = Kg;
    a.K = RSC;
    if (packed) {
      a.a_packed = packed + gi * packed_group;  // the same for every image
    } else {  // A(k, c) = w[gi*Kg + k][c]
      a.a = w + gi * Kg * RSC;
      a.rs_a = RSC;
      a.cs_a = 1;
    }
    a.ldc = OHW;
    a.epi = epi.from_channel(gi * Kg);
    a.epi.per_row = true;
    if (is_pointwise(g)) {  // B(c, n*HW + p) = x[n][gi*Cg + c][p]
      a.N = g.N * HW;
      a.b = x + gi * Cg * HW;
      a.rs_b = HW;
      a.cs_b = 1;
      a.n_seg = HW;
      a.n_seg_stride_b = g.C * HW;
      a.n_seg_stride_c = g.K * OHW;
      a.c = y + gi * Kg * OHW;
      gemm(a, nthreads);
      continue;
    }
    a.N = OHW;
    a.pack_b_panel = &pack_implicit_cols<T>;
    for (int64_t n = 0; n < g.N; ++n) {
      const ImplicitCols<T> cols{x + (n * g.C + gi * Cg) * HW, &g};
      a.pack_b_ctx = &cols;
      a.c = y + (n * g.K + gi * Kg) * OHW;
      gemm(a, nthreads);
    }
  }
}

// The GEMM of an NCHW grad-input, natively: for group gi and images [n0, n0 + m),
//   out (M x m*P) = W^T (M x Kg) * gy (Kg x m*P), A(i, k) = w[gi*Kg + k][i] (M values per
//   filter: Cg for a pointwise layer, RSC in (c, r, s) order otherwise),
//   B(k, n*P + p) = gy[n0 + n][gi*Kg + k][p],
// image n's M x P block of out at out + n * out_image (row stride P). A caller that runs
// several image chunks packs A whole once per group (gemm_pack_a).
template <typename T>
GemmArgs<T> grad_input_nchw_gemm(const ConvGeom& g, int64_t M, int64_t gi, const T* w,
                                 const T* gy, int64_t n0, int64_t m, T* out, int64_t out_image) {
  const int64_t Kg = g.Kg(), P = g.OH * g.OW;
  GemmArgs<T> a{};
  a.M = M;
  a.N = m * P;
  a.K = Kg;
  a.a = w + gi * Kg * M;
  a.rs_a = 1;
  a.cs_a = M;
  a.b = gy + (n0 * g.K + gi * Kg) * P;
  a.rs_b = P;
  a.cs_b = 1;
  a.n_seg = P;
  a.n_seg_stride_b = g.K * P;
  a.c = out;
  a.ldc = P;
  a.n_seg_stride_c = out_image;
  return a;
}

// Pointwise grad-input on NCHW tensors, natively (as the forward, one GEMM per group over
// every image; converting grad_y and grad_x to NHWC and back cost more than the GEMMs:
// 1x1 64>256 @56, batch 8, grad-input 15.5 ms through NHWC against torch's 7.0).
// W^T is packed inside the GEMM, a block at a time into L2 (packed whole first, it went to
// memory and back: 1x1 2048>512 @7, batch 1, ms).
template <typename T>
void grad_input_pointwise_nchw(const ConvGeom& g, const T* gy, const T* w, T* gx, int nthreads) {
  const int64_t Cg = g.Cg(), P = g.H * g.W;
  for (int64_t gi = 0; gi < g.groups; ++gi)
    gemm(grad_input_nchw_gemm(g, Cg, gi, w, gy, 0, g.N, gx + gi * Cg * P, g.C * P), nthreads);
}

// Output positions o in [*lo, *hi) whose tap at offset `off` reads an input inside [0, in):
// 0 <= o * stride - pad + off < in.
inline void tap_span(int64_t pad, int64_t off, int64_t stride, int64_t in, int64_t out,
                     int64_t* lo, int64_t* hi) {
  const int64_t first = pad - off, last = in - 1 + pad - off;
  *lo = first > 0 ? min64(out, ceil_div(first, stride)) : 0;
  *hi = last >= 0 ? min64(out, last / stride + 1) : 0;
  *hi = max64(*lo, *hi);
}

// dx[gi*Cg + c][ih][iw] = sum of dcol[(c*R + r)*S + s][oh*OW + ow] over the taps that read
// (ih, iw) (one image, NCHW): the adjoint of torch's (c, r, s)-ordered im2col. Each thread
// owns whole channel planes, so the overlapping windows need no synchronisation; stride 1
// adds contiguous runs.
template <typename T>
void col2im_nchw(const ConvGeom& g, const T* dcol, int64_t gi, T* dx, int nthreads) {
  const int64_t Cg = g.Cg(), RS = g.R * g.S, HW = g.H * g.W, OHW = g.OH * g.OW;
  parallel_for(Cg, threads_for(Cg * RS * OHW, nthreads), [&](int64_t c) {
    T* plane = dx + (gi * Cg + c) * HW;
    std::fill(plane, plane + HW, T(0));
    for (int64_t r = 0; r < g.R; ++r) {
      int64_t oh0, oh1;
      tap_span(g.pt, r * g.dh, g.sh, g.H, g.OH, &oh0, &oh1);
      for (int64_t q = 0; q < g.S; ++q) {
        int64_t ow0, ow1;
        tap_span(g.pl, q * g.dw, g.sw, g.W, g.OW, &ow0, &ow1);
        const T* src = dcol + ((c * g.R + r) * g.S + q) * OHW;
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          T* d = plane + (oh * g.sh - g.pt + r * g.dh) * g.W + ow0 * g.sw - g.pl + q * g.dw;
          const T* sp = src + oh * g.OW;
          if (g.sw == 1)
            for (int64_t ow = ow0; ow < ow1; ++ow) d[ow - ow0] += sp[ow];
          else
            for (int64_t ow = ow0; ow < ow1; ++ow) d[(ow - ow0) * g.sw] += sp[ow];
        }
      }
    }
  });
}

// Whether an NCHW grad-input with a spatial kernel runs natively (grad_input_col2im_nchw):
// strided, on maps large enough to fill the GEMM's NR-wide panels (tuning.h).
bool grad_input_col2im(const ConvGeom& g) {
  return !is_pointwise(g) && (g.sh > 1 || g.sw > 1) &&
         g.OH * g.OW >= tuning().im2col_col2im_grad_input_min_pixels;
}

// Spatial grad-input on NCHW tensors, natively, as Caffe's col2im: per group and image,
//   dcol (RSC x OHW) = W^T (RSC x Kg) * gy[n] (Kg x OHW), then dx[n] = col2im(dcol),
// with RSC in torch's (c, r, s) order, so W^T's packing copies runs of the filters as they
// lie (the NHWC path transposes every filter into tap-major columns) and grad_y needs no
// transpose. One GEMM spans the images that fit the column budget.
template <typename T>
void grad_input_col2im_nchw(const ConvGeom& g, const T* gy, const T* w, T* gx, int nthreads) {
  const int64_t Cg = g.Cg(), Kg = g.Kg(), RSC = Cg * g.R * g.S, OHW = g.OH * g.OW;
  const int64_t images = chunk_rows<T>(RSC * OHW, g.N);
  T* packed = workspace_as<T>(kWsGemmWholeOperand, gemm_packed_size_a<T>(RSC, Kg));
  T* dcol = workspace_as<T>(kWsColumns, images * RSC * OHW);
  for (int64_t gi = 0; gi < g.groups; ++gi) {
    for (int64_t n0 = 0; n0 < g.N; n0 += images) {
      const int64_t m = min64(images, g.N - n0);
      GemmArgs<T> a = grad_input_nchw_gemm(g, RSC, gi, w, gy, n0, m, dcol, RSC * OHW);
      if (n0 == 0) gemm_pack_a(a, packed, nthreads);  // W^T once per group
      a.a_packed = packed;
      gemm(a, nthreads);
      for (int64_t n = 0; n < m; ++n)
        col2im_nchw(g, dcol + n * RSC * OHW, gi, gx + (n0 + n) * g.C * g.H * g.W, nthreads);
    }
  }
}

// Pointwise grad-weight on NCHW tensors: per group, dW (Kg x Cg) = sum over the images of
// gy[n] (Kg x P) * x[n]^T (P x Cg), one GEMM whose K runs over every image's pixels (K
// segments, gemm.h), so C is read and written once per K block, not once per image
// (1x1 2048>512 @7, batch 8: 49-pixel GEMMs rewrote the 4 MiB dW 8 times).
// Two ways to use the threads, by the size of dW against the pixels:
//  * pixels: each thread sums its share of the pixels into its own dW, and the partial sums
//    are added. The best split when dW is small (1x1 64>256 @56, batch 8: 11.7 ms with the
//    threads inside per-image GEMMs, 5.1 this way, torch 6.0). Each thread packs its own
//    operands in chunks into its scratch, so its GEMMs need no workspace inside the
//    parallel region.
//  * dW: one GEMM with the threads inside, which split dW's tiles; no partial copies of dW
//    (the "no per-thread copy of a large dW"). Best when dW is large against the
//    pixels, where adding copies costs as much as the GEMM.
// Adding a thread's partial dW costs one memory-bound add per element, worth ~20 pixels of
// GEMM here, and the split needs 64+ pixels a thread to keep that a small share.
inline int pointwise_grad_weight_threads(const ConvGeom& g, int nthreads) {
  const int64_t pixels = g.N * g.OH * g.OW, dw = g.K * g.Cg();
  if (pixels < dw / tuning().pointwise_grad_weight_dw_per_pixel) return 1;  // split dW
  return int(min64(threads_for(pixels * dw * 2, nthreads), max64(1, pixels / 64)));
}

// Pixels per packed chunk of the pixel split: (Kg + Cg) x chunk values of scratch a thread.
// dW is read and written once per chunk; at 1024 that traffic is under 1 % of the GEMM's.
constexpr int64_t kPointwiseGradWeightChunk = 1024;

// dW (gw, K x Cg) = [gw +] the sum over `images` images of gy[n] * x[n]^T, where gy[n] is
// K x P (P output pixels) and x[n] is C x P at x + n * x_image (x_image >= C * P).
template <typename T>
void pointwise_grad_weight_images(const ConvGeom& g, const T* gy, const T* x, int64_t x_image,
                                  int64_t images, bool accumulate, T* gw, int nthreads) {
  const int64_t Cg = g.Cg(), Kg = g.Kg(), P = g.OH * g.OW, KC = g.K * Cg, pixels = images * P;
  GemmArgs<T> base{};
  base.M = Kg;
  base.N = Cg;
  base.rs_a = P;  // A(k, p) = gy[n][gi*Kg + k][p]
  base.cs_a = 1;
  base.rs_b = 1;  // B(p, c) = x[n][gi*Cg + c][p]
  base.cs_b = P;
  base.k_seg = P;
  base.seg_stride_a = g.K * P;
  base.seg_stride_b = x_image;
  base.ldc = Cg;
  const int nt = pointwise_grad_weight_threads(g, nthreads);
  if (nt == 1) {  // split dW: the threads inside each group's GEMM
    for (int64_t gi = 0; gi < g.groups; ++gi) {
      GemmArgs<T> a = base;
      a.K = pixels;
      a.a = gy + gi * Kg * P;
      a.b = x + gi * Cg * P;
      a.c = gw + gi * Kg * Cg;
      a.accumulate = accumulate;
      gemm(a, nthreads);
    }
    return;
  }
  const int64_t chunk = kPointwiseGradWeightChunk;
  const int64_t size_a = gemm_packed_size_a<T>(Kg, chunk), size_b = gemm_packed_size_b<T>(chunk, Cg);
  T* part = workspace_as<T>(kWsAccumulators, (nt - 1) * KC);
  int ran = 1;  // threads OpenMP gave the region (fewer than nt when nested or limited)
  parallel(nt, [&](int tid, int nth) {
    if (tid == 0) ran = nth;
    int64_t q0, q1;  // this thread's pixels, numbered n * P + p over the images
    split_range(pixels, nth, tid, &q0, &q1);
    T* dst = tid == 0 ? gw : part + (tid - 1) * KC;
    const bool add_first = tid == 0 && accumulate;
    T* packed = thread_scratch<T>(size_a + size_b);
    for (int64_t gi = 0; gi < g.groups; ++gi) {
      GemmArgs<T> a = base;
      a.c = dst + gi * Kg * Cg;
      if (q0 == q1 && !add_first) std::memset(a.c, 0, sizeof(T) * Kg * Cg);
      for (int64_t q = q0; q < q1; q += chunk) {
        const int64_t n = q / P;
        a.K = min64(chunk, q1 - q);
        a.k_seg_first = q % P;
        a.a = gy + (n * g.K + gi * Kg) * P;
        a.b = x + n * x_image + gi * Cg * P;
        a.a_packed = a.b_packed = nullptr;
        gemm_pack_a(a, packed, 1);
        gemm_pack_b(a, packed + size_a, 1);
        a.a_packed = packed;
        a.b_packed = packed + size_a;
        a.accumulate = q > q0 || add_first;
        gemm(a, 1);
      }
    }
  });
  if (ran > 1)
    parallel_for(KC, nt, [&](int64_t i) {
      for (int t = 1; t < ran; ++t) gw[i] += part[(t - 1) * KC + i];
    });
}

// x[n][c][oh * sh][ow * sw] for a group of images: the input pixels a strided 1x1
// convolution reads, as contiguous C x OH x OW images.
template <typename T>
void subsample_nchw(const ConvGeom& g, const T* x, int64_t images, T* out, int nthreads) {
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW;
  parallel_for(images * g.C, threads_for(images * g.C * OHW * 4, nthreads), [&](int64_t nc) {
    const T* plane = x + nc * HW;
    T* d = out + nc * OHW;
    for (int64_t oh = 0; oh < g.OH; ++oh)
      copy_strided_n(d + oh * g.OW, plane + oh * g.sh * g.W, g.OW, g.sw);
  });
}

// Pointwise (1x1, unpadded) grad-weight on NCHW tensors, any stride: a strided one reads
// its input subsampled, a group of images at a time under the layout budget.
template <typename T>
void grad_weight_pointwise_nchw(const ConvGeom& g, const T* gy, const T* x, T* gw, int nthreads) {
  const int64_t image_in = g.C * g.H * g.W, OHW = g.OH * g.OW;
  if (g.sh == 1 && g.sw == 1)
    return pointwise_grad_weight_images(g, gy, x, image_in, g.N, false, gw, nthreads);
  const int64_t group = images_per_group(g.C * OHW * int64_t(sizeof(T)));
  T* sub = workspace_as<T>(kWsActivationNhwc, min64(group, g.N) * g.C * OHW);
  for (int64_t n0 = 0; n0 < g.N; n0 += group) {
    const int64_t images = min64(group, g.N - n0);
    subsample_nchw(g, x + n0 * image_in, images, sub, nthreads);
    pointwise_grad_weight_images(g, gy + n0 * g.K * OHW, sub, g.C * OHW, images, n0 > 0, gw,
                                 nthreads);
  }
}

// Grad-input's B, B(k, i) = w[k][c][t] of one group for i = t*Cg + c (tap-major, the column
// matrix's order), packed whole in gemm.h's layout straight from OIHW in one pass. Threads
// take 16 filters at a time, each read in order: every 16 c x RS piece of a filter is
// transposed in registers and each tap's run of 16 channels stored into its panel's row k
// (staged and copied where a run would cross a panel). Before, the runs were staged in a
// scratch block and copied out: the copies read back masked stores (which do not forward)
// and took as long as the GEMM, 3x3/2 512 @14 at batch 1. (A tap-major copy first, then
// the pack, read and wrote the weights twice: 30 % of that layer.)
template <typename T>
void pack_grad_input_b(const ConvGeom& g, const T* w, T* out, int nthreads) {
  constexpr int64_t B = kTransposeBlock;
  const GemmBlocking blocking = gemm_blocking<T>();
  const int64_t Cg = g.Cg(), Kg = g.Kg(), RS = g.R * g.S, RSC = RS * Cg, NR = blocking.nr;
  const int64_t KC = gemm_k_block<T>(Kg), npad = round_up(RSC, NR);
  const T* const w_end = w + Kg * RSC;  // this group's filters
  // Where each tap's run of channels from c0 starts, i = t*Cg + c0: panel i / NR, column
  // i % NR (worked out once, not per filter); whether all of c0's runs stay in one panel.
  const int64_t CB = ceil_div(Cg, B);
  std::vector<int64_t> run_panel(CB * RS), run_col(CB * RS);
  std::vector<char> whole_runs(CB, 1);
  for (int64_t cb = 0; cb < CB; ++cb)
    for (int64_t t = 0; t < RS; ++t) {
      const int64_t i = t * Cg + cb * B;
      run_panel[cb * RS + t] = i / NR;
      run_col[cb * RS + t] = i % NR;
      whole_runs[cb] &= i % NR + min64(B, Cg - cb * B) <= NR;
    }
  parallel_for(ceil_div(Kg, B), threads_for(Kg * RSC * 4, nthreads), [&](int64_t kg) {
    const int64_t k0 = kg * B, kn = min64(B, Kg - k0);
    T* piece = thread_scratch<T>(RS * B);  // [tap][16 c], for runs that cross a panel
    for (int64_t k = k0; k < k0 + kn; ++k) {
      const int64_t pc = (k / KC) * KC, kc = min64(KC, Kg - pc);
      T* row = out + pc * npad + (k - pc) * NR;  // panel q's row k at row + q * kc * NR
      const T* filter = w + k * RSC;              // (c, tap) at filter[c * RS + tap]
      for (int64_t cb = 0; cb < CB; ++cb) {
        const int64_t c0 = cb * B, *panel = &run_panel[cb * RS], *col = &run_col[cb * RS];
        const int rows = int(min64(B, Cg - c0));
        if (whole_runs[cb]) {
          for (int64_t t0 = 0; t0 < RS; t0 += B)
            transpose_block_to(filter + c0 * RS + t0, RS, rows, int(min64(B, RS - t0)),
                               [&](int j) { return row + panel[t0 + j] * kc * NR + col[t0 + j]; },
                               w_end);
          continue;
        }
        filter_piece_tap_major(filter + c0 * RS, RS, rows, piece, w_end);
        for (int64_t t = 0; t < RS; ++t)
          for (int64_t j = 0, i = t * Cg + c0; j < rows;) {  // the run crosses panels
            const int64_t len = min64(rows - j, NR - i % NR);
            copy_n(row + (i / NR) * kc * NR + i % NR, piece + t * B + j, len);
            j += len;
            i += len;
          }
      }
      if (npad > RSC) zero_n(row + (RSC / NR) * kc * NR + RSC % NR, npad - RSC);
    }
  });
}

template <typename T>
void grad_input(const ConvGeom& g, const T* gy, int gy_layout, const T* w, T* gx, int gx_layout,
                int nthreads) {
  const int64_t G = g.groups, Cg = g.Cg(), Kg = g.Kg(), RSC = g.R * g.S * Cg;
  const bool pointwise = is_pointwise(g);
  if (pointwise && gy_layout == kNCHW && gx_layout == kNCHW && runs_native(g, Pass::kGradInput))
    return grad_input_pointwise_nchw(g, gy, w, gx, nthreads);
  if (gy_layout == kNCHW && gx_layout == kNCHW && grad_input_col2im(g))
    return grad_input_col2im_nchw(g, gy, w, gx, nthreads);
  over_image_groups<T>(g, gy, gy_layout, g.K, g.OH, g.OW, gx, gx_layout, g.C, g.H * g.W,
                       !pointwise, nthreads, [&](int64_t n0, int64_t n1, const T* gyn, T* gxn) {
    const NhwcView<T> v{g, n1 - n0};
    const int64_t P = v.pixels(), rows = pointwise ? P : chunk_rows<T>(RSC, P);
    T* col = pointwise ? nullptr : workspace_as<T>(kWsColumns, rows * RSC);
    T* packed = workspace_as<T>(kWsGemmWholeOperand, gemm_packed_size_b<T>(Kg, RSC));
    for (int64_t gi = 0; gi < G; ++gi) {
      GemmArgs<T> wb{};
      wb.N = RSC;
      wb.K = Kg;
      if (g.R * g.S == 1) {  // B(k, c) = w[gi*Kg + k][c], packed once for every chunk (a 1x1
        // layer at any stride: pack_grad_input_b's per-filter transposes of 16 x 1 pieces
        // took 3 times the GEMM, 1x1/2 1024>2048 @14 at batch 1)
        wb.b = w + gi * Kg * Cg;
        wb.rs_b = Cg;
        wb.cs_b = 1;
        gemm_pack_b(wb, packed, nthreads);
      } else {
        pack_grad_input_b(g, w + gi * Kg * RSC, packed, nthreads);
      }
      for (int64_t p0 = 0; p0 < P; p0 += rows) {
        const int64_t m = min64(rows, P - p0);
        GemmArgs<T> a = wb;
        a.b_packed = packed;
        a.M = m;
        a.a = gyn + p0 * g.K + gi * Kg;
        a.rs_a = g.K;
        a.cs_a = 1;
        if (pointwise) {
          a.c = gxn + p0 * g.C + gi * Cg;
          a.ldc = g.C;
          gemm(a, nthreads);
        } else {
          a.c = col;
          a.ldc = RSC;
          gemm(a, nthreads);
          col2im_nhwc(v, col, gi, p0, m, gxn, nthreads);
        }
      }
    }
  });
}

// Implicit im2col for grad-weight: the GEMM's B is col[p][i] (pixels p of an image group,
// i = t*Cg + c of group gi), and each packed KC x NR panel is filled straight from the
// images, a run of channels of one tap per pixel, so no column matrix is stored or read back
// (3x3/2 128 @56, batch 8: the 29 MB of columns were written, then packed, in 4 MiB chunks).
// Each pixel's image offset and window corner are worked out once per call.
//
// The images are NHWC, or channel-blocked when each group's channels split into whole
// panels (Cg % NR == 0): [n][C / NR][H][W][NR], so that a panel (one tap, NR channels)
// reads NR contiguous values per pixel from a plane NR channels deep instead of a slice of
// each C-wide pixel. Packing reads are latency-bound (the pixels of a panel lie 2 * C values
// apart at stride 2), so both also prefetch a few pixels ahead. 3x3/2 128 @56, batch 8,
// packing time per thread and pass time: NHWC 3.3 ms (pass 0.75x torch), NHWC + prefetch
// 2.0 ms, blocked 2.0 ms, blocked + prefetch (8 pixels; 4: 1.3, 16: 1.0) 1.0 ms (0.89x).
struct PixelWindow {
  int64_t base;      // n * C * H * W: the pixel's image (in either layout)
  int64_t ih0, iw0;  // its window's top-left input row and column (may be < 0)
};

constexpr int64_t kPackPrefetchPixels = 8;

template <typename T>
struct ImplicitPixelCols {
  const ConvGeom* g;
  const T* x;                 // the images of the group: channel gi * Cg first
  const PixelWindow* pixels;  // one per output pixel of the group
  bool blocked;               // x is channel-blocked ([n][C / nr][H][W][nr]), else NHWC
};

template <typename T>
inline void prefetch_run(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / int64_t(sizeof(T))) __builtin_prefetch(p + i);
}

template <typename T>
void pack_implicit_cols_from_pixels(const void* ctx, int64_t k0, int64_t kc, int64_t j0,
                                    int64_t cols, int64_t nr, T* dst) {
  const ImplicitPixelCols<T>& src = *static_cast<const ImplicitPixelCols<T>*>(ctx);
  const ConvGeom& g = *src.g;
  const int64_t Cg = g.Cg(), pixel = src.blocked ? nr : g.C;  // values between two pixels
  // The panel's columns as runs of channels within one tap: (first column, length, offset of
  // the tap's pixel from the window corner, offset of the first channel). Blocked, the panel
  // is one run: one tap of one channel block.
  constexpr int kMaxRuns = 64;
  int64_t run_j[kMaxRuns], run_len[kMaxRuns], run_dh[kMaxRuns], run_dw[kMaxRuns], run_c[kMaxRuns];
  int runs = 0;
  for (int64_t j = 0; j < cols;) {
    const int64_t i = j0 + j, t = i / Cg, c = i % Cg, len = min64(Cg - c, cols - j);
    run_j[runs] = j;
    run_len[runs] = len;
    run_dh[runs] = (t / g.S) * g.dh;
    run_dw[runs] = (t % g.S) * g.dw;
    run_c[runs++] = src.blocked ? (c / nr) * g.H * g.W * nr + c % nr : c;
    j += len;
  }
  // Run r's values for pixel px, or null in the padding.
  const auto at = [&](const PixelWindow& px, int r) -> const T* {
    const int64_t ih = px.ih0 + run_dh[r], iw = px.iw0 + run_dw[r];
    if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return nullptr;
    return src.x + px.base + (ih * g.W + iw) * pixel + run_c[r];
  };
  for (int64_t k = 0; k < kc; ++k) {
    if (k + kPackPrefetchPixels < kc)
      for (int r = 0; r < runs; ++r)
        if (const T* ahead = at(src.pixels[k0 + k + kPackPrefetchPixels], r))
          prefetch_run(ahead, run_len[r]);
    T* d = dst + k * nr;
    for (int r = 0; r < runs; ++r) {
      if (const T* s = at(src.pixels[k0 + k], r))
        copy_n(d + run_j[r], s, run_len[r]);
      else
        zero_n(d + run_j[r], run_len[r]);
    }
    zero_n(d + cols, nr - cols);
  }
}

// Implicit im2col for grad-weight with channel-major columns, i = c * R*S + t (torch's
// OIHW order), so the GEMM writes dW in place: no tap-major copy to permute afterwards, and
// x read in its own layout (no NHWC copy). A panel's values are single elements spread over
// each channel's plane, gathered pixel by pixel through per-column offsets: dearer per
// value than channel runs, so taken where dW outweighs the columns (tuning.h). Batch 1,
// ms, two alternating runs each, before (tap-major, dW zeroed first) / after, torch:
// 3x3/2 512 @14 2.55 1.91 / 1.59 1.59, 2.2; 3x3 512 @7 2.14 2.00 / 1.68 1.60, 2.2; 3x3/2
// 256 @28 1.50 1.35 / 1.34 1.23, 1.5; 3x3 256 @14 1.45 1.39 / 1.36 1.24, 1.4; batch 8
// (392 pixels, 512 filters) 3x3/2 512 @14 11.5 10.3 / 10.3 9.6; 3x3 512 @7 10.6 10.1 /
// 10.2 9.8.
template <typename T>
struct ChannelMajorCols {
  const ConvGeom* g;
  const T* x;                 // the group's first channel, in x's layout
  const PixelWindow* pixels;  // one per output pixel of the image group
  int64_t cs, rs, ps;         // strides in x of a channel, a row and a pixel
};

template <typename T>
void pack_channel_major_cols(const void* ctx, int64_t k0, int64_t kc, int64_t j0, int64_t cols,
                             int64_t nr, T* dst) {
  const ChannelMajorCols<T>& src = *static_cast<const ChannelMajorCols<T>*>(ctx);
  const ConvGeom& g = *src.g;
  const int64_t RS = g.R * g.S, ext_h = (g.R - 1) * g.dh, ext_w = (g.S - 1) * g.dw;
  constexpr int64_t kPiece = 64;  // columns per pass (a panel is nr <= 32 wide)
  int64_t off[kPiece], dh[kPiece], dw[kPiece];
  for (int64_t p0 = 0; p0 < cols; p0 += kPiece) {
    const int64_t n = min64(kPiece, cols - p0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = j0 + p0 + j, c = i / RS, t = i % RS;
      dh[j] = (t / g.S) * g.dh;
      dw[j] = (t % g.S) * g.dw;
      off[j] = c * src.cs + dh[j] * src.rs + dw[j] * src.ps;
    }
    for (int64_t k = 0; k < kc; ++k) {
      const PixelWindow& px = src.pixels[k0 + k];
      const int64_t at = px.base + px.ih0 * src.rs + px.iw0 * src.ps;  // the window's corner
      T* d = dst + k * nr + p0;
      if (px.ih0 >= 0 && px.ih0 + ext_h < g.H && px.iw0 >= 0 && px.iw0 + ext_w < g.W) {
        for (int64_t j = 0; j < n; ++j) d[j] = src.x[at + off[j]];
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const int64_t ih = px.ih0 + dh[j], iw = px.iw0 + dw[j];
          d[j] = ih >= 0 && ih < g.H && iw >= 0 && iw < g.W ? src.x[at + off[j]] : T(0);
        }
      }
    }
  }
  for (int64_t k = 0; k < kc; ++k) zero_n(dst + k * nr + cols, nr - cols);
}

// Whether grad-weight builds channel-major columns (pack_channel_major_cols) for an image
// group of P output pixels: where dW outweighs the columns (tuning.h), and for NCHW x of
// strided spatial kernels, whose NHWC copy (the tap-major path's) holds sh x sw input pixels
// per output pixel and cost more than the gathers. Batch 8, ms, channel-major / tap-major,
// torch, 3 interleaved rounds: 3x3/2 128 @56 11.2 / 12.8, 10.6; 3x3/2 256 @28 10.0 / 11.2,
// 10.7; batch 1 the same within 1 %. (Stride 1 stays tap-major: 3x3 64 @56 batch 1 1.58 /
// 1.46, 3x3 64>128 @112 11.4 / 10.9.)
inline bool grad_weight_channel_major(const ConvGeom& g, int64_t P, int x_layout) {
  if (is_pointwise(g)) return false;
  if (P <= g.Kg() * tuning().im2col_channel_major_grad_weight_max_pixels_per_filter) return true;
  return x_layout != kNHWC && g.R * g.S > 1 && g.sh * g.sw >= 4;
}

template <typename T>
void grad_weight(const ConvGeom& g, const T* gy, int gy_layout, const T* x, int x_layout, T* gw,
                 int nthreads) {
  const int64_t G = g.groups, Cg = g.Cg(), Kg = g.Kg(), RSC = g.R * g.S * Cg;
  const bool pointwise = is_pointwise(g);
  if (is_unpadded_1x1(g) && gy_layout == kNCHW && x_layout == kNCHW)
    return grad_weight_pointwise_nchw(g, gy, x, gw, nthreads);
  const int64_t OHW = g.OH * g.OW;
  const int64_t per_image = g.C * g.H * g.W + g.K * OHW;
  const int64_t group = images_per_group(per_image * int64_t(sizeof(T)));
  const bool channel_major = grad_weight_channel_major(g, min64(group, g.N) * OHW, x_layout);
  T* dwt = pointwise || channel_major ? gw : workspace_as<T>(kWsWeightsTapMajor, g.K * RSC);
  // The first image group's GEMMs write dwt, later ones add to it. (Zeroing it first cost a
  // third of the call on weight-bound layers: 3x3/2 512 @14, batch 1, 9 MiB memset by one
  // thread while the other waited.) Without pixels no GEMM runs.
  if (g.N * OHW == 0) std::memset(dwt, 0, sizeof(T) * g.K * RSC);
  const int64_t NR = gemm_blocking<T>().nr;
  const bool blocked = !pointwise && !channel_major && Cg % NR == 0 && x_layout != kNHWC;
  for (int64_t n0 = 0; n0 < g.N; n0 += group) {
    const int64_t n1 = min64(g.N, n0 + group);
    const NhwcView<T> v{g, n1 - n0};
    const T* gyn = gy + n0 * g.K * OHW;
    if (gy_layout != kNHWC) {
      T* buf = workspace_as<T>(kWsGradOutputNhwc, (n1 - n0) * g.K * OHW);
      scatter_to_nhwc(gyn, kNCHW, n1 - n0, g.K, g.OH, g.OW, buf, g.OH, g.OW, 0, 0, 1, 1, nthreads);
      gyn = buf;
    }
    const T* xn = x + n0 * g.C * g.H * g.W;
    if (x_layout != kNHWC && !channel_major) {
      T* buf = workspace_as<T>(kWsActivationNhwc, (n1 - n0) * g.C * g.H * g.W);
      if (blocked)  // each block of NR channels of an image as an NHWC image of NR channels
        scatter_to_nhwc(xn, kNCHW, (n1 - n0) * (g.C / NR), NR, g.H, g.W, buf, g.H, g.W, 0, 0, 1,
                        1, nthreads);
      else
        scatter_to_nhwc(xn, kNCHW, n1 - n0, g.C, g.H, g.W, buf, g.H, g.W, 0, 0, 1, 1, nthreads);
      xn = buf;
    }
    const int64_t P = v.pixels();
    PixelWindow* windows = nullptr;
    if (!pointwise) {
      windows = reinterpret_cast<PixelWindow*>(
          workspace_as<T>(kWsColumns, ceil_div(P * int64_t(sizeof(PixelWindow)), sizeof(T))));
      parallel_for(P, threads_for(P * 16, nthreads), [&](int64_t p) {
        int64_t n, ih0, iw0;
        v.locate(p, &n, &ih0, &iw0);
        windows[p] = {n * g.H * g.W * g.C, ih0, iw0};
      });
    }
    const bool x_nhwc = x_layout == kNHWC;
    for (int64_t gi = 0; gi < G; ++gi) {
      const ImplicitPixelCols<T> cols{&g, xn + gi * Cg * (blocked ? g.H * g.W : 1), windows,
                                      blocked};
      const ChannelMajorCols<T> cm_cols{&g, xn + gi * Cg * (x_nhwc ? 1 : g.H * g.W), windows,
                                        x_nhwc ? 1 : g.H * g.W, (x_nhwc ? g.C : 1) * g.W,
                                        x_nhwc ? g.C : 1};
      GemmArgs<T> a{};
      a.M = Kg;
      a.N = RSC;
      a.K = P;
      a.a = gyn + gi * Kg;  // A(k, p) = gy[p][gi*Kg + k]
      a.rs_a = 1;
      a.cs_a = g.K;
      if (pointwise) {
        a.b = xn + gi * Cg;
        a.rs_b = g.C;
        a.cs_b = 1;
      } else if (channel_major) {
        a.pack_b_panel = &pack_channel_major_cols<T>;
        a.pack_b_ctx = &cm_cols;
      } else {
        a.pack_b_panel = &pack_implicit_cols_from_pixels<T>;
        a.pack_b_ctx = &cols;
      }
      a.c = dwt + gi * Kg * RSC;
      a.ldc = RSC;
      a.accumulate = n0 > 0;  // sums every image group
      gemm(a, nthreads);
    }
  }
  if (!pointwise && !channel_major) permute_taps(dwt, g.K, Cg, g.R * g.S, gw, false, nthreads);
}

// Mirrors the workspace_as calls above (GEMM panels included), NCHW tensors assumed.
template <typename T>
int64_t workspace_bytes(const ConvGeom& g, Pass pass) {
  constexpr int64_t E = sizeof(T);
  const int64_t Cg = g.Cg(), Kg = g.Kg(), RSC = g.R * g.S * Cg, OHW = g.OH * g.OW;
  const int64_t image_in = g.C * g.H * g.W, image_out = g.K * OHW;
  const bool pointwise = is_pointwise(g);
  const int64_t tap_major = g.R * g.S > 1 ? g.K * RSC * E : 0;
  const int64_t native_n = pointwise ? g.N * OHW : OHW;  // one GEMM over all images or one each
  if (pass == Pass::kForward && runs_native(g, pass))  // pointwise: W packed inside the GEMM
    return pointwise ? gemm_workspace_bytes<T>(Kg, native_n, RSC, kGemmPacksBoth)
                     : tap_major + g.groups * gemm_packed_size_a<T>(Kg, RSC) * E +
                           gemm_workspace_bytes<T>(Kg, native_n, RSC, kGemmAPrepacked);
  if (pass == Pass::kGradInput && pointwise && runs_native(g, pass))  // natively on NCHW tensors
    return gemm_workspace_bytes<T>(Cg, native_n, Kg, kGemmPacksBoth);
  if (pass == Pass::kGradInput && grad_input_col2im(g)) {  // natively, through (c, r, s) columns
    const int64_t images = chunk_rows<T>(RSC * OHW, g.N);
    return (gemm_packed_size_a<T>(RSC, Kg) + images * RSC * OHW) * E +
           gemm_workspace_bytes<T>(RSC, images * OHW, Kg, kGemmAPrepacked | kGemmFewerColumns);
  }
  if (pass == Pass::kGradWeight && is_unpadded_1x1(g)) {
    // The other threads' partial sums or the GEMM's panels, and a strided one's subsampled
    // images.
    // (A call with fewer threads than OpenMP's maximum may take either.)
    const int nt = pointwise_grad_weight_threads(g, omp_get_max_threads());
    const int64_t pixels = g.N * OHW;
    const int64_t sums = max64((nt - 1) * g.K * Cg * E,
                               gemm_workspace_bytes<T>(Kg, Cg, pixels, kGemmPacksBoth));
    const bool strided = g.sh > 1 || g.sw > 1;
    const int64_t sub = strided ? min64(g.N, images_per_group(g.C * OHW * E)) * g.C * OHW * E : 0;
    return sums + sub;
  }
  // The NHWC passes convert a group of images (all of both tensors' images) at a time and
  // cut its pixels into column chunks.
  const int64_t images = min64(g.N, images_per_group((image_in + image_out) * E));
  const int64_t P = images * OHW, rows = pointwise ? P : chunk_rows<T>(RSC, P);
  const int64_t layouts = images * (image_in + image_out) * E, columns = pointwise ? 0 : rows * RSC * E;
  switch (pass) {
    case Pass::kForward:
      return tap_major + layouts + columns + g.groups * gemm_packed_size_b<T>(RSC, Kg) * E +
             gemm_workspace_bytes<T>(rows, Kg, RSC, kGemmBPrepacked);
    case Pass::kGradInput:  // its B packed straight from OIHW (no tap-major copy)
      return layouts + columns + gemm_packed_size_b<T>(Kg, RSC) * E +
             gemm_workspace_bytes<T>(rows, RSC, Kg, kGemmBPrepacked);
    case Pass::kGradWeight: {  // pixel windows instead of columns, one GEMM per group
      // Channel-major: no tap-major dW, and x read in place (grad_y still converted).
      const bool cm = grad_weight_channel_major(g, P, kNCHW);
      return (pointwise || cm ? 0 : g.K * RSC * E) + (cm ? images * image_out * E : layouts) +
             (pointwise ? 0 : round_up(P * int64_t(sizeof(PixelWindow)), E)) +
             gemm_workspace_bytes<T>(Kg, RSC, P, kGemmPacksBoth);
    }
  }
  return 0;
}

}  // namespace

template <typename T>
ConvKernels<T> im2col_kernels() {
  return ConvKernels<T>::all(&forward<T>, &grad_input<T>, &grad_weight<T>, &workspace_bytes<T>)
      .with_packing(&weight_packing<T>, &pack_forward_weights<T>);
}

template ConvKernels<float> im2col_kernels<float>();
template ConvKernels<double> im2col_kernels<double>();

}  // namespace FASTCONV_ISA
}  // namespace fastconv
