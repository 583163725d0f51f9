// Grouped convolution with few channels per group (ResNeXt's 4-32, RegNet's 8-24), for one
// ISA. The direct kernel fills its vectors with one group's output channels (4 of 16 lanes
// at 4 per group) and the packed GEMM per group has Kg rows: both waste most of the machine.
// Here vectors run along the output pixels, as depthwise's NCHW kernels do, so every lane
// is useful whatever the group's size:
//
//   * Forward: per (image, group), the group's Cg input planes staged once as flat
//     stride-phase sub-planes (plane_staging.h: the whole output plane is one run of
//     vectors, full even on 7x7 maps), then register tiles of KT output channels x UV
//     vectors of that run: per input channel and tap, UV unaligned loads feed KT x UV FMAs
//     with broadcast weights. Each tile's outputs go to a per-thread plane, whose rows are
//     then copied (NCHW) or transposed (channels_last) into y.
//   * channels_last input: the group's channels transposed into planes before staging.
//   * Grad-input: per stride phase, a stride-1 grouped forward over grad_y with the taps that
//     reach the phase, each group's filters transposed and rotated.
//   * Grad-weight: a thread owns whole groups (no reduction across threads); images staged
//     row by row in chunks, tiles of KT output channels x TS taps of one input channel
//     summed along the rows of every image of the chunk.
#include <vector>

#include "../common/layout.h"
#include "../common/plane_staging.h"
#include "../common/simd.h"
#include "../common/transpose.h"
#include "../common/workspace.h"
#include "../isa/kernel_table.h"

namespace fastconv {
namespace FASTCONV_ISA {

namespace {

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

// A tile of KT channels x UV vectors holds KT * UV accumulators, UV input vectors and one
// broadcast weight in registers.
constexpr int kMaxTileVectors = 6;
constexpr bool tile_fits(int KT, int UV) { return KT * UV + UV + 1 <= kVectorRegisters; }

// The tile shape for a group of Kg output channels: KT (a power of two, up to 8) as large as
// Kg allows, then as many vectors as fit (AVX-512: 8 x 3, 4 x 6; AVX2: 8 x 1, 4 x 3). KT x UV
// FMAs per tap take KT broadcasts and UV loads.
struct TileShape {
  int kt, uv;
};
inline TileShape tile_shape(int64_t Kg) {
  int kt = 1;
  while (2 * kt <= 8 && 2 * kt <= Kg) kt *= 2;
  int uv = 1;
  while (uv < kMaxTileVectors && tile_fits(kt, uv + 1)) ++uv;
  return {kt, uv};
}

// What a tile reads and writes, for channels [k0, k0 + KT) of one group.
template <typename T>
struct TileArgs {
  const T* x;            // the group's staged input at flat output 0 of channel 0
  int64_t channel_stride;  // between the staged inputs of consecutive channels
  int64_t channels;      // Cg
  const int64_t* taps;   // `ntaps` offsets of the taps' reads (FlatStaging::tap_offset)
  int64_t ntaps;
  const T* w;            // the tile's filters packed [c][tap][j] (pack_tiles)
  const T* bias;         // KT values, or null
  int act;
  T* out;                // flat output of channel k0 + j at out + j * out_stride
  int64_t out_stride;
};

// Flat outputs [f0, f0 + n), n <= UV * lanes.
template <typename T, int KT, int UV>
void flat_tile(const TileArgs<T>& a, int64_t f0, int64_t n) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  V acc[KT][UV];
  for (int j = 0; j < KT; ++j) {
    const V b = a.bias ? V::broadcast(a.bias + j) : V::zero();
    for (int u = 0; u < UV; ++u) acc[j][u] = b;
  }
  // One pointer walks the KT weights of each tap (a pointer per channel ran out of general
  // registers: 16-channel tiles moved each from an xmm register before its FMA, 1.5x slower),
  // and the taps' offsets are precomputed (the staging's formula divides).
  const T* wt = a.w;
  const T* xc = a.x + f0;
  for (int64_t c = 0; c < a.channels; ++c, xc += a.channel_stride) {
    for (int64_t t = 0; t < a.ntaps; ++t, wt += KT) {
      const T* src = xc + a.taps[t];
      V xv[UV];
      for (int u = 0; u < UV; ++u) xv[u] = V::load(src + u * L);
      for (int j = 0; j < KT; ++j) {
        const V wv = V::broadcast(wt + j);
        for (int u = 0; u < UV; ++u) acc[j][u] = fmadd(wv, xv[u], acc[j][u]);
      }
    }
  }
  alignas(64) T buf[UV * L];
  for (int j = 0; j < KT; ++j) {
    T* o = a.out + j * a.out_stride + f0;
    for (int u = 0; u < UV; ++u) acc[j][u] = activate(acc[j][u], a.act);
    if (n == UV * L) {
      for (int u = 0; u < UV; ++u) acc[j][u].store(o + u * L);
    } else {
      for (int u = 0; u < UV; ++u) acc[j][u].store(buf + u * L);
      copy_n(o, buf, n);
    }
  }
}

template <typename T>
using TileFn = void (*)(const TileArgs<T>&, int64_t, int64_t);

template <typename T, int KT, int UV>
constexpr TileFn<T> tile_or_null() {
  if constexpr (tile_fits(KT, UV)) return &flat_tile<T, KT, UV>;
  return nullptr;
}

template <typename T, int KT>
TileFn<T> tile_for_vectors(int uv) {
  switch (uv) {
    case 1: return tile_or_null<T, KT, 1>();
    case 2: return tile_or_null<T, KT, 2>();
    case 3: return tile_or_null<T, KT, 3>();
    case 4: return tile_or_null<T, KT, 4>();
    case 5: return tile_or_null<T, KT, 5>();
    default: return tile_or_null<T, KT, 6>();
  }
}

// The tile kernel for kt channels (a power of two <= 8) x uv vectors.
template <typename T>
TileFn<T> tile_kernel(int kt, int uv) {
  switch (kt) {
    case 1: return tile_for_vectors<T, 1>(uv);
    case 2: return tile_for_vectors<T, 2>(uv);
    case 4: return tile_for_vectors<T, 4>(uv);
    default: return tile_for_vectors<T, 8>(uv);
  }
}

// Each group's output channels in tiles of kt_max, then smaller powers of two.
template <typename F>
void for_each_channel_tile(int64_t Kg, int kt_max, F body) {
  for (int64_t k0 = 0; k0 < Kg;) {
    int kt = kt_max;
    while (kt > Kg - k0) kt /= 2;
    body(k0, kt);
    k0 += kt;
  }
}

// The filters of the tile of kt channels starting at channel k packed [c][tap][j] at
// wp + k * Cg * R * S (the tiles partition each group's channels, so the packed weights take
// the OIHW tensor's size). filter(k, i): value i (c-major, then r, then s) of channel k's
// filter; the OIHW tensor for a forward, each phase's turned taps for grad-input (packed
// straight from w, no turned copy).
template <typename T, typename Filter>
void pack_tiles(const ConvGeom& g, int kt_max, T* wp, int nthreads, Filter filter) {
  const int64_t CRS = g.Cg() * g.R * g.S, Kg = g.Kg();
  parallel_for(g.groups, threads_for(g.K * CRS * 4, nthreads), [&](int64_t grp) {
    for_each_channel_tile(Kg, kt_max, [&](int64_t k0, int kt) {
      const int64_t k = grp * Kg + k0;
      for (int j = 0; j < kt; ++j)
        for (int64_t i = 0; i < CRS; ++i) wp[k * CRS + i * kt + j] = filter(k + j, i);
    });
  });
}

// Sums of v and v^2 over n values, vectorised.
template <typename T>
void sum_and_squares(const T* p, int64_t n, double* s, double* q) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  V vs = V::zero(), vq = V::zero();
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V v = V::load(p + i);
    vs = add(vs, v);
    vq = fmadd(v, v, vq);
  }
  double ts = hsum(vs), tq = hsum(vq);
  for (; i < n; ++i) {
    ts += p[i];
    tq += double(p[i]) * p[i];
  }
  *s = ts, *q = tq;
}

// Image n's input channels of group grp as Cg contiguous H x W planes: in x itself (NCHW),
// or transposed into `buf` (channels_last; Cg * H * W values).
template <typename T>
const T* group_planes(const ConvGeom& g, const T* x, int x_layout, int64_t n, int64_t grp,
                      T* buf) {
  constexpr int B = kTransposeBlock;
  const int64_t HW = g.H * g.W, Cg = g.Cg();
  if (x_layout == kNCHW) return x + (n * g.C + grp * Cg) * HW;
  const T* xi = x + n * HW * g.C + grp * Cg;
  for (int64_t p0 = 0; p0 < HW; p0 += B)
    for (int64_t c0 = 0; c0 < Cg; c0 += B)
      transpose_block(xi + p0 * g.C + c0, g.C, buf + c0 * HW + p0, HW, int(min64(B, HW - p0)),
                      int(min64(B, Cg - c0)));
  return buf;
}

// Where output (n, k, oh, ow) goes: y + n image + k channel + oh row + ow col (elements).
// A forward's NCHW or NHWC tensor, or one stride phase of grad-input's grad_x.
template <typename T>
struct OutputView {
  T* y;
  int64_t image, channel, row, col;
  static OutputView dense(const ConvGeom& g, T* y, int layout) {
    if (layout == kNCHW) return {y, g.K * g.OH * g.OW, g.OH * g.OW, g.OW, 1};
    return {y, g.OH * g.OW * g.K, 1, g.OW * g.K, g.K};
  }
};

// The forward of g into y, its filters given by filter(k, i) (pack_tiles).
template <typename T, typename Filter>
void forward_into(const ConvGeom& g, const T* x, int x_layout, Filter filter,
                  const Epilogue<T>& epi, const OutputView<T>& y, int nthreads) {
  constexpr int L = Vec<T>::lanes, B = kTransposeBlock;
  const int64_t Cg = g.Cg(), Kg = g.Kg(), RS = g.R * g.S, HW = g.H * g.W;
  const TileShape shape = tile_shape(Kg);
  const FlatStaging st(g, L);  // the last tile of a run computes whole vectors
  const int64_t phases = g.sh * g.sw, staged = Cg * phases * st.sub;
  const int64_t run = g.OH * st.pitch;  // flat outputs, junk columns included
  const int64_t x_copy = x_layout == kNHWC ? Cg * HW : 0;
  T* wp = workspace_as<T>(kWsPackedWeights, g.K * Cg * RS);
  pack_tiles(g, shape.kt, wp, nthreads, filter);
  std::vector<int64_t> taps(RS);
  for (int64_t t = 0; t < RS; ++t) taps[t] = st.tap_offset(g, t / g.S, t % g.S);
  parallel_for(g.N * g.groups, threads_for(g.flops(), nthreads), [&](int64_t item) {
    const int64_t n = item / g.groups, grp = item % g.groups, k_first = grp * Kg;
    T* planes = thread_scratch<T>(staged + x_copy + Kg * st.flat);
    T* out = planes + staged + x_copy;  // [Kg][flat]
    const T* xs = group_planes(g, x, x_layout, n, grp, planes + staged);
    for (int64_t c = 0; c < Cg; ++c) stage_flat(g, st, xs + c * HW, planes + c * phases * st.sub);
    TileArgs<T> a{planes, phases * st.sub, Cg, taps.data(), RS, nullptr, nullptr, epi.act,
                  nullptr, st.flat};
    for_each_channel_tile(Kg, shape.kt, [&](int64_t k0, int kt) {
      a.w = wp + (k_first + k0) * Cg * RS;
      a.bias = epi.shift ? epi.shift + k_first + k0 : nullptr;
      a.out = out + k0 * st.flat;
      for (int64_t f0 = 0; f0 < run; f0 += shape.uv * L) {
        const int64_t n_out = min64(shape.uv * L, run - f0);
        tile_kernel<T>(kt, int(ceil_div(n_out, L)))(a, f0, n_out);
      }
    });
    for (int64_t k = 0; epi.stats.sum && k < Kg; ++k) {
      double s = 0, q = 0;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        double rs, rq;
        sum_and_squares(out + k * st.flat + oh * st.pitch, g.OW, &rs, &rq);
        s += rs, q += rq;
      }
      add_stats(epi.stats, k_first + k, s, q);
    }
    T* yn = y.y + n * y.image + k_first * y.channel;
    if (y.channel != 1) {  // channel-major: rows of pixels
      for (int64_t k = 0; k < Kg; ++k)
        for (int64_t oh = 0; oh < g.OH; ++oh)
          store_strided_n(yn + k * y.channel + oh * y.row, out + k * st.flat + oh * st.pitch,
                          g.OW, y.col);
      return;
    }
    for (int64_t oh = 0; oh < g.OH; ++oh)  // pixel-major: rows of channels
      for (int64_t ow0 = 0; ow0 < g.OW; ow0 += B)
        for (int64_t k0 = 0; k0 < Kg; k0 += B)
          transpose_block(out + k0 * st.flat + oh * st.pitch + ow0, st.flat,
                          yn + oh * y.row + ow0 * y.col + k0, y.col, int(min64(B, Kg - k0)),
                          int(min64(B, g.OW - ow0)));
  });
}

template <typename T>
void forward(const ConvGeom& g, const T* x, int x_layout, const T* w, const T*,
             const Epilogue<T>& epi, T* y, int y_layout, int nthreads) {
  const int64_t CRS = g.Cg() * g.R * g.S;
  forward_into(g, x, x_layout, [&](int64_t k, int64_t i) { return w[k * CRS + i]; }, epi,
               OutputView<T>::dense(g, y, y_layout), nthreads);
}

// ---------------------------------------------------------------------------------------
// Grad-input
// ---------------------------------------------------------------------------------------

// Per stride phase (problem.h), a grouped forward over grad_y writing the phase's
// positions of grad_x in place (OutputView).
template <typename T>
void grad_input(const ConvGeom& g, const T* gy, int gy_layout, const T* w, T* gx, int gx_layout,
                int nthreads) {
  const int64_t Cg = g.Cg(), Kg = g.Kg(), RS = g.R * g.S;
  for (int64_t a = 0; a < g.sh; ++a) {
    for (int64_t b = 0; b < g.sw; ++b) {
      const PhaseAxis ph = phase_axis(a, g.sh, g.dh, g.pt, g.R, g.H);
      const PhaseAxis pw = phase_axis(b, g.sw, g.dw, g.pl, g.S, g.W);
      const ConvGeom d = phase_geometry(g, ph, pw);
      if (d.OH == 0 || d.OW == 0) continue;
      // The phase's positions of grad_x: rows a + i sh, columns b + j sw.
      const int64_t pixel = gx_layout == kNCHW ? 1 : g.C;
      const OutputView<T> out{gx + (a * g.W + b) * pixel, g.C * g.H * g.W,
                              gx_layout == kNCHW ? g.H * g.W : 1, g.sh * g.W * pixel,
                              g.sw * pixel};
      if (d.R == 0 || d.S == 0) {  // no tap reaches this phase
        parallel_for(g.N * g.C, threads_for(g.N * g.C * d.OH * d.OW * 4, nthreads),
                     [&](int64_t nc) {
          T* base = out.y + nc / g.C * out.image + nc % g.C * out.channel;
          for (int64_t i = 0; i < d.OH; ++i)
            for (int64_t j = 0; j < d.OW; ++j) base[i * out.row + j * out.col] = T(0);
        });
        continue;
      }
      // Filter of phase output channel oc = grp * Cg + c, value (k, j, i): tap
      // (last_h - j step_h, last_w - i step_w) of w[grp * Kg + k][c].
      const int64_t taps = d.R * d.S;
      auto turned = [&](int64_t oc, int64_t v) {
        const int64_t grp = oc / Cg, c = oc % Cg, k = v / taps, j = v % taps / d.S;
        const int64_t i = v % d.S;
        return w[((grp * Kg + k) * Cg + c) * RS + (ph.last - j * ph.tap_step) * g.S +
                 pw.last - i * pw.tap_step];
      };
      forward_into(d, gy, gy_layout, turned, Epilogue<T>(), out, nthreads);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Grad-weight
// ---------------------------------------------------------------------------------------

// Whether p[0, n) holds no infinity or NaN (x * 0 is NaN exactly for those).
template <typename T>
bool all_finite(const T* p, int64_t n) {
  using V = Vec<T>;
  const V zero = V::zero();
  V acc = zero;
  int64_t i = 0;
  for (; i + V::lanes <= n; i += V::lanes) acc = fmadd(V::load(p + i), zero, acc);
  T s = hsum(acc);
  for (; i < n; ++i) s += p[i] * T(0);
  return s == T(0);
}

// Register tile: KT output channels x TS taps of one input channel (KT * TS accumulators,
// TS input vectors and one grad_y vector).
constexpr int kGradTaps = 4;
// Channels per tile: 8 x 3 taps (AVX-512) where the group has 8, else 4 x 4; AVX2 2 x 4.
constexpr int kGradChannels = kVectorRegisters >= 32 ? 4 : 2;
constexpr int kGradWideChannels = kVectorRegisters >= 32 ? 8 : 2;
// Images staged together: their sums stay in the tile's registers across the images, so a
// tile's horizontal sums are paid once per chunk, not per image (7x7 maps: a tile's work
// per image is 7 rows of one vector, less than its 16 horizontal sums). Chunks are kept
// within ~L2 (1 MiB here).
constexpr int64_t kGradChunkBytes = int64_t(512) << 10;

// A chunk of images of one group, staged: input planes [image][c] (PlaneStaging layout,
// `plane` values each) and grad_y planes [image][k][OH][OWp] (rows padded with zeros to
// whole vectors).
template <typename T>
struct GradChunk {
  const PlaneStaging* st;
  const T* x;
  int64_t plane, x_image;
  const T* gy;
  int64_t OWp, gy_image;
  int64_t images;
  bool finite;  // every staged x is finite: the rows' last vectors need no masking
};

// gw[k0 + j][c][t0 + i] += sum over the chunk's images, rows and columns of
// grad_y[k0 + j] * x[c] at tap t0 + i, for j < KT, i < TS.
template <typename T, int KT, int TS>
void grad_weight_tile(const ConvGeom& g, const GradChunk<T>& ch, int64_t c, int64_t k0,
                      int64_t t0, T* gw, int64_t gw_stride) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  alignas(64) T xbuf[L];
  V acc[KT][TS];
  for (int j = 0; j < KT; ++j)
    for (int i = 0; i < TS; ++i) acc[j][i] = V::zero();
  int64_t off[TS];
  for (int i = 0; i < TS; ++i) off[i] = ch.st->tap_offset(g, (t0 + i) / g.S, (t0 + i) % g.S);
  const int64_t row_step = g.sh * ch.st->row_elems, OWp = ch.OWp, gy_k = g.OH * OWp;
  // Past OW grad_y is zero, so whole vectors are exact where x is finite there. Otherwise
  // (0 * inf) the rows' last vectors read x with their lanes past OW zeroed, in a loop of
  // their own after the whole vectors' (one loop with both kept its accumulators on the
  // stack: 1.4x slower; the masked loop itself spills: 256 g32 @28, batch 8, 1 thread,
  // 8.0 ms masked, 6.0 ms unmasked).
  const int64_t full = ch.finite ? OWp : g.OW / L * L, tail = g.OW - min64(full, g.OW);
  for (int64_t img = 0; img < ch.images; ++img) {
    const T* xrow = ch.x + img * ch.x_image + c * ch.plane;
    const T* gyrow = ch.gy + img * ch.gy_image + k0 * gy_k;
    for (int64_t oh = 0; oh < g.OH; ++oh, xrow += row_step, gyrow += OWp) {
      for (int64_t ow0 = 0; ow0 < full; ow0 += L) {
        V xv[TS];
        for (int i = 0; i < TS; ++i) xv[i] = V::load(xrow + off[i] + ow0);
        for (int j = 0; j < KT; ++j) {
          const V gv = V::load(gyrow + j * gy_k + ow0);
          for (int i = 0; i < TS; ++i) acc[j][i] = fmadd(gv, xv[i], acc[j][i]);
        }
      }
    }
  }
  for (int64_t img = 0; tail && img < ch.images; ++img) {
    const T* xrow = ch.x + img * ch.x_image + c * ch.plane + full;
    const T* gyrow = ch.gy + img * ch.gy_image + k0 * gy_k + full;
    for (int64_t oh = 0; oh < g.OH; ++oh, xrow += row_step, gyrow += OWp) {
      V xv[TS];
      for (int i = 0; i < TS; ++i) xv[i] = load_first(xrow + off[i], tail, xbuf);
      for (int j = 0; j < KT; ++j) {
        const V gv = V::load(gyrow + j * gy_k);
        for (int i = 0; i < TS; ++i) acc[j][i] = fmadd(gv, xv[i], acc[j][i]);
      }
    }
  }
  for (int j = 0; j < KT; ++j)
    for (int i = 0; i < TS; ++i) gw[(k0 + j) * gw_stride + c * g.R * g.S + t0 + i] += hsum(acc[j][i]);
}

template <typename T, int KT>
void grad_weight_tiles(const ConvGeom& g, const GradChunk<T>& ch, int64_t c, int64_t k0, T* gw,
                       int64_t gw_stride) {
  // The taps in near-equal tiles of at most TS_MAX (3 x 3: 3 + 3 + 3, not 4 + 4 + 1: a
  // 1-tap tile costs most of a full one's loads and loop).
  constexpr int TS_MAX = KT > 4 ? 3 : kGradTaps;
  const int64_t RS = g.R * g.S, tiles = ceil_div(RS, TS_MAX);
  for (int64_t i = 0, t0 = 0; i < tiles; ++i) {
    const int64_t ts = RS / tiles + (i < RS % tiles ? 1 : 0);
    switch (ts) {
      case 4:
        if constexpr (TS_MAX >= 4) grad_weight_tile<T, KT, 4>(g, ch, c, k0, t0, gw, gw_stride);
        break;
      case 3: grad_weight_tile<T, KT, 3>(g, ch, c, k0, t0, gw, gw_stride); break;
      case 2: grad_weight_tile<T, KT, 2>(g, ch, c, k0, t0, gw, gw_stride); break;
      default: grad_weight_tile<T, KT, 1>(g, ch, c, k0, t0, gw, gw_stride); break;
    }
    t0 += ts;
  }
}

template <typename T>
void grad_weight(const ConvGeom& g, const T* gy, int gy_layout, const T* x, int x_layout, T* gw,
                 int nthreads) {
  constexpr int L = Vec<T>::lanes, B = kTransposeBlock;
  const int64_t Cg = g.Cg(), Kg = g.Kg(), RS = g.R * g.S, OHW = g.OH * g.OW, HW = g.H * g.W;
  const int64_t OWp = round_up(g.OW, L);
  const PlaneStaging st(g, L);
  const int64_t plane = st.rows * st.row_elems, x_image = Cg * plane;
  const int64_t gy_image = Kg * g.OH * OWp;
  const int64_t chunk = max64(1, min64(g.N, kGradChunkBytes / int64_t(sizeof(T)) /
                                                 (x_image + gy_image)));
  // Staged planes back to back: stage_plane uses one row past its plane as scratch (the
  // next plane's start, not staged yet, or after the last one more row).
  const int64_t staged = chunk * x_image + st.row_elems;
  const int64_t x_copy = x_layout == kNHWC ? Cg * HW : 0;
  parallel_for(g.groups, threads_for(g.flops(), nthreads), [&](int64_t grp) {
    T* buf = thread_scratch<T>(staged + x_copy + chunk * gy_image);
    T* gyp = buf + staged + x_copy;
    T* gwg = gw + grp * Kg * Cg * RS;
    zero_n(gwg, Kg * Cg * RS);
    for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
      const int64_t images = min64(chunk, g.N - n0);
      bool finite = true;
      for (int64_t img = 0; img < images; ++img) {
        const int64_t n = n0 + img;
        const T* xs = group_planes(g, x, x_layout, n, grp, buf + staged);
        finite = finite && all_finite(xs, Cg * HW);
        for (int64_t c = 0; c < Cg; ++c)
          stage_plane(g, st, xs + c * HW, buf + img * x_image + c * plane);
        T* gyi = gyp + img * gy_image;
        for (int64_t k = 0; k < Kg; ++k)
          for (int64_t oh = 0; oh < g.OH; ++oh) {
            T* row = gyi + (k * g.OH + oh) * OWp;
            if (gy_layout == kNCHW)
              copy_n(row, gy + (n * g.K + grp * Kg + k) * OHW + oh * g.OW, g.OW);
            zero_n(row + g.OW, OWp - g.OW);
          }
        if (gy_layout == kNCHW) continue;
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const T* src = gy + (n * OHW + oh * g.OW) * g.K + grp * Kg;
          for (int64_t ow0 = 0; ow0 < g.OW; ow0 += B)
            for (int64_t k0 = 0; k0 < Kg; k0 += B)
              transpose_block(src + ow0 * g.K + k0, g.K, gyi + (k0 * g.OH + oh) * OWp + ow0,
                              g.OH * OWp, int(min64(B, g.OW - ow0)), int(min64(B, Kg - k0)));
        }
      }
      const GradChunk<T> ch{&st, buf, plane, x_image, gyp, OWp, gy_image, images, finite};
      for (int64_t c = 0; c < Cg; ++c) {
        int64_t k0 = 0;
        for (; k0 + kGradWideChannels <= Kg; k0 += kGradWideChannels)
          grad_weight_tiles<T, kGradWideChannels>(g, ch, c, k0, gwg, Cg * RS);
        for (; k0 + kGradChannels <= Kg; k0 += kGradChannels)
          grad_weight_tiles<T, kGradChannels>(g, ch, c, k0, gwg, Cg * RS);
        for (; k0 < Kg; ++k0) grad_weight_tiles<T, 1>(g, ch, c, k0, gwg, Cg * RS);
      }
    }
  });
}

// Mirrors the workspace_as calls above (beside them each thread keeps its scratch).
template <typename T>
int64_t workspace_bytes(const ConvGeom& g, Pass pass) {
  const int64_t weights = int64_t(sizeof(T)) * g.K * g.Cg() * g.R * g.S;
  if (pass == Pass::kForward) return weights;  // packed
  if (pass == Pass::kGradWeight) return 0;
  return weights;  // packed per phase
}

}  // namespace

template <typename T>
ConvKernels<T> grouped_kernels() {
  return ConvKernels<T>::all(&forward<T>, &grad_input<T>, &grad_weight<T>, &workspace_bytes<T>);
}
template ConvKernels<float> grouped_kernels<float>();
template ConvKernels<double> grouped_kernels<double>();

}  // namespace FASTCONV_ISA
}  // namespace fastconv
