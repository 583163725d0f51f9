// Depthwise convolution (groups == input channels; output channel k = c * m + j reads input
// channel c = k / m, multiplier m), for one ISA (compiled once per ISA, see simd.h). The
// generic direct kernel fills its vectors with output channels of one group, which for
// depthwise layers is m of them: mostly empty lanes. Here every lane does useful work:
//
//   * NCHW, float, 3x3 and 5x5 at stride 1 or 2, rows over half a vector: register tiles
//     of output rows x one vector along the width, each input row loaded once per vector for
//     all the tile's rows, straight from x (masked loads at the edges).
//   * NCHW, other rows of 2+ vectors: vectors along the output width, one (image, channel)
//     plane at a time, staged once into zero-bordered rows split into `stride` phases, so
//     every tap is one unaligned vector load; the tap weights are broadcast.
//   * NCHW, narrower maps: blocks of `lanes` channels transposed into NHWC tiles in L1 and
//     run by the channels_last row kernel; multipliers, channel tails and tiles too large for
//     L1 run flat (the whole plane as one run of vectors over stride-phase sub-planes).
//   * channels_last: vectors along the channels (as XNNPACK and oneDNN do), one output row at
//     a time, weights packed [tap][k]; taps outside the input read a zero vector. With a
//     multiplier > 1 each vector of output channels gathers its input channels.
//   * Grad-input: stride-1, multiplier-1 layers as a forward with rotated filters; NCHW
//     float stride-2 3x3 / 5x5 by stride phases in register tiles; channels_last ones
//     strided 2 along the width (3 or 5 taps there) by column phases, vectors along the
//     channels; other strided ones by scatter in channel blocks; the rest by the direct
//     kernel.
//   * Grad-weight: one output channel per work item (no reduction across threads), in the
//     NCHW forward's tiles turned around where they apply, else with its R*S sums vectorised
//     along the staged planes' rows; 7-wide maps in channel blocks.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/layout.h"
#include "../common/plane_staging.h"
#include "../common/simd.h"
#include "../common/transpose.h"
#include "../common/tuning.h"
#include "../common/workspace.h"
#include "../isa/kernel_table.h"

namespace fastconv {
namespace FASTCONV_ISA {

template <typename T> ConvKernels<T> direct_kernels();  // grad-input outside our domain

namespace {

// Register tiles: NCHW, vectors along the row; NHWC, channel vectors x output pixels.
constexpr int kRowVectors = 4;
constexpr int kChannelVectors = 4;
// Output pixels per NHWC register tile of KV channel vectors: as many as the registers hold
// beside the KV weights (at most 8). 32 channels @112 with 4 pixels: 0.82-0.94 ms, batch 8.
constexpr int pixels_per_tile(int KV) {
  const int fit = (kVectorRegisters - KV - 2) / KV;
  return fit > 8 ? 8 : fit < 1 ? 1 : fit;
}

// ---------------------------------------------------------------------------------------
// Packed weights
// ---------------------------------------------------------------------------------------

// wp[tap][k] = w[k][0][tap], K rounded up to whole register tiles (zeros).
template <typename T>
int64_t packed_channels(const ConvGeom& g) {
  return round_up(g.K, int64_t(kChannelVectors) * Vec<T>::lanes);
}

// The packing the weight cache keeps: none for NCHW tensors (the row kernels broadcast
// w's taps; the channel-block paths pack per call, see packed_for_blocks).
template <typename T>
WeightPacking weight_packing(const ConvGeom& g, int x_layout, int y_layout) {
  if (x_layout == kNCHW && y_layout == kNCHW) return {};  // reads w as it is
  return {g.R * g.S * packed_channels<T>(g), 0};
}

template <typename T>
void pack_weights(const ConvGeom& g, int, int, const T* w, T* wp, int nthreads) {
  const int64_t RS = g.R * g.S, Kp = packed_channels<T>(g);
  parallel_for(RS, threads_for(RS * Kp * 4, nthreads), [&](int64_t t) {
    for (int64_t k = 0; k < Kp; ++k) wp[t * Kp + k] = k < g.K ? w[k * RS + t] : T(0);
  });
}

// w packed as above into the workspace, for the NCHW channel-block paths (once per call, not
// once per image and block).
template <typename T>
const T* packed_for_blocks(const ConvGeom& g, const T* w, int nthreads) {
  T* wp = workspace_as<T>(kWsPackedWeights, g.R * g.S * packed_channels<T>(g));
  pack_weights(g, kNCHW, kNCHW, w, wp, nthreads);
  return wp;
}

// The bias as whole vectors of Kp values (zeros past K, or everywhere without a bias).
template <typename T>
std::vector<T> padded_bias(const Epilogue<T>& epi, int64_t K, int64_t Kp) {
  std::vector<T> bias(Kp, T(0));
  if (epi.shift) std::memcpy(bias.data(), epi.shift, sizeof(T) * K);
  return bias;
}

// ---------------------------------------------------------------------------------------
// NCHW: vectors along the width
// ---------------------------------------------------------------------------------------

// Output row `oh` of plane (n, k): y[ow] = bias + sum_{r,s} w[r][s] * x[ih(r)][ow*sw - pl +
// s*dw], from the staged plane (stage_plane), then the epilogue's activation and statistics.
template <typename T, int UV>
void nchw_row(const ConvGeom& g, const PlaneStaging& st, const T* plane, int64_t oh,
              const T* wk, const Epilogue<T>& epi, int64_t k, T* yrow) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  alignas(64) T buf[UV * L];
  const T bias = epi.shift ? epi.shift[k] : T(0);
  V row_s = V::zero(), row_q = V::zero();  // statistics of the row's whole tiles
  double tail_s = 0, tail_q = 0;           // and of its partial one
  for (int64_t ow0 = 0; ow0 < g.OW; ow0 += UV * L) {
    V acc[UV];
    for (int u = 0; u < UV; ++u) acc[u] = V::broadcast(&bias);
    for (int64_t r = 0; r < g.R; ++r) {
      for (int64_t s = 0; s < g.S; ++s) {
        const T* src = st.tap(g, plane, oh, r, s) + ow0;
        const V wv = V::broadcast(wk + r * g.S + s);
        for (int u = 0; u < UV; ++u) acc[u] = fmadd(wv, V::load(src + u * L), acc[u]);
      }
    }
    for (int u = 0; u < UV; ++u) acc[u] = activate(acc[u], epi.act);
    const int64_t n = min64(UV * L, g.OW - ow0);
    if (n == UV * L) {
      for (int u = 0; u < UV; ++u) acc[u].store(yrow + ow0 + u * L);
      for (int u = 0; epi.stats.sum && u < UV; ++u) {
        row_s = add(row_s, acc[u]);
        row_q = fmadd(acc[u], acc[u], row_q);
      }
    } else {
      for (int u = 0; u < UV; ++u) acc[u].store(buf + u * L);
      copy_n(yrow + ow0, buf, n);
      for (int64_t i = 0; epi.stats.sum && i < n; ++i) {
        tail_s += buf[i];
        tail_q += double(buf[i]) * buf[i];
      }
    }
  }
  if (epi.stats.sum) add_stats(epi.stats, k, hsum(row_s) + tail_s, hsum(row_q) + tail_q);
}


template <typename T>
void forward_nchw_tiles(const ConvGeom& g, const T* x, const T* w, const Epilogue<T>& epi, T* y,
                        int nthreads) {
  constexpr int UV = kRowVectors;
  const int64_t m = g.Kg(), planes = g.N * g.K;
  const PlaneStaging st(g, UV * Vec<T>::lanes);
  parallel_for(planes, threads_for(g.flops(), nthreads), [&](int64_t p) {
    const int64_t n = p / g.K, k = p % g.K;
    T* plane = thread_scratch<T>(st.scratch());
    stage_plane(g, st, x + (n * g.C + k / m) * g.H * g.W, plane);
    const T* wk = w + k * g.R * g.S;
    // The next plane's input, a slice per output row (see prefetch_bytes).
    const int64_t next = p + 1 < planes ? p + 1 : p, HW = g.H * g.W;
    const T* next_x = x + (next / g.K * g.C + next % g.K / m) * HW;
    const int64_t slice = ceil_div(HW, g.OH);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      prefetch_bytes(next_x + oh * slice, sizeof(T) * min64(slice, HW - oh * slice));
      nchw_row<T, UV>(g, st, plane, oh, wk, epi, k, y + (p * g.OH + oh) * g.OW);
    }
  });
}

// Output channels [k_begin, K) of every image.
template <typename T>
void forward_nchw_flat(const ConvGeom& g, const T* x, const T* w, const Epilogue<T>& epi, T* y,
                       int64_t k_begin, int nthreads) {
  using V = Vec<T>;
  constexpr int L = V::lanes, UV = kRowVectors;
  const int64_t m = g.Kg(), kn = g.K - k_begin, planes = g.N * kn, phases = g.sh * g.sw;
  const FlatStaging st(g, UV * L);
  std::vector<int64_t> tap_offset(g.R * g.S);  // sub-plane start + offset of each tap
  for (int64_t r = 0; r < g.R; ++r)
    for (int64_t s = 0; s < g.S; ++s) tap_offset[r * g.S + s] = st.tap_offset(g, r, s);
  const int64_t RS = g.R * g.S;
  parallel_for(planes, threads_for(g.flops() / g.K * kn, nthreads), [&](int64_t i) {
    const int64_t n = i / kn, k = k_begin + i % kn, p = n * g.K + k;
    T* out = thread_scratch<T>(st.flat + phases * st.sub);
    T* staged = out + st.flat;
    stage_flat(g, st, x + (n * g.C + k / m) * g.H * g.W, staged);
    const T* wk = w + k * RS;
    const T bias = epi.shift ? epi.shift[k] : T(0);
    for (int64_t f0 = 0; f0 < st.flat; f0 += UV * L) {
      V acc[UV];
      for (int u = 0; u < UV; ++u) acc[u] = V::broadcast(&bias);
      for (int64_t t = 0; t < RS; ++t) {
        const T* src = staged + tap_offset[t] + f0;
        const V wv = V::broadcast(wk + t);
        for (int u = 0; u < UV; ++u) acc[u] = fmadd(wv, V::load(src + u * L), acc[u]);
      }
      for (int u = 0; u < UV; ++u) activate(acc[u], epi.act).store(out + f0 + u * L);
    }
    T* yp = y + p * g.OH * g.OW;
    double sum = 0, sq = 0;
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      const T* row = out + oh * st.pitch;
      copy_n(yp + oh * g.OW, row, g.OW);
      for (int64_t i = 0; epi.stats.sum && i < g.OW; ++i) {
        sum += row[i];
        sq += double(row[i]) * row[i];
      }
    }
    if (epi.stats.sum) add_stats(epi.stats, k, sum, sq);
  });
}

// ---------------------------------------------------------------------------------------
// NCHW with reuse: register tiles of output rows x one vector of columns
// ---------------------------------------------------------------------------------------

// Square 3x3 or 5x5 filters, dilation 1, equal strides 1 or 2 (every depthwise layer of
// MobileNetV2 and EfficientNet). A tile computes kNchwTileRows output rows of one vector of
// L columns; each of its (rows - 1) * SW + S input rows is loaded once per vector (S
// unaligned loads at stride 1; at stride 2, ceil(S / 2) pairs of vectors split into their
// even and odd lanes) and feeds every output row whose taps reach it: 63 FMAs per 27 loads
// for 3x3 at stride 1, where the staged rows (forward_nchw_tiles) load once per FMA. The
// plane is not staged: interior columns read x, edge columns (that reach into the padding
// or past the row) by masked loads, rows outside the input a zero row. 7 rows: MobileNet's
// maps (112, 56, 28, 14, 7) are whole tiles. Batch 8, 2 threads, kernel alone, ms, staged
// rows or flat -> reuse tiles: 32 channels @112 1.13 -> 0.51; 96 @112 stride 2 3.1 -> 1.6;
// 144 @56 1.49 -> 0.89, stride 2 0.96 -> 0.32; 192 @28 0.49 -> 0.22; 576 @14 0.24 -> 0.19;
// 5x5 144 @56 2.7 -> 1.8.
constexpr int kNchwTileRows = kVectorRegisters >= 32 ? 7 : 4;

// The register-tile kernels of this section and of the stride-phase grad-input are built
// for float on the vector ISAs (float64 and the scalar build take the staged paths): their
// unrolled bodies are most of this file's compile time (the scalar build's, sanitized, over
// 10 minutes).
#if defined(FASTCONV_ISA_SCALAR)
template <typename T>
constexpr bool kTilesBuilt = false;
#else
template <typename T>
constexpr bool kTilesBuilt = std::is_same<T, float>::value;
#endif

template <typename T, int S, int SW>
struct NchwReuseShape {
  static constexpr int L = Vec<T>::lanes;
  static constexpr int rows = kNchwTileRows;
  static constexpr int in_rows = (rows - 1) * SW + S;
  // Input columns one vector of outputs reads, from its first tap's column.
  static constexpr int span = SW == 1 ? L + S - 1 : 2 * ((S - 1) / 2) + 2 * L;
};
constexpr int kNchwMaxInputRows = (kNchwTileRows - 1) * 2 + 5;

// A plane's vector columns: [0, count), of which [inside, past) read only columns inside
// the input rows; the others are edges (masked loads).
struct NchwColumns {
  int64_t count, inside, past;
  template <typename T, int S, int SW>
  static NchwColumns of(const ConvGeom& g) {
    using Shape = NchwReuseShape<T, S, SW>;
    constexpr int64_t step = SW * Shape::L, span = Shape::span;
    NchwColumns c;
    c.count = ceil_div(g.OW, Shape::L);
    c.inside = min64(ceil_div(g.pl, step), c.count);
    c.past = g.W + g.pl >= span ? max64(c.inside, min64(c.count, (g.W + g.pl - span) / step + 1))
                                : c.inside;
    return c;
  }
};

// One input row's S tap vectors for a vector of outputs whose first tap reads column c0:
// columns c0 + s + lane at stride 1; at stride 2 columns c0 + s + 2 lane, the even and odd
// lanes of pairs of vectors. Edge: columns outside [0, W) read as zeros (masked loads).
template <typename T, int S, int SW>
struct RowTaps {
  static constexpr int L = Vec<T>::lanes;
  static constexpr int loads = SW == 1 ? S : S + 1;  // per row: s, or s and s + L for even s
  static constexpr int offset(int j) { return SW == 1 ? j : j / 2 * 2 + j % 2 * L; }
  LaneMask<T> mask[loads];  // an edge vector's columns inside the input, per load
  void edge(int64_t c0, int64_t W) {
    for (int j = 0; j < loads; ++j) mask[j] = lane_mask<T>(-(c0 + offset(j)), W - (c0 + offset(j)));
  }
  template <bool Edge>
  void load(const T* row, Vec<T>* tap) const {  // row at column c0
    const auto ld = [&](int j) {
      return Edge ? load_masked(row + offset(j), mask[j]) : Vec<T>::load(row + offset(j));
    };
    if constexpr (SW == 1) {
      for (int s = 0; s < S; ++s) tap[s] = ld(s);
    } else {
      for (int s = 0; s < S; s += 2) {
        const Vec<T> a = ld(s), b = ld(s + 1);
        tap[s] = even_lanes(a, b);
        if (s + 1 < S) tap[s + 1] = odd_lanes(a, b);
      }
    }
    for (int s = 0; s < S; ++s) keep_in_register(tap[s]);
  }
};

// Whether an NCHW output of `bytes` in all, rows of `row_bytes` from plane start p, is
// written with non-temporal stores: outputs far larger than the caches, rows of whole 64-byte
// lines (other rows lose to a plane buffer streamed afterwards: 144 channels @56, batch 8,
// 2 threads, 0.75-0.81 ms stored, 0.98-1.04 buffered and streamed).
inline bool stream_nchw_rows(int64_t bytes, int64_t row_bytes, const void* p) {
  return bytes > (int64_t(8) << 20) && row_bytes % 64 == 0 &&
         reinterpret_cast<uintptr_t>(p) % 64 == 0;
}

// The input rows of the tile of output rows from oh0: x's rows, or `zeros` outside them.
template <typename T, int IR, int SW>
void tile_input_rows(const ConvGeom& g, const T* xp, const T* zeros, int64_t oh0,
                     const T** in) {
  for (int i = 0; i < IR; ++i) {
    const int64_t ih = oh0 * SW - g.pt + i;
    in[i] = ih >= 0 && ih < g.H ? xp + ih * g.W : zeros;
  }
}

// Brings [p, end) into the cache `lines` cache lines per step(), so the misses spread over
// the work between (a burst per tile of rows filled the miss buffers and stalled).
struct Prefetcher {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t lines = 0;
  Prefetcher() = default;
  // `bytes` at q over `steps` steps.
  Prefetcher(const void* q, int64_t bytes, int64_t steps)
      : Prefetcher(with_lines(q, bytes, lines_per_step(bytes, steps))) {}
  // `bytes` at q, `lines` a step (lines_per_step worked out beforehand, once per call).
  static Prefetcher with_lines(const void* q, int64_t bytes, int64_t lines) {
    Prefetcher f;
    f.p = static_cast<const char*>(q);
    f.end = f.p + (q ? bytes : 0);
    f.lines = lines;
    return f;
  }
  static int64_t lines_per_step(int64_t bytes, int64_t steps) {
    return ceil_div(ceil_div(bytes, 64), max64(steps, 1));
  }
  void step() {
    for (int64_t l = 0; l < lines && p < end; ++l, p += 64) __builtin_prefetch(p, 0, 3);
  }
  void finish() {
    for (; p < end; p += 64) __builtin_prefetch(p, 0, 3);
  }
};

template <typename T>
struct NchwTile {  // one tile's rows of one plane
  const T* in[kNchwMaxInputRows];  // input rows (x's, or a zero row), at column 0
  T* y;                            // output row oh0, at column 0
  int64_t W, OW;
  int rows;     // output rows to store (fewer than kNchwTileRows at the plane's bottom)
  const T* w;   // the plane's S x S taps
  T bias;
  ActivationBounds<T> act;
  T* stats;     // null, or L sums then L sums of squares, accumulated
  Prefetcher ahead;  // the next plane's input, a step per vector computed
  bool stream;       // outputs by non-temporal stores (see stream_nchw_rows)
};

// `count` vectors of the tile from output column ow0, whose first taps read column c0 of
// rows `in`, c0 + SW * L for the next. Edge: the vector's columns outside [0, W) read zeros
// (masked loads; a zero-bordered copy cost store-forwarding stalls on every load).
template <typename T, int S, int SW, bool Edge>
void nchw_reuse_columns(NchwTile<T>& tile, int64_t c0, int64_t ow0, int64_t count) {
  using V = Vec<T>;
  using Shape = NchwReuseShape<T, S, SW>;
  constexpr int L = V::lanes, RT = Shape::rows, IR = Shape::in_rows;
  // Whether the taps' weights stay in registers beside the accumulators and one row's input
  // vectors. If not (5x5), each FMA broadcasts its weight from memory: GCC hoisted the 25
  // broadcasts and spilled them, 57 of 175 FMAs reading a spilled vector (144 channels @56,
  // batch 8: 2.3 ms spilled, .. from memory).
  constexpr bool weights_fit = S * S + RT + S <= kVectorRegisters - 2;
  V w[weights_fit ? S * S : 1];
  for (int t = 0; weights_fit && t < S * S; ++t) w[t] = V::broadcast(tile.w + t);
  const V bias = V::broadcast(&tile.bias), lo = tile.act.lo, hi = tile.act.hi;
  const int64_t W = tile.W;
  RowTaps<T, S, SW> taps;
  for (int64_t v = 0; v < count; ++v, c0 += SW * L, ow0 += L) {
    if (Edge) taps.edge(c0, W);
    V acc[RT];
    for (int t = 0; t < RT; ++t) acc[t] = bias;
#pragma GCC unroll 32
    for (int i = 0; i < IR; ++i) {
      const T* wm = tile.w;
      if constexpr (!weights_fit) __asm__("" : "+r"(wm));  // not hoisted out of the row
      V tap[S];
      taps.template load<Edge>(tile.in[i] + c0, tap);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const int r = i - t * SW;  // the tap row input row i is for output row t
        if (r < 0 || r >= S) continue;
        for (int s = 0; s < S; ++s)
          acc[t] = fmadd(weights_fit ? w[r * S + s] : V::broadcast(wm + r * S + s), tap[s], acc[t]);
      }
    }
    const int64_t lanes = min64(L, tile.OW - ow0);
    const LaneMask<T> valid = lane_mask<T>(0, lanes);
    V sum = V::zero(), sq = V::zero();
    for (int t = 0; t < RT; ++t) {
      if (t >= tile.rows) break;
      V out = clamp(lo, hi, acc[t]);
      T* y = tile.y + t * tile.OW + ow0;
      if (lanes == L && tile.stream) {
        out.stream(y);
      } else if (lanes == L) {
        out.store(y);
      } else {  // the row's last vector: its lanes past OW are neither stored nor counted
        store_masked(y, out, valid);
        out = masked(out, valid);
      }
      if (tile.stats) {  // (unconditional sums were a fifth of a 14-wide map's time)
        sum = add(sum, out);
        sq = fmadd(out, out, sq);
      }
    }
    if (tile.stats) {
      add(V::load(tile.stats), sum).store(tile.stats);
      add(V::load(tile.stats + L), sq).store(tile.stats + L);
    }
    tile.ahead.step();
  }
}

// What every plane of a call shares, worked out once (per plane, the divisions here were a
// third of a 14-wide map's time: 384 channels @14, batch 8).
template <typename T, int S, int SW>
struct NchwPlanes {
  NchwColumns cols;
  int64_t plane_bytes, ahead_lines;  // the next plane's prefetch, per vector computed
  int64_t out_bytes, row_bytes;      // for stream_nchw_rows
  explicit NchwPlanes(const ConvGeom& g)
      : cols(NchwColumns::of<T, S, SW>(g)), plane_bytes(g.H * g.W * int64_t(sizeof(T))),
        ahead_lines(Prefetcher::lines_per_step(
            plane_bytes, ceil_div(g.OH, int64_t(kNchwTileRows)) * cols.count)),
        out_bytes(g.N * g.K * g.OH * g.OW * int64_t(sizeof(T))), row_bytes(g.OW * int64_t(sizeof(T))) {}
};

template <typename T, int S, int SW>
void nchw_reuse_plane(const ConvGeom& g, const NchwPlanes<T, S, SW>& planes, const T* xp,
                      const T* zeros, NchwTile<T>& tile, const Epilogue<T>& epi, int64_t k,
                      const T* next_x) {
  using V = Vec<T>;
  using Shape = NchwReuseShape<T, S, SW>;
  constexpr int L = V::lanes, RT = Shape::rows, IR = Shape::in_rows;
  T* const y = tile.y;
  const NchwColumns& cols = planes.cols;
  const int64_t nv = cols.count, v_in = cols.inside, v_out = cols.past, step = SW * L;
  alignas(64) T stats[2 * L];
  tile.stats = epi.stats.sum ? stats : nullptr;
  tile.ahead = Prefetcher::with_lines(next_x, planes.plane_bytes, planes.ahead_lines);
  tile.stream = stream_nchw_rows(planes.out_bytes, planes.row_bytes, y);
  for (int64_t oh0 = 0; oh0 < g.OH; oh0 += RT) {
    tile_input_rows<T, IR, SW>(g, xp, zeros, oh0, tile.in);
    tile.y = y + oh0 * g.OW;
    tile.rows = int(min64(RT, g.OH - oh0));
    if (tile.stats) zero_n(stats, 2 * L);
    if (v_in > 0) nchw_reuse_columns<T, S, SW, true>(tile, -g.pl, 0, v_in);
    if (v_out > v_in)
      nchw_reuse_columns<T, S, SW, false>(tile, v_in * step - g.pl, v_in * L, v_out - v_in);
    if (nv > v_out) nchw_reuse_columns<T, S, SW, true>(tile, v_out * step - g.pl, v_out * L, nv - v_out);
    if (tile.stats) add_stats(epi.stats, k, hsum(V::load(stats)), hsum(V::load(stats + L)));
  }
  tile.ahead.finish();
  if (tile.stream) stream_fence();
  tile.y = y;
}

// Whether NCHW reuse tiles run g (forward and grad-weight): rows over half a vector.
template <typename T>
bool nchw_tiles_apply(const ConvGeom& g) {
  return kTilesBuilt<T> && g.R == g.S && (g.S == 3 || g.S == 5) && g.dh == 1 && g.dw == 1 &&
         g.sh == g.sw && (g.sw == 1 || g.sw == 2) && 2 * g.OW > Vec<T>::lanes;
}

template <typename T, int S, int SW>
void forward_nchw_reuse(const ConvGeom& g, const T* x, const T* w, const Epilogue<T>& epi, T* y,
                        int nthreads) {
  constexpr int L = Vec<T>::lanes;
  const int64_t m = g.Kg(), HW = g.H * g.W;
  const NchwPlanes<T, S, SW> planes(g);
  parallel(threads_for(g.flops(), nthreads), [&](int tid, int nth) {
    int64_t begin, end;
    split_range(g.N * g.K, nth, tid, &begin, &end);
    if (begin >= end) return;
    T* zeros = thread_scratch<T>(round_up(g.W, L));
    zero_n(zeros, g.W);
    NchwTile<T> tile{{},      nullptr, g.W,         g.OW, 0, nullptr, T(0), ActivationBounds<T>(epi.act),
                     nullptr, Prefetcher(), false};
    // Plane p = n * K + k reads input channel k / m of image n: k, j = k % m and the input
    // plane stepped along (no divisions per plane).
    int64_t k = begin % g.K, j = k % m;
    const T* xp = x + (begin / g.K * g.C + k / m) * HW;
    for (int64_t p = begin; p < end; ++p) {
      tile.w = w + k * S * S;
      tile.bias = epi.shift ? epi.shift[k] : T(0);
      tile.y = y + p * g.OH * g.OW;
      // the next plane's input: the same channel while j < m - 1, else the next (the next
      // image's first channel continues the same run: x is N x C x H x W)
      const T* next = j + 1 < m ? xp : xp + HW;
      nchw_reuse_plane<T, S, SW>(g, planes, xp, zeros, tile, epi, k, p + 1 < end ? next : nullptr);
      xp = next;
      if (++j == m) j = 0;
      if (++k == g.K) k = 0;
    }
  });
}

template <typename T>
void forward_nchw_reuse(const ConvGeom& g, const T* x, const T* w, const Epilogue<T>& epi, T* y,
                        int nthreads) {
  if (g.S == 3)
    return g.sw == 1 ? forward_nchw_reuse<T, 3, 1>(g, x, w, epi, y, nthreads)
                     : forward_nchw_reuse<T, 3, 2>(g, x, w, epi, y, nthreads);
  return g.sw == 1 ? forward_nchw_reuse<T, 5, 1>(g, x, w, epi, y, nthreads)
                   : forward_nchw_reuse<T, 5, 2>(g, x, w, epi, y, nthreads);
}

// `ahead` (or null): `ahead_bytes` of input the next row will read, prefetched a slice per
// tile so the misses spread over the row (all at once, most were dropped).
struct Ahead {
  const char* p = nullptr;
  int64_t bytes = 0;
};

template <typename T, int KV, int PW>
void nhwc_row_plain(const ConvGeom& g, const T* ximg, int64_t oh, int64_t k0, const T* wp,
                    int64_t Kp, const T* biasp, const Epilogue<T>& epi, T* yrow, Ahead ahead);

// nhwc_row_plain with the widest pixel tile that pays: wide tiles on narrow rows leave no
// interior tiles (a 14-wide row in 8-pixel tiles has none).
template <typename T, int KV>
void nhwc_row(const ConvGeom& g, const T* ximg, int64_t oh, int64_t k0, const T* wp, int64_t Kp,
              const T* biasp, const Epilogue<T>& epi, T* yrow, Ahead ahead = {}) {
  constexpr int wide = pixels_per_tile(KV), narrow = wide < 4 ? wide : 4;
  if (g.OW >= 4 * wide)
    nhwc_row_plain<T, KV, wide>(g, ximg, oh, k0, wp, Kp, biasp, epi, yrow, ahead);
  else
    nhwc_row_plain<T, KV, narrow>(g, ximg, oh, k0, wp, Kp, biasp, epi, yrow, ahead);
}

// Whether NHWC output rows starting at yrow are written with non-temporal stores: outputs
// larger than the caches go around them (on vector-aligned rows), no read-for-ownership of
// lines that are only written. Batch 8, AVX-512, same process, 3 rounds: 32 channels @112
// 1.09-1.15 ms streamed vs 1.63-1.76 ms not; 144 @56 1.48-2.11 vs 2.63-3.01; 96 @112
// stride 2 3.42-3.61 vs 3.88-4.33. Outputs of a few MiB stream too (tuning.h): there the
// time otherwise swings 2-3x with where y lies against x (a store pattern that stalls
// later loads from x, by the 4 KiB offset of the two, we think): 144 @56 stride 2, ms over
// 22 offsets of x, streamed mean 0.29 max 0.35 vs 0.39 and 0.73; 192 @28 0.25 / 0.35 vs
// 0.29 / 0.48; 576 @14 (3.4 MiB) 0.18 either way.
// Whether an NHWC output of `bytes` in all (over `min_bytes`), `channels` per pixel, from p
// is written with non-temporal stores: whole vectors per pixel, vector-aligned.
template <typename T>
bool stream_nhwc(int64_t bytes, int64_t min_bytes, int64_t channels, const T* p) {
  constexpr int L = Vec<T>::lanes;
  return bytes > min_bytes && channels % L == 0 &&
         reinterpret_cast<uintptr_t>(p) % (L * sizeof(T)) == 0;
}

template <typename T>
bool stream_rows(const ConvGeom& g, const T* yrow) {
  return stream_nhwc(g.N * g.OH * g.OW * g.K * int64_t(sizeof(T)),
                     tuning().depthwise_stream_min_bytes, g.K, yrow);
}

// Rows whose input vectors are reused along the width (nhwc_row_reuse, below): 3 or 5 taps
// per row, dilation 1 along the width, stride 1 or 2, multiplier 1. Float only: its 128
// tile variants per ISA are most of this file's compile time, and float64 is for checking.
template <typename T>
constexpr bool kReuseBuilt = std::is_same<T, float>::value;

template <typename T>
bool reuse_applies(const ConvGeom& g) {
  // Padding up to S / 2 per side: only a tile's first and last S / 2 columns can lie
  // outside the input.
  return kReuseBuilt<T> && g.Kg() == 1 && g.dw == 1 && (g.S == 3 || g.S == 5) &&
         (g.sw == 1 || g.sw == 2) && g.pl <= g.S / 2 && g.pr <= g.S / 2;
}

template <typename T>
void nhwc_row_reuse(const ConvGeom& g, const T* ximg, int64_t oh, int64_t kv, const T* wp,
                    int64_t Kp, const T* biasp, const Epilogue<T>& epi, T* yrow, Ahead ahead);

// Small maps, multiplier 1: blocks of up to 4 channel vectors of one image at a time,
// transposed into an NHWC tile in L1 (16 x 16 register transposes), convolved there by the
// channels_last row kernels (vectors along the channels: full even on a 7x7 map) and
// transposed back. Memory sees x and y once. (Prefetching the next block's input over this
// block's rows changed nothing: batch 8, ms, 960 @7 0.201 vs 0.200, 576 @14/2 0.215 vs 0.210.)
template <typename T>
void forward_nchw_channel_blocks(const ConvGeom& g, const T* x, const T* w,
                                 const Epilogue<T>& epi, T* y, int nthreads) {
  constexpr int L = Vec<T>::lanes, B = kTransposeBlock;
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW, KB = g.K / L, Kp = packed_channels<T>(g);
  // Vectors per block: as many as keep the block's tiles in 32 KiB of L1, up to 4 (fewer
  // items, and the row kernel runs pixel-major over them). Batch 8, ms, 4 vs 1: 960 @7
  // 0.132 vs 0.143, 5x5 1152 @7 0.278 vs 0.330, 320 @7 0.057 vs 0.063.
  const int64_t vector_bytes = (HW + OHW) * L * int64_t(sizeof(T));
  const int64_t V = std::max<int64_t>(1, std::min<int64_t>(4, (int64_t(32) << 10) / vector_bytes));
  const int64_t blocks = ceil_div(KB, V);
  const T* wp = packed_for_blocks(g, w, nthreads);
  const std::vector<T> bias = padded_bias(epi, g.K, Kp);
  parallel_for(g.N * blocks, threads_for(g.flops() / g.K * KB * L, nthreads), [&](int64_t item) {
    const int64_t n = item / blocks, k0 = item % blocks * V * L;
    const int64_t nv = min64(V, KB - k0 / L), C = nv * L;  // this block's vectors, channels
    ConvGeom blk = g;  // one image's block, channels_last
    blk.N = 1, blk.C = blk.K = blk.groups = C;
    T* xt = thread_scratch<T>((HW + OHW) * C);
    T* yt = xt + HW * C;
    const T* xs = x + (n * g.K + k0) * HW;
    for (int64_t v = 0; v < nv; ++v)
      for (int64_t p0 = 0; p0 < HW; p0 += B)
        transpose_block(xs + v * L * HW + p0, HW, xt + p0 * C + v * L, C, L,
                        int(min64(B, HW - p0)));
    const Epilogue<T> e = epi.from_channel(k0);
    for (int64_t oh = 0; oh < g.OH; ++oh) {
      T* yrow = yt + oh * g.OW * C;
      if constexpr (kReuseBuilt<T>) {
        if (reuse_applies<T>(blk)) {
          nhwc_row_reuse(blk, xt, oh, nv, wp + k0, Kp, bias.data() + k0, e, yrow, Ahead{});
          continue;
        }
      }
      for (int64_t v = 0; v < nv; ++v)
        nhwc_row<T, 1>(blk, xt, oh, v * L, wp + k0, Kp, bias.data() + k0, e, yrow);
    }
    T* ys = y + (n * g.K + k0) * OHW;
    for (int64_t v = 0; v < nv; ++v)
      for (int64_t p0 = 0; p0 < OHW; p0 += B)
        transpose_block(yt + p0 * C + v * L, C, ys + v * L * OHW + p0, OHW,
                        int(min64(B, OHW - p0)), L);
  });
}

// The NCHW forward's channels that run in channel blocks (forward_nchw_channel_blocks): maps
// narrower than two vectors (a 7-wide map filled 7 of 16 lanes per row) that the reuse tiles
// do not take, whole vectors of channels at multiplier 1; the rest (channel tails) run flat.
// Blocks whose NHWC tiles are well past L1 (48 KiB here) lose to the flat path: 192
// channels @28, batch 8 (100 KiB of tiles): 0.72 ms blocked, 0.46 flat; stride 2 (62 KiB)
// 0.26 blocked, 0.65 flat; @14 and @7 blocked wins 3.4x and 2.2x.
template <typename T>
int64_t nchw_blocked_channels(const ConvGeom& g) {
  constexpr int L = Vec<T>::lanes;
  if (nchw_tiles_apply<T>(g) || g.OW >= 2 * L) return 0;
  const bool fits_l1 = (g.H * g.W + g.OH * g.OW) * L * int64_t(sizeof(T)) <= (64 << 10);
  return g.Kg() == 1 && fits_l1 ? g.K / L * L : 0;
}

template <typename T>
void forward_nchw(const ConvGeom& g, const T* x, const T* w, const Epilogue<T>& epi, T* y,
                  int nthreads) {
  constexpr int L = Vec<T>::lanes;
  // Reuse tiles while a row fills over half a vector. 960 channels @7, batch 8: 0.18 ms in
  // reuse tiles (7 of 16 lanes), 0.13 in channel blocks; @14 0.19 vs 0.24.
  if constexpr (kTilesBuilt<T>) {
    if (nchw_tiles_apply<T>(g)) return forward_nchw_reuse(g, x, w, epi, y, nthreads);
  }
  if (g.OW >= 2 * L) return forward_nchw_tiles(g, x, w, epi, y, nthreads);
  // Tried and lost: 'same'-padded stride-1 maps as one run of vectors across
  // rows and planes (no transposes; tap t a masked load at t's offset, its weight permuted
  // to each lane's plane). S*S unaligned loads per vector, none reused: batch 8, 2 threads,
  // ms, 960 @7 0.155-0.215 by placement (blocks 0.19-0.20), 5x5 1152 @7 0.44-0.59 (blocks
  // 0.278 above).
  const int64_t blocked = nchw_blocked_channels<T>(g);
  if (blocked) forward_nchw_channel_blocks(g, x, w, epi, y, nthreads);
  if (blocked < g.K) forward_nchw_flat(g, x, w, epi, y, blocked, nthreads);
}

// ---------------------------------------------------------------------------------------
// Backward in channel blocks (multiplier 1, whole vectors of channels)
// ---------------------------------------------------------------------------------------

// One image's block of `lanes` channels as an NHWC tile: where it is already (channels_last,
// pixel stride C), or transposed into `scratch` (pixel stride lanes).
template <typename T>
struct ChannelBlock {
  const T* data;
  int64_t stride;
};

template <typename T>
ChannelBlock<T> block_of(const T* t, int layout, int64_t n, int64_t k0, int64_t channels,
                         int64_t pixels, T* scratch) {
  constexpr int L = Vec<T>::lanes, B = kTransposeBlock;
  if (layout == kNHWC) return {t + n * pixels * channels + k0, channels};
  const T* src = t + (n * channels + k0) * pixels;
  for (int64_t p0 = 0; p0 < pixels; p0 += B)
    transpose_block(src + p0, pixels, scratch + p0 * L, L, L, int(min64(B, pixels - p0)));
  return {scratch, L};
}

// f(output pixel, input pixel) for every output pixel whose tap (r, s) lands inside the
// input (flat indices oh * OW + ow and ih * W + iw).
template <typename F>
void for_tap_pixels(const ConvGeom& g, int64_t r, int64_t s, F&& f) {
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    const int64_t ih = oh * g.sh - g.pt + r * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const int64_t iw = ow * g.sw - g.pl + s * g.dw;
      if (iw >= 0 && iw < g.W) f(oh * g.OW + ow, ih * g.W + iw);
    }
  }
}

// The outputs o in [0, outputs) whose tap reads inside the input, o * stride + offset in
// [0, inputs): one run [lo, hi) (empty: lo == hi).
struct TapRun {
  int64_t lo, hi;
  TapRun(int64_t outputs, int64_t stride, int64_t offset, int64_t inputs)
      : lo(offset >= 0 ? 0 : ceil_div(-offset, stride)),
        hi(offset >= inputs ? 0 : min64(outputs, (inputs - 1 - offset) / stride + 1)) {
    if (hi < lo) hi = lo;
  }
};

bool channel_blocks_apply(const ConvGeom& g, int lanes) {
  return g.Kg() == 1 && g.K % lanes == 0;
}

// Grad-input of strided layers by scatter: each grad_y pixel's channel vector, times each
// tap's weight vector, is added to the input pixel the tap read. (The direct kernel's
// phase-split grad-input filled 1 lane in 16 here: 96 channels @112 stride 2, batch 8, 80 ms.)
// Whole channel vectors, or with channels_last tensors also the channel tail, masked (72
// channels @56 stride 2, batch 8, through the direct kernel: 14 ms, torch 2.1; see
// grad_input).
bool scatter_applies(const ConvGeom& g, int lanes, int gy_layout, int gx_layout) {
  return channel_blocks_apply(g, lanes) ||
         (g.Kg() == 1 && gy_layout == kNHWC && gx_layout == kNHWC);
}

template <typename T>
void grad_input_scatter(const ConvGeom& g, const T* gy, int gy_layout, const T* w, T* gx,
                        int gx_layout, int nthreads) {
  using V = Vec<T>;
  constexpr int L = V::lanes, B = kTransposeBlock;
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW, KB = ceil_div(g.K, int64_t(L));
  const int64_t Kp = packed_channels<T>(g);
  const T* wp = packed_for_blocks(g, w, nthreads);
  parallel_for(g.N * KB, threads_for(g.flops(), nthreads), [&](int64_t item) {
    const int64_t n = item / KB, k0 = item % KB * L;
    const LaneMask<T> lanes = lane_mask<T>(0, g.K - k0);  // partial only for the NHWC tail
    const bool whole = k0 + L <= g.K;
    const auto load = [&](const T* p) { return whole ? V::load(p) : load_masked(p, lanes); };
    const auto store = [&](T* p, V v) {
      if (whole)
        v.store(p);
      else
        store_masked(p, v, lanes);
    };
    T* scratch = thread_scratch<T>((OHW + HW) * L);
    const ChannelBlock<T> dy = block_of(gy, gy_layout, n, k0, g.K, OHW, scratch);
    T* dx = gx_layout == kNHWC ? gx + n * HW * g.C + k0 : scratch + OHW * L;
    const int64_t dxs = gx_layout == kNHWC ? g.C : L;
    for (int64_t p = 0; p < HW; ++p) store(dx + p * dxs, V::zero());
    for (int64_t r = 0; r < g.R; ++r) {
      for (int64_t s = 0; s < g.S; ++s) {
        const V wv = V::load(wp + (r * g.S + s) * Kp + k0);
        for_tap_pixels(g, r, s, [&](int64_t out, int64_t in) {
          T* px = dx + in * dxs;
          store(px, fmadd(load(dy.data + out * dy.stride), wv, load(px)));
        });
      }
    }
    if (gx_layout == kNCHW) {
      T* dst = gx + (n * g.C + k0) * HW;
      for (int64_t p0 = 0; p0 < HW; p0 += B)
        transpose_block(dx + p0 * L, L, dst + p0, HW, int(min64(B, HW - p0)), L);
    }
  });
}

// Grad-weight of small maps in channel blocks: one block per work item, its R*S tap sums as
// vectors along the channels over every image and pixel. (The per-channel kernel spent its
// time staging 7x7 planes: 960 channels @7, batch 8, 3.7 ms.)
template <typename T>
void grad_weight_blocks(const ConvGeom& g, const T* gy, int gy_layout, const T* x, int x_layout,
                        T* gw, int nthreads) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  const int64_t HW = g.H * g.W, OHW = g.OH * g.OW, RS = g.R * g.S, KB = g.K / L;
  parallel_for(KB, threads_for(g.flops(), nthreads), [&](int64_t kb) {
    const int64_t k0 = kb * L;
    T* scratch = thread_scratch<T>((OHW + HW + RS) * L);
    T* acc = scratch + (OHW + HW) * L;  // [tap][channel] sums
    for (int64_t t = 0; t < RS; ++t) V::zero().store(acc + t * L);
    for (int64_t n = 0; n < g.N; ++n) {
      const ChannelBlock<T> dy = block_of(gy, gy_layout, n, k0, g.K, OHW, scratch);
      const ChannelBlock<T> xb = block_of(x, x_layout, n, k0, g.C, HW, scratch + OHW * L);
      for (int64_t r = 0; r < g.R; ++r) {
        const TapRun rows(g.OH, g.sh, r * g.dh - g.pt, g.H);
        for (int64_t s = 0; s < g.S; ++s) {
          const TapRun cols(g.OW, g.sw, s * g.dw - g.pl, g.W);
          // Four sums along each row: one sum's chain of FMAs waited on its latency (960
          // channels @7, batch 8, 2 threads: 0.148 ms a call with one).
          V sum[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
          const int64_t dys = dy.stride, xs = g.sw * xb.stride;
          for (int64_t oh = rows.lo; oh < rows.hi; ++oh) {
            const T* d = dy.data + (oh * g.OW + cols.lo) * dys;
            const T* xi = xb.data + ((oh * g.sh + r * g.dh - g.pt) * g.W + cols.lo * g.sw +
                                     s * g.dw - g.pl) * xb.stride;
            int64_t ow = cols.lo;
            for (; ow + 4 <= cols.hi; ow += 4, d += 4 * dys, xi += 4 * xs)
              for (int j = 0; j < 4; ++j)
                sum[j] = fmadd(V::load(d + j * dys), V::load(xi + j * xs), sum[j]);
            const int64_t rest = cols.hi - ow;  // 0-3, unrolled: sum[] stays in registers
            if (rest > 0) sum[0] = fmadd(V::load(d), V::load(xi), sum[0]);
            if (rest > 1) sum[1] = fmadd(V::load(d + dys), V::load(xi + xs), sum[1]);
            if (rest > 2) sum[2] = fmadd(V::load(d + 2 * dys), V::load(xi + 2 * xs), sum[2]);
          }
          T* a = acc + (r * g.S + s) * L;
          add(V::load(a), add(add(sum[0], sum[1]), add(sum[2], sum[3]))).store(a);
        }
      }
    }
    for (int64_t t = 0; t < RS; ++t)
      for (int l = 0; l < L; ++l) gw[(k0 + l) * RS + t] = acc[t * L + l];
  });
}

// Grad-weight: dW[k][r][s] = sum over (n, oh, ow) of gy[n][k][oh][ow] * x[n][k/m][ih][iw], one
// output channel per work item (so no reduction across threads), NCHW planes staged as in
// the forward, vectors along the output rows; channels_last operands are transposed first.
template <typename T>
void grad_weight_nchw(const ConvGeom& g, const T* gy, const T* x, T* gw, int nthreads) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  const int64_t m = g.Kg(), RS = g.R * g.S;
  const PlaneStaging st(g, L);
  parallel_for(g.K, threads_for(g.flops(), nthreads), [&](int64_t k) {
    T* plane = thread_scratch<T>(st.scratch());
    std::vector<V> acc(RS, V::zero());  // one vector of partial sums per tap (aligned new)
    alignas(64) T gbuf[L], xbuf[L];
    for (int64_t n = 0; n < g.N; ++n) {
      stage_plane(g, st, x + (n * g.C + k / m) * g.H * g.W, plane);
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const T* gyrow = gy + ((n * g.K + k) * g.OH + oh) * g.OW;
        for (int64_t ow0 = 0; ow0 < g.OW; ow0 += L) {
          const int64_t valid = min64(L, g.OW - ow0);
          // A partial vector zeroes its lanes past OW in both operands, so inputs outside
          // the receptive field (an inf, say) never reach the sum.
          const V gv = load_first(gyrow + ow0, valid, gbuf);
          for (int64_t r = 0; r < g.R; ++r) {
            for (int64_t s = 0; s < g.S; ++s) {
              const T* src = st.tap(g, plane, oh, r, s) + ow0;
              acc[r * g.S + s] = fmadd(gv, load_first(src, valid, xbuf), acc[r * g.S + s]);
            }
          }
        }
      }
    }
    for (int64_t t = 0; t < RS; ++t) gw[k * RS + t] = hsum(acc[t]);
  });
}

// Grad-weight of NCHW planes with the forward's reuse tiles (nchw_tiles_apply), turned
// around: dW[r][s] = sum of gy[oh][ow] x[oh SW - pt + r][ow SW - pl + s], a tile of RT gy
// rows x one vector; each input row's S tap vectors are loaded once and multiplied by the gy
// vector of every tile row they reach, into S * S accumulators.
template <typename T>
struct GradWeightTile {
  const T* in[kNchwMaxInputRows];  // input rows (x's, or a zero row), at column 0
  const T* gy;                     // gy row oh0, at column 0
  int64_t W, OW;
  int rows;  // gy rows in the tile (fewer than kNchwTileRows at the plane's bottom)
  T* acc;    // S * S vectors of partial sums, accumulated
  Prefetcher x_ahead, gy_ahead;  // the next planes, a step per vector
};

// `count` vectors from output column ow0 (first taps at column c0). Edge: masked loads, and
// the lanes past OW zero in both operands, so inputs outside the receptive field (an inf,
// say) never reach the sums. Partial: gy rows past tile.rows are skipped, not zeros.
template <typename T, int S, int SW, bool Edge, bool Partial>
void grad_weight_reuse_columns(GradWeightTile<T>& tile, int64_t c0, int64_t ow0,
                               int64_t count) {
  using V = Vec<T>;
  using Shape = NchwReuseShape<T, S, SW>;
  constexpr int L = V::lanes, RT = Shape::rows, IR = Shape::in_rows;
  // The tile's gy vectors stay in registers beside the accumulators if they fit (3x3);
  // else (5x5) each FMA reads its gy vector from memory.
  constexpr bool gy_fit = S * S + RT + S <= kVectorRegisters - 2;
  const int64_t W = tile.W, OW = tile.OW;
  V acc[S * S];
  for (int t = 0; t < S * S; ++t) acc[t] = V::load(tile.acc + t * L);
  RowTaps<T, S, SW> taps;
  for (int64_t v = 0; v < count; ++v, c0 += SW * L, ow0 += L) {
    const LaneMask<T> valid = lane_mask<T>(0, OW - ow0);
    if (Edge) taps.edge(c0, W);
    const auto gy_at = [&](const T* gy, int t) {
      return Edge ? load_masked(gy + t * OW + ow0, valid) : V::load(gy + t * OW + ow0);
    };
    V gv[gy_fit ? RT : 1];
    for (int t = 0; gy_fit && t < RT; ++t)
      gv[t] = Partial && t >= tile.rows ? V::zero() : gy_at(tile.gy, t);
#pragma GCC unroll 32
    for (int i = 0; i < IR; ++i) {
      const T* gym = tile.gy;
      if constexpr (!gy_fit) __asm__("" : "+r"(gym));  // not hoisted out of the row
      V tap[S];
      taps.template load<Edge>(tile.in[i] + c0, tap);
      for (int s = 0; Edge && s < S; ++s) tap[s] = masked(tap[s], valid);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const int r = i - t * SW;
        if (r < 0 || r >= S || (Partial && t >= tile.rows)) continue;
        const V gt = gy_fit ? gv[t] : gy_at(gym, t);
        for (int s = 0; s < S; ++s) acc[r * S + s] = fmadd(gt, tap[s], acc[r * S + s]);
      }
    }
    tile.x_ahead.step();
    tile.gy_ahead.step();
  }
  for (int t = 0; t < S * S; ++t) acc[t].store(tile.acc + t * L);
}

template <typename T, int S, int SW>
void grad_weight_reuse(const ConvGeom& g, const T* gy, const T* x, T* gw, int nthreads) {
  using V = Vec<T>;
  using Shape = NchwReuseShape<T, S, SW>;
  constexpr int L = V::lanes, RT = Shape::rows, IR = Shape::in_rows;
  const int64_t m = g.Kg(), HW = g.H * g.W, OHW = g.OH * g.OW, step = SW * L;
  const NchwColumns cols = NchwColumns::of<T, S, SW>(g);
  parallel(threads_for(g.flops(), nthreads), [&](int tid, int nth) {
    int64_t begin, end;
    split_range(g.K, nth, tid, &begin, &end);
    if (begin >= end) return;
    T* zeros = thread_scratch<T>(round_up(g.W, L));
    zero_n(zeros, g.W);
    alignas(64) T acc[S * S * L];
    GradWeightTile<T> tile{{}, nullptr, g.W, g.OW, 0, acc, Prefetcher(), Prefetcher()};
    const auto x_plane = [&](int64_t n, int64_t k) { return x + (n * g.C + k / m) * HW; };
    const auto gy_plane = [&](int64_t n, int64_t k) { return gy + (n * g.K + k) * OHW; };
    const int64_t steps = ceil_div(g.OH, RT) * cols.count;
    for (int64_t k = begin; k < end; ++k) {  // one output channel: no reduction across threads
      zero_n(acc, S * S * L);
      for (int64_t n = 0; n < g.N; ++n) {
        const T* xp = x_plane(n, k);
        const T* gyp = gy_plane(n, k);
        // The next planes: this channel's next image, or the next channel's first.
        const int64_t nn = n + 1 < g.N ? n + 1 : 0, nk = n + 1 < g.N ? k : k + 1;
        const bool more = nk < end;
        tile.x_ahead = Prefetcher(more ? x_plane(nn, nk) : nullptr, HW * int64_t(sizeof(T)), steps);
        tile.gy_ahead = Prefetcher(more ? gy_plane(nn, nk) : nullptr, OHW * int64_t(sizeof(T)), steps);
        for (int64_t oh0 = 0; oh0 < g.OH; oh0 += RT) {
          tile_input_rows<T, IR, SW>(g, xp, zeros, oh0, tile.in);
          tile.gy = gyp + oh0 * g.OW;
          tile.rows = int(min64(RT, g.OH - oh0));
          const bool part = tile.rows < RT;
          const auto run = [&](bool edge, int64_t v0, int64_t v1) {
            if (v1 <= v0) return;
            const int64_t c0 = v0 * step - g.pl, ow0 = v0 * L, count = v1 - v0;
            if (edge && part) grad_weight_reuse_columns<T, S, SW, true, true>(tile, c0, ow0, count);
            if (edge && !part) grad_weight_reuse_columns<T, S, SW, true, false>(tile, c0, ow0, count);
            if (!edge && part) grad_weight_reuse_columns<T, S, SW, false, true>(tile, c0, ow0, count);
            if (!edge && !part) grad_weight_reuse_columns<T, S, SW, false, false>(tile, c0, ow0, count);
          };
          run(true, 0, cols.inside);
          run(false, cols.inside, cols.past);
          run(true, cols.past, cols.count);
        }
      }
      for (int t = 0; t < S * S; ++t) gw[k * S * S + t] = hsum(V::load(acc + t * L));
    }
  });
}

// Grad-weight of NCHW operands (sub-batch g): reuse tiles where they apply, else staged
// planes.
template <typename T>
void grad_weight_planes(const ConvGeom& g, const T* gy, const T* x, T* gw, int nthreads) {
  if constexpr (kTilesBuilt<T>) {
    if (nchw_tiles_apply<T>(g)) {
      if (g.S == 3)
        return g.sw == 1 ? grad_weight_reuse<T, 3, 1>(g, gy, x, gw, nthreads)
                         : grad_weight_reuse<T, 3, 2>(g, gy, x, gw, nthreads);
      return g.sw == 1 ? grad_weight_reuse<T, 5, 1>(g, gy, x, gw, nthreads)
                       : grad_weight_reuse<T, 5, 2>(g, gy, x, gw, nthreads);
    }
  }
  grad_weight_nchw(g, gy, x, gw, nthreads);
}

// Channels_last grad-weight (multiplier 1, 3x3 or 5x5) on the tensors as they lie: vectors
// along the channels, dW[k][t] = sum over output pixels of gy[pixel][k] * x[pixel's tap
// t][k]. Threads take whole output rows, each summing into its own [tap][k] copy of dW (a
// few KiB), added up at the end; a row runs each channel vector (the tail masked) over its
// pixels with the taps' sums in registers, the pixels whose taps all lie inside the row
// without checks. (Both tensors were copied to NCHW for the plane kernels.) Batch 8, ms,
// before / after, torch in the same run: 64 @56 2.20 / 0.30, 0.32-0.38; 32 @112 3.62 /
// 1.21, 1.22-1.61; 192 @28 1.34 / 0.34, 0.25-0.28; 144 @56 stride 2 2.36 / 0.66, 0.40-0.41;
// 96 @112 stride 2 7.1 / 2.4, 3.7-4.0; 72 @56 stride 2 0.61 / 0.17, 0.24; 960 @7 0.18 /
// 0.17, 0.12; batch 1 144 @56 0.18 / 0.09, 0.14.
template <typename T>
bool nhwc_grad_weight_applies(const ConvGeom& g, int gy_layout, int x_layout) {
  return gy_layout == kNHWC && x_layout == kNHWC && g.Kg() == 1 && g.R == g.S &&
         (g.S == 3 || g.S == 5);
}

// Output row `row` (n * OH + oh), channel vector [k0, k0 + L) (Whole: all of its lanes are
// channels), added to part ([tap][Kp]).
template <typename T, int S, bool Whole>
void grad_weight_nhwc_row(const ConvGeom& g, const T* gy, const T* x, int64_t row, int64_t k0,
                          int64_t Kp, T* part) {
  using V = Vec<T>;
  constexpr int RS = S * S;
  const int64_t n = row / g.OH, oh = row % g.OH, C = g.C, sw = g.sw;
  const T* xn = x + n * g.H * g.W * C + k0;
  const T* gyr = gy + row * g.OW * g.K + k0;
  const LaneMask<T> lanes = lane_mask<T>(0, g.K - k0);
  const auto load = [&](const T* p) FASTCONV_ALWAYS_INLINE {
    return Whole ? V::load(p) : load_masked(p, lanes);
  };
  // Each tap's input row (null: outside the input) and column offset: iw = ow * sw + col.
  const T* xrow[RS];
  int64_t col[RS];
  int64_t lo = 0, hi = g.OW;  // outputs whose every tap's column lies inside the row
  for (int t = 0; t < RS; ++t) {
    const int64_t ih = oh * g.sh - g.pt + (t / S) * g.dh;
    col[t] = (t % S) * g.dw - g.pl;
    xrow[t] = ih >= 0 && ih < g.H ? xn + ih * g.W * C : nullptr;
    lo = max64(lo, col[t] >= 0 ? 0 : ceil_div(-col[t], sw));
    hi = min64(hi, g.W - col[t] <= 0 ? 0 : ceil_div(g.W - col[t], sw));
  }
  lo = min64(lo, g.OW);  // padding wider than the row: every output is an edge one
  hi = max64(hi, lo);
  // The accumulators' indices are constants (static_for): in runtime loops GCC kept them
  // on the stack.
  V acc[RS];
  static_for<RS>([&](auto t) { acc[t] = V::load(part + t * Kp + k0); });
  const auto edge = [&](int64_t ow) FASTCONV_ALWAYS_INLINE {
    const V d = load(gyr + ow * g.K);
    static_for<RS>([&](auto t) FASTCONV_ALWAYS_INLINE {
      const int64_t iw = ow * sw + col[t];
      if (xrow[t] && iw >= 0 && iw < g.W) acc[t] = fmadd(d, load(xrow[t] + iw * C), acc[t]);
    });
  };
  for (int64_t ow = 0; ow < lo; ++ow) edge(ow);
  for (int64_t ow = lo; ow < hi; ++ow) {
    const V d = load(gyr + ow * g.K);
    static_for<RS>([&](auto t) FASTCONV_ALWAYS_INLINE {
      if (xrow[t]) acc[t] = fmadd(d, load(xrow[t] + (ow * sw + col[t]) * C), acc[t]);
    });
  }
  for (int64_t ow = hi; ow < g.OW; ++ow) edge(ow);
  static_for<RS>([&](auto t) { acc[t].store(part + t * Kp + k0); });
}

template <typename T, int S>
void grad_weight_nhwc(const ConvGeom& g, const T* gy, const T* x, T* gw, int nthreads) {
  constexpr int L = Vec<T>::lanes, RS = S * S;
  const int64_t Kp = round_up(g.K, int64_t(L)), rows = g.N * g.OH;
  const int nt = threads_for(g.flops(), nthreads);
  T* parts = workspace_as<T>(kWsAccumulators, int64_t(nt) * RS * Kp);  // [thread][tap][k]
  zero_n(parts, int64_t(nt) * RS * Kp);  // all of them: OpenMP may start fewer threads
  parallel(nt, [&](int tid, int nth) {
    T* part = parts + tid * RS * Kp;
    int64_t r0, r1;
    split_range(rows, nth, tid, &r0, &r1);
    for (int64_t row = r0; row < r1; ++row)
      for (int64_t k0 = 0; k0 < g.K; k0 += L) {
        if (k0 + L <= g.K)
          grad_weight_nhwc_row<T, S, true>(g, gy, x, row, k0, Kp, part);
        else
          grad_weight_nhwc_row<T, S, false>(g, gy, x, row, k0, Kp, part);
      }
  });
  parallel_for(g.K, threads_for(g.K * RS * nt, nthreads), [&](int64_t k) {
    for (int64_t t = 0; t < RS; ++t) {
      T sum = 0;
      for (int i = 0; i < nt; ++i) sum += parts[(i * RS + t) * Kp + k];
      gw[k * RS + t] = sum;
    }
  });
}

template <typename T>
void grad_weight(const ConvGeom& g, const T* gy, int gy_layout, const T* x, int x_layout, T* gw,
                 int nthreads) {
  if (nhwc_grad_weight_applies<T>(g, gy_layout, x_layout))
    return g.S == 3 ? grad_weight_nhwc<T, 3>(g, gy, x, gw, nthreads)
                    : grad_weight_nhwc<T, 5>(g, gy, x, gw, nthreads);
  // Channel blocks for maps under half a vector wide; reuse tiles (grad_weight_planes) beat
  // them above. Batch 8, 2 threads: 192 channels @28 0.64 ms in blocks, 0.34 in tiles; 576
  // @14 0.54 vs 0.28; 960 @7 0.23 vs 1.2.
  if (g.OW < 2 * Vec<T>::lanes && channel_blocks_apply(g, Vec<T>::lanes) &&
      !nchw_tiles_apply<T>(g))
    return grad_weight_blocks(g, gy, gy_layout, x, x_layout, gw, nthreads);
  // channels_last operands as NCHW copies, a group of images at a time.
  const int64_t x_image = g.C * g.H * g.W, gy_image = g.K * g.OH * g.OW;
  const bool x_copy = x_layout == kNHWC, gy_copy = gy_layout == kNHWC;
  const int64_t group = !x_copy && !gy_copy ? g.N
      : images_per_group(((x_copy ? x_image : 0) + (gy_copy ? gy_image : 0)) * int64_t(sizeof(T)));
  T* xbuf = x_copy ? workspace_as<T>(kWsActivationNhwc, min64(group, g.N) * x_image) : nullptr;
  T* gybuf = gy_copy ? workspace_as<T>(kWsGradOutputNhwc, min64(group, g.N) * gy_image) : nullptr;
  T* part = g.N > group ? workspace_as<T>(kWsAccumulators, g.K * g.R * g.S) : nullptr;
  ConvGeom sub = g;
  for (int64_t n0 = 0; n0 < g.N; n0 += group) {
    sub.N = min64(g.N, n0 + group) - n0;
    const T* xs = x + n0 * x_image;
    const T* gys = gy + n0 * gy_image;
    if (x_copy) nhwc_to_nchw(xs, sub.N, g.C, g.H * g.W, xbuf, nthreads), xs = xbuf;
    if (gy_copy) nhwc_to_nchw(gys, sub.N, g.K, g.OH * g.OW, gybuf, nthreads), gys = gybuf;
    if (n0 == 0) {
      grad_weight_planes(sub, gys, xs, gw, nthreads);
    } else {  // later image groups add to dW
      grad_weight_planes(sub, gys, xs, part, nthreads);
      for (int64_t i = 0; i < g.K * g.R * g.S; ++i) gw[i] += part[i];
    }
  }
}

// ---------------------------------------------------------------------------------------
// NHWC: vectors across the channels
// ---------------------------------------------------------------------------------------

// The input vector of output channels [k0, k0 + L) at one pixel of a multiplier-1 layer:
// contiguous (the channel tail by a masked load: a gather per pixel and tap made 8 channels
// @8, batch 8, take 87 us, torch 36); lanes past K read nothing (their weights are zero).
// Multipliers permute a loaded vector (nhwc_row_general).
template <typename T>
Vec<T> input_lanes(const T* pixel, int64_t k0, int64_t K) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  if (k0 + L <= K) return V::load(pixel + k0);
  alignas(64) T buf[L];
  return load_first<T>(pixel + k0, K - k0, buf);
}

// One output row, channels [k0, k0 + KV * L) of a plain layer (m = 1, whole vectors), PW
// output pixels per register tile: each tap's KV weight vectors are loaded once per tile.
template <typename T, int KV, int PW>
void nhwc_row_plain(const ConvGeom& g, const T* ximg, int64_t oh, int64_t k0, const T* wp,
                    int64_t Kp, const T* biasp, const Epilogue<T>& epi, T* yrow, Ahead ahead) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  // Read once: stores through yrow may alias anything, so fields read in the loop would be
  // reloaded after every store.
  const int act = epi.act;
  const bool stats = epi.stats.sum != nullptr;
  const bool stream_out = stream_rows(g, yrow);
  // The row's statistics per channel vector (sums, then sums of squares), kept in memory:
  // registers are the tile's.
  alignas(64) T row_stats[2 * KV * L];
  if (stats) zero_n(row_stats, 2 * KV * L);
  alignas(64) static const T zeros[KV * L] = {};  // what taps outside the input read
  const int64_t RS = g.R * g.S, ih0 = oh * g.sh - g.pt;
  int64_t tap_offset[64];  // input offset of each tap from the tile's first pixel
  const bool few_taps = RS <= 64;
  const bool interior_rows = few_taps && ih0 >= 0 && ih0 + (g.R - 1) * g.dh < g.H;
  for (int64_t r = 0, t = 0; few_taps && r < g.R; ++r)
    for (int64_t s = 0; s < g.S; ++s, ++t) tap_offset[t] = (r * g.dh * g.W + s * g.dw) * g.C;
  const int64_t slice = round_up(ceil_div(ahead.bytes, ceil_div(g.OW, PW)), 64);
  for (int64_t ow0 = 0; ow0 < g.OW; ow0 += PW) {
    const int np = int(min64(PW, g.OW - ow0));
    if (ahead.p) {
      const int64_t at = ow0 / PW * slice;
      prefetch_bytes(ahead.p + at, min64(slice, ahead.bytes - at));
    }
    V acc[PW][KV];
    for (int p = 0; p < PW; ++p)
      for (int v = 0; v < KV; ++v) acc[p][v] = V::load(biasp + k0 + v * L);
    // A whole tile whose taps all land inside the input needs no per-pixel checks: one
    // offset per tap, the pixels a constant stride apart.
    const int64_t iw0 = ow0 * g.sw - g.pl;
    const bool interior = interior_rows && np == PW && iw0 >= 0 &&
                          iw0 + (PW - 1) * g.sw + (g.S - 1) * g.dw < g.W;
    if (interior) {
      // One base pointer per pixel and one offset per tap keep the loop's addressing in a
      // few registers (computing p * stride per load spilled them: 2.5x slower).
      const T* px[PW];
      for (int p = 0; p < PW; ++p) px[p] = ximg + (ih0 * g.W + iw0 + p * g.sw) * g.C + k0;
      const T* wt = wp + k0;
      for (int64_t t = 0; t < RS; ++t, wt += Kp) {
        const int64_t off = tap_offset[t];
        V wv[KV];
        for (int v = 0; v < KV; ++v) wv[v] = V::load(wt + v * L);
        for (int p = 0; p < PW; ++p)
          for (int v = 0; v < KV; ++v)
            acc[p][v] = fmadd(V::load(px[p] + off + v * L), wv[v], acc[p][v]);
      }
    }
    for (int64_t r = 0; !interior && r < g.R; ++r) {
      const int64_t ih = oh * g.sh - g.pt + r * g.dh;
      if (ih < 0 || ih >= g.H) continue;
      const T* xrow = ximg + ih * g.W * g.C + k0;
      for (int64_t s = 0; s < g.S; ++s) {
        const T* wt = wp + (r * g.S + s) * Kp + k0;
        V wv[KV];
        for (int v = 0; v < KV; ++v) wv[v] = V::load(wt + v * L);
        // Pixels whose tap falls outside the row (or past the row's end) read zeros: no
        // branch in the FMA loop (a branch per pixel and tap cost 2.6x on 28-wide rows).
        const T* px[PW];
        for (int p = 0; p < PW; ++p) {
          const int64_t iw = (ow0 + p) * g.sw - g.pl + s * g.dw;
          px[p] = p < np && iw >= 0 && iw < g.W ? xrow + iw * g.C : zeros;
        }
        for (int p = 0; p < PW; ++p)
          for (int v = 0; v < KV; ++v)
            acc[p][v] = fmadd(V::load(px[p] + v * L), wv[v], acc[p][v]);
      }
    }
    for (int p = 0; p < np; ++p)
      for (int v = 0; v < KV; ++v) {
        acc[p][v] = activate(acc[p][v], act);
        T* out = yrow + (ow0 + p) * g.K + k0 + v * L;
        if (stream_out)
          acc[p][v].stream(out);
        else
          acc[p][v].store(out);
      }
    if (!stats) continue;
    for (int v = 0; v < KV; ++v) {
      V s = V::load(row_stats + v * L), q = V::load(row_stats + (KV + v) * L);
      for (int p = 0; p < np; ++p) {
        s = add(s, acc[p][v]);
        q = fmadd(acc[p][v], acc[p][v], q);
      }
      s.store(row_stats + v * L);
      q.store(row_stats + (KV + v) * L);
    }
  }
  if (stream_out) stream_fence();
  for (int v = 0; stats && v < KV; ++v)
    add_stats(epi.stats, k0 + v * L, V::load(row_stats + v * L),
              V::load(row_stats + (KV + v) * L), L);
}

// One output row's channel vector [k0, k0 + L) of a layer with S = 3 or 5 taps per row,
// dilation 1 along the width and stride SW = 1 or 2 (every depthwise layer of MobileNetV2
// and EfficientNet), in register tiles of PW output pixels: each input vector of a tile's row
// is loaded once and feeds every pixel whose taps reach it. Loads per FMA fall from 1 + 1/PW
// (nhwc_row_plain: a load per tap and pixel) to about (1 + 1/PW) / S at stride 1, so the
// FMAs bound the tile, not the loads. Rows of taps outside the input are skipped.
// 192 channels @28, batch 8 (Zen 4, kernel alone): 1 thread 0.61 ms plain (4 x 6 tiles),
// 0.38 ms here; 2 threads 0.28 -> 0.19 ms (torch 0.17).
template <typename T>
struct ReuseRow {  // what the tiles of one row and channel vector share
  const ConvGeom* g;
  const T* x;  // the image at channel k0
  const T* w;  // packed weights at channel k0: tap t at w + t * Kp
  int64_t Kp, ih0;
  const T* bias;  // at channel k0
  T* y;           // the output row at channel k0
  ActivationBounds<T> act;
  bool stream;
  T* stats;  // null, or L sums then L sums of squares, accumulated
  LaneMask<T> lanes;  // a Partial tile's channels: the channel tail's first lanes
};

// The tile of PW pixels from ow0. Inside: all its input columns lie in the input (no
// checks); else its first and last S / 2 columns (the only ones that can lie in the
// padding, see reuse_applies) read zeros there by masked loads. 64 channels @28, 1 thread,
// where both tiles of a row touch the padding: 1.3 G FMA/s with a branch per column, 1.6
// with a masked load per column, 2.0 with masked edges only. The whole tile is one
// unrolled body: with the accumulators passed by reference to a helper, or activated by a
// switch per vector, GCC kept them on the stack.
//
// Partial: the channel tail (K not a multiple of the vector), its lanes read by masked loads
// and written by masked stores. (Tails ran one pixel at a time with a gather per tap.)
// Channels_last, batch 8, ms, before / after, torch in the same run: 72 @56 3.78 / 0.44,
// 0.27-0.30; 120 @28 0.80 / 0.17, 0.14; 40 @28 0.64 / 0.068, 0.075; 200 @14 0.25 / 0.080,
// 0.09; 72 @56 stride 2 0.81 / 0.18, 0.14; 8 @8 0.097 / 0.015, 0.036.
template <typename T, int S, int SW, int PW, bool Inside, bool Partial>
void nhwc_reuse_tile(const ReuseRow<T>& row, int64_t ow0) {
  using V = Vec<T>;
  constexpr int L = V::lanes, J = (PW - 1) * SW + S;  // input columns per tile
  const ConvGeom& g = *row.g;
  const int64_t C = g.C, W = g.W, H = g.H, R = g.R, dh = g.dh, K = g.K, Kp = row.Kp;
  const int64_t ih0 = row.ih0;
  const T* x = row.x;
  const T* w = row.w;
  const V bias = V::load(row.bias), lo = row.act.lo, hi = row.act.hi;
  const bool stream = row.stream;
  const int64_t iw0 = ow0 * SW - g.pl;
  // Whether each of the first and last E columns (the only ones that can lie in the
  // padding) lies in the input, worked out once for every row.
  constexpr int E = S / 2;
  bool in[2 * E];
  for (int e = 0; e < E; ++e) {
    in[e] = Inside || uint64_t(iw0 + e) < uint64_t(W);
    in[E + e] = Inside || uint64_t(iw0 + J - E + e) < uint64_t(W);
  }
  V acc[PW];
  static_for<PW>([&](auto p) { acc[p] = bias; });
  // The rows of taps inside the input, as bounds (a skip inside the loop is one more path
  // the accumulators have to survive); no division at dilation 1 (2 % of 192 @28's time).
  const int64_t r_lo = ih0 >= 0 ? 0 : dh == 1 ? -ih0 : ceil_div(-ih0, dh);
  const int64_t r_hi = ih0 >= H ? 0 : std::min(R, dh == 1 ? H - ih0 : (H - 1 - ih0) / dh + 1);
  for (int64_t r = r_lo; r < r_hi; ++r) {
    V wv[S];
    static_for<S>([&](auto s) { wv[s] = V::load(w + (r * S + s) * Kp); });
    // Column j at xp, stepped by one pixel per column and kept opaque: with the J column
    // offsets j * C folded into the addresses, GCC held them in J registers and spilled.
    const T* xp = x + ((ih0 + r * dh) * W + iw0) * C;
    static_for<J>([&](auto j) FASTCONV_ALWAYS_INLINE {
      constexpr bool edge = j < E || j >= J - E;  // may lie in the padding
      V xv;
      if constexpr (Inside || !edge) {
        xv = Partial ? load_masked(xp, row.lanes) : V::load(xp);
      } else {
        const bool valid = in[j < E ? j : E + j - (J - E)];
        if constexpr (Partial)
          xv = valid ? load_masked(xp, row.lanes) : V::zero();
        else
          xv = load_or_zero(xp, valid);
      }
      keep_in_register(xv);
      xp += C;
      __asm__("" : "+r"(xp));
      static_for<S>([&](auto s) FASTCONV_ALWAYS_INLINE {
        constexpr int d = j - s;  // SW * (the pixel whose tap s reads column j)
        if constexpr (d >= 0 && d % SW == 0 && d / SW < PW)
          acc[d / SW] = fmadd(xv, wv[s], acc[d / SW]);
      });
    });
  }
  static_for<PW>([&](auto p) { acc[p] = clamp(lo, hi, acc[p]); });
  T* y = row.y + ow0 * K;
  if (Partial)
    static_for<PW>([&](auto p) { store_masked(y + p * K, acc[p], row.lanes); });
  else if (stream)
    static_for<PW>([&](auto p) { acc[p].stream(y + p * K); });
  else
    static_for<PW>([&](auto p) { acc[p].store(y + p * K); });
  if (!row.stats) return;
  V sum = V::load(row.stats), sq = V::load(row.stats + L);
  static_for<PW>([&](auto p) {
    sum = add(sum, acc[p]);
    sq = fmadd(acc[p], acc[p], sq);
  });
  sum.store(row.stats);
  sq.store(row.stats + L);
}

// Pixels per reuse tile: what the registers hold beside the S weights and the input vector.
// Sanitized builds (correctness only) instantiate tiles of up to 4: the unrolled bodies of
// all 16 widths took the file's sanitized compile from ~2 minutes to over 7.
#if defined(__SANITIZE_ADDRESS__)
constexpr int kReusePixels = 4;
#else
constexpr int kReusePixels = kVectorRegisters >= 32 ? 16 : 8;
#endif

template <typename T>
using ReuseTile = void (*)(const ReuseRow<T>&, int64_t);

// The tiles of 1 .. kReusePixels pixels (whose columns lie inside the input, then not) for
// S taps at stride SW, for whole channel vectors and then for the channel tail.
template <typename T, int S, int SW, int... I>
const ReuseTile<T>* reuse_tiles(std::integer_sequence<int, I...>) {
  static const ReuseTile<T> tiles[] = {&nhwc_reuse_tile<T, S, SW, I + 1, true, false>...,
                                        &nhwc_reuse_tile<T, S, SW, I + 1, false, false>...,
                                        &nhwc_reuse_tile<T, S, SW, I + 1, true, true>...,
                                        &nhwc_reuse_tile<T, S, SW, I + 1, false, true>...};
  return tiles;
}

template <typename T>
const ReuseTile<T>* reuse_tiles_for(const ConvGeom& g) {
  const auto widths = std::make_integer_sequence<int, kReusePixels>{};
  if (g.S == 3) return g.sw == 1 ? reuse_tiles<T, 3, 1>(widths) : reuse_tiles<T, 3, 2>(widths);
  return g.sw == 1 ? reuse_tiles<T, 5, 1>(widths) : reuse_tiles<T, 5, 2>(widths);
}

// One output row, channel vectors [0, kv * L) (ximg, wp, biasp and yrow at the first), in
// reuse tiles (nhwc_reuse_tile), pixel-major: each segment of the row's tiles runs every
// channel vector before the next segment, so that consecutive tiles read neighbouring cache
// lines of the same pixels (channel-major, each channel vector read the row's pixels C
// values apart). Batch 8, 2 threads, ms, mean over 22 alignments of x: 960 @7 0.111 vs
// 0.135 channel-major, 384 @14 0.133 vs 0.146, 576 @14 0.177 vs 0.194, 192 @28 stride 2
// 0.110 vs 0.118; 32 @112 the same. Segments of pw = ceil(OW / tiles) pixels, the last one
// narrower: 28 = 14 + 14 (not 16 + 12: the same loads, one tile function).
template <typename T>
void nhwc_row_reuse(const ConvGeom& g, const T* ximg, int64_t oh, int64_t kv, const T* wp,
                    int64_t Kp, const T* biasp, const Epilogue<T>& epi, T* yrow, Ahead ahead) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  const bool stream_out = stream_rows(g, yrow);
  const bool stats = epi.stats.sum != nullptr;
  thread_local std::vector<T> row_stats;  // per channel vector: L sums, L squares
  if (stats) row_stats.assign(2 * L * kv, T(0));  // reuses the thread's buffer
  const ActivationBounds<T> act(epi.act);
  const ReuseTile<T>* tiles = reuse_tiles_for<T>(g);
  const int64_t nt = ceil_div(g.OW, int64_t(kReusePixels)), pw = ceil_div(g.OW, nt);
  const auto inside = [&](int64_t ow0, int64_t width) {
    const int64_t iw0 = ow0 * g.sw - g.pl;
    return iw0 >= 0 && iw0 + (width - 1) * g.sw + g.S <= g.W;
  };
  const int64_t slice = round_up(ceil_div(ahead.bytes, ceil_div(g.OW, pw)), 64);
  for (int64_t ow0 = 0; ow0 < g.OW; ow0 += pw) {
    const int64_t width = min64(pw, g.OW - ow0);
    const int64_t at = width - 1 + (inside(ow0, width) ? 0 : kReusePixels);
    if (ahead.p && ahead.bytes > 0) {  // the next row's input, a slice per segment
      const int64_t bytes = min64(slice, ahead.bytes);
      prefetch_bytes(ahead.p, bytes);
      ahead.p += bytes, ahead.bytes -= bytes;
    }
    for (int64_t v = 0; v < kv; ++v) {
      const int64_t k0 = v * L, lanes = min64(L, g.K - k0);
      const ReuseRow<T> row{&g,         ximg + k0,  wp + k0,
                            Kp,         oh * g.sh - g.pt, biasp + k0,
                            yrow + k0,  act,        stream_out,
                            stats ? row_stats.data() + 2 * L * v : nullptr,
                            lane_mask<T>(0, lanes)};
      tiles[at + (lanes < L ? 2 * kReusePixels : 0)](row, ow0);
    }
  }
  if (stream_out) stream_fence();
  for (int64_t v = 0; stats && v < kv; ++v) {
    const T* st = row_stats.data() + 2 * L * v;
    add_stats(epi.stats, v * L, V::load(st), V::load(st + L), min64(L, g.K - v * L));
  }
}

// One output row, channels [k0, K): a multiplier > 1 (each vector gathers its input
// channels) or the channel tail, one pixel at a time.
template <typename T>
void nhwc_row_general(const ConvGeom& g, const T* ximg, int64_t oh, int64_t k0, const T* wp,
                      int64_t Kp, const T* biasp, const Epilogue<T>& epi, T* yrow) {
  using V = Vec<T>;
  constexpr int L = V::lanes, KV = kChannelVectors;
  const int64_t m = g.Kg();
  alignas(64) T buf[KV * L];
  // Multipliers: output channels [k, k + L) read input channels k / m, ... : at most L of
  // them from `first`, loaded as one vector and permuted (lane l takes input channel
  // (k + l) / m, at lane (k + l) / m - first). Worked out once per chunk. Batch 8,
  // channels_last, 32 x 2 channels @56, ms: 17 with a gather and 16 divisions per tap and
  // pixel, 2.6 gathering with indices worked out once, 1.8 loaded and permuted; torch 1.2-1.4.
  alignas(64) int32_t lane[KV][L];
  int64_t first[KV];
  LaneMask<T> loaded[KV];
  for (int64_t kb = k0; kb < g.K; kb += KV * L) {
    const int nv = int(min64(KV, ceil_div(g.K - kb, L)));  // vectors holding channels
    for (int v = 0; m > 1 && v < nv; ++v) {
      const int64_t k = kb + v * L;
      first[v] = k / m;
      loaded[v] = lane_mask<T>(0, min64(L, g.C - first[v]));
      for (int l = 0; l < L; ++l) lane[v][l] = int32_t(k + l < g.K ? (k + l) / m - first[v] : 0);
    }
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      V acc[KV];
      for (int v = 0; v < KV; ++v) acc[v] = v < nv ? V::load(biasp + kb + v * L) : V::zero();
      for (int64_t r = 0; r < g.R; ++r) {
        const int64_t ih = oh * g.sh - g.pt + r * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t s = 0; s < g.S; ++s) {
          const int64_t iw = ow * g.sw - g.pl + s * g.dw;
          if (iw < 0 || iw >= g.W) continue;
          const T* pixel = ximg + (ih * g.W + iw) * g.C;
          const T* wt = wp + (r * g.S + s) * Kp + kb;
          for (int v = 0; v < nv; ++v)
            acc[v] = fmadd(m > 1 ? permute(load_masked(pixel + first[v], loaded[v]), lane[v])
                                 : input_lanes(pixel, kb + v * L, g.K),
                           V::load(wt + v * L), acc[v]);
        }
      }
      for (int v = 0; v < KV; ++v) activate(acc[v], epi.act).store(buf + v * L);
      copy_n(yrow + ow * g.K + kb, buf, min64(KV * L, g.K - kb));
      for (int v = 0; epi.stats.sum && v < nv; ++v) {
        const V z = V::load(buf + v * L);
        add_stats(epi.stats, kb + v * L, z, mul(z, z), min64(L, g.K - kb - v * L));
      }
    }
  }
}

template <typename T>
void forward_nhwc(const ConvGeom& g, const T* x, const T* wp, const Epilogue<T>& epi, T* y,
                  int nthreads) {
  constexpr int L = Vec<T>::lanes, KV = kChannelVectors;
  const int64_t Kp = packed_channels<T>(g), rows = g.N * g.OH;
  const std::vector<T> bias = padded_bias(epi, g.K, Kp);
  const T* biasp = bias.data();
  const int64_t plain = g.Kg() == 1 ? g.K / L * L : 0;  // channels in whole plain vectors
  const bool reuse = reuse_applies<T>(g);
  parallel_for(rows, threads_for(g.flops(), nthreads), [&](int64_t row) {
    const int64_t n = row / g.OH, oh = row % g.OH;
    const T* ximg = x + n * g.H * g.W * g.C;
    T* yrow = y + row * g.OW * g.K;
    // The input rows the next output row reads first (see prefetch_bytes), fetched while
    // the first channel chunk of this row computes.
    const int64_t ih_next = (oh + 1) * g.sh - g.pt + (g.R - 1) * g.dh;
    Ahead ahead;
    if (oh + 1 < g.OH && ih_next >= 0 && ih_next < g.H) {
      const int64_t rows = min64(g.sh, ih_next + 1);
      ahead.p = reinterpret_cast<const char*>(ximg + (ih_next - rows + 1) * g.W * g.C);
      ahead.bytes = int64_t(sizeof(T)) * rows * g.W * g.C;
    }
    int64_t k0 = 0;
    if (reuse) {  // every channel, the tail vector masked
      nhwc_row_reuse(g, ximg, oh, ceil_div(g.K, int64_t(L)), wp, Kp, biasp, epi, yrow, ahead);
      k0 = g.K, ahead = {};
    }
    for (; k0 + KV * L <= plain; k0 += KV * L, ahead = {})
      nhwc_row<T, KV>(g, ximg, oh, k0, wp, Kp, biasp, epi, yrow, ahead);
    for (; k0 + 2 * L <= plain; k0 += 2 * L, ahead = {})
      nhwc_row<T, 2>(g, ximg, oh, k0, wp, Kp, biasp, epi, yrow, ahead);
    for (; k0 + L <= plain; k0 += L, ahead = {})
      nhwc_row<T, 1>(g, ximg, oh, k0, wp, Kp, biasp, epi, yrow, ahead);
    if (k0 < g.K) nhwc_row_general(g, ximg, oh, k0, wp, Kp, biasp, epi, yrow);
  });
}

template <typename T>
void forward(const ConvGeom& g, const T* x, int x_layout, const T* w, const T* packed,
             const Epilogue<T>& epi, T* y, int y_layout, int nthreads) {
  if (x_layout == kNCHW && y_layout == kNCHW) return forward_nchw(g, x, w, epi, y, nthreads);
  const T* wp = packed_or_pack_now(packed, g, x_layout, y_layout, w, kWsPackedWeights,
                                   &weight_packing<T>, &pack_weights<T>, nthreads);
  if (x_layout == kNHWC) return forward_nhwc(g, x, wp, epi, y, nthreads);
  // NCHW input, channels_last output (a channels_last weight): transpose the input first, a
  // group of images at a time.
  const int64_t out_image = g.K * g.OH * g.OW;
  over_nhwc_image_groups(g, x, nthreads, [&](const ConvGeom& part, const T* xn, int64_t n0) {
    forward_nhwc(part, xn, wp, epi, y + n0 * out_image, nthreads);
  });
}

// ---------------------------------------------------------------------------------------
// Grad-input
// ---------------------------------------------------------------------------------------

// A stride-1, multiplier-1 layer's grad-input is a depthwise forward too: phase (0, 0) of
// problem.h's stride phases, every tap rotated. Other layers (strided, multipliers, padding
// beyond the kernel's extent) run the scatter or the direct kernel's grad-input.
// ---------------------------------------------------------------------------------------
// NCHW stride-2 grad-input by stride phases, in register tiles
// ---------------------------------------------------------------------------------------

// gx of a stride-2 layer (3x3 or 5x5, dilation 1, multiplier 1, pt and pl of one parity E)
// split by the parity (a, b) of its row and column: gx[2i + a][2j + b] is the sum over the
// taps r = a + E, s = b + E (mod 2) of w[r][s] gy[i + pt / 2 + shift(a, r)][j + pl / 2 +
// shift(b, s)], shift(a, r) = (a + E - r) / 2: a stride-1 gather of gy per phase. A tile
// computes the four phases of kPhaseTileRows row pairs x one vector of L j's (gx rows 2i,
// 2i + 1 x 2 L columns); each gy vector it reads is loaded once and feeds every phase and row
// whose taps reach it (9 FMAs per 4 gx vectors for 3x3, from 2 loads per row pair), and
// the even and odd columns are zipped back together at the store. No scatter, no transposes:
// gx is written once. (The channel-block scatter read and wrote gx 9 times in L1 and
// transposed it: 144 channels @56, batch 8, 2 threads, 1.2 ms.)
constexpr int kPhaseTileRows = kVectorRegisters >= 32 ? 4 : 2;

template <int S, int E>
struct PhaseTaps {
  static constexpr bool uses(int a, int r) { return ((a + E - r) & 1) == 0; }
  static constexpr int shift(int a, int r) { return (a + E - r) / 2; }  // exact: even
  static constexpr int lo() {
    int m = 0;
    for (int a = 0; a < 2; ++a)
      for (int r = 0; r < S; ++r)
        if (uses(a, r) && shift(a, r) < m) m = shift(a, r);
    return m;
  }
  static constexpr int hi() {
    int m = 0;
    for (int a = 0; a < 2; ++a)
      for (int r = 0; r < S; ++r)
        if (uses(a, r) && shift(a, r) > m) m = shift(a, r);
    return m;
  }
};
constexpr int kPhaseMaxGyRows = kPhaseTileRows + 3;  // 5x5: shifts -1 .. 1 or -2 .. 0

template <typename T>
struct PhaseTile {                  // one tile of row pairs of one plane
  const T* gy[kPhaseMaxGyRows];     // gy rows i0 + pt / 2 + lo .. (a zero row outside gy)
  T* gx;                            // gx row 2 i0, column 0
  int64_t W, OW, ql;                // gx's width, gy's, pl / 2
  int rows;                         // gx rows to store (2 kPhaseTileRows, fewer at the bottom)
  const T* w;                       // the plane's S x S taps
  bool stream;                      // interior stores non-temporal
  Prefetcher ahead;                 // the next plane's gy, a step per vector
};

// `count` vectors of j from j0. Edge: gy columns outside [0, OW) read as zeros (masked
// loads) and gx columns past W not stored.
template <typename T, int S, int E, bool Edge>
void grad_input_phase_columns(PhaseTile<T>& tile, int64_t j0, int64_t count) {
  using V = Vec<T>;
  using P = PhaseTaps<S, E>;
  constexpr int L = V::lanes, RT = kPhaseTileRows, lo = P::lo(), hi = P::hi();
  constexpr int U = RT + hi - lo;  // gy rows the tile reads
  constexpr bool weights_fit = S * S + 4 * RT + 1 <= kVectorRegisters - 2;  // else from memory
  V w[weights_fit ? S * S : 1];
  for (int t = 0; weights_fit && t < S * S; ++t) w[t] = V::broadcast(tile.w + t);
  const int64_t OW = tile.OW, W = tile.W, c0 = tile.ql;
  for (int64_t v = 0; v < count; ++v, j0 += L) {
    LaneMask<T> mask[hi - lo + 1];  // gy columns inside [0, OW), per column shift
    for (int c = lo; Edge && c <= hi; ++c)
      mask[c - lo] = lane_mask<T>(-(j0 + c0 + c), OW - (j0 + c0 + c));
    V acc[2][2][RT];
    for (int a = 0; a < 2; ++a)
      for (int b = 0; b < 2; ++b)
        for (int t = 0; t < RT; ++t) acc[a][b][t] = V::zero();
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const T* row = tile.gy[u] + j0 + c0;
      const T* wm = tile.w;
      if constexpr (!weights_fit) __asm__("" : "+r"(wm));  // not hoisted out of the row
#pragma GCC unroll 8
      for (int c = lo; c <= hi; ++c) {
        V gv = Edge ? load_masked(row + c, mask[c - lo]) : V::load(row + c);
        keep_in_register(gv);
#pragma GCC unroll 8
        for (int a = 0; a < 2; ++a) {
#pragma GCC unroll 8
          for (int r = 0; r < S; ++r) {
            const int t = u + lo - P::shift(a, r);  // the tile row tap r of phase a reads u for
            if (!P::uses(a, r) || t < 0 || t >= RT) continue;
#pragma GCC unroll 8
            for (int b = 0; b < 2; ++b) {
#pragma GCC unroll 8
              for (int s = 0; s < S; ++s) {
                if (!P::uses(b, s) || P::shift(b, s) != c) continue;
                const V wv = weights_fit ? w[r * S + s] : V::broadcast(wm + r * S + s);
                acc[a][b][t] = fmadd(wv, gv, acc[a][b][t]);
              }
            }
          }
        }
      }
    }
    // gx columns 2 j0 .. 2 j0 + 2 L - 1: each phase row's even and odd columns zipped.
    const int64_t valid = W - 2 * j0;
    const LaneMask<T> first = lane_mask<T>(0, valid), second = lane_mask<T>(0, valid - L);
    for (int t = 0; t < RT; ++t) {
      for (int a = 0; a < 2; ++a) {
        if (2 * t + a >= tile.rows) break;
        T* dst = tile.gx + (2 * t + a) * W + 2 * j0;
        const V z0 = zip_low(acc[a][0][t], acc[a][1][t]), z1 = zip_high(acc[a][0][t], acc[a][1][t]);
        if (Edge) {
          store_masked(dst, z0, first);
          store_masked(dst + L, z1, second);
        } else if (tile.stream) {
          z0.stream(dst);
          z1.stream(dst + L);
        } else {
          z0.store(dst);
          z1.store(dst + L);
        }
      }
    }
    tile.ahead.step();
  }
}

template <typename T, int S, int E>
void grad_input_phases(const ConvGeom& g, const T* gy, const T* w, T* gx, int nthreads) {
  using P = PhaseTaps<S, E>;
  constexpr int L = Vec<T>::lanes, RT = kPhaseTileRows, lo = P::lo(), hi = P::hi();
  constexpr int U = RT + hi - lo;
  const int64_t q = g.pt / 2, ql = g.pl / 2, OHW = g.OH * g.OW, HW = g.H * g.W;
  const int64_t ni = ceil_div(g.H, 2), nj = ceil_div(ceil_div(g.W, 2), L);
  // j vectors [v_in, v_out) read only gy columns inside [0, OW) and store whole vectors.
  const int64_t v_in = min64(nj, ceil_div(max64(0, -(ql + lo)), L));
  const int64_t right = g.OW - ql - hi - L;  // the last interior j0
  const int64_t v_out = right < 0 || g.W < 2 * L
                            ? v_in
                            : max64(v_in, min64(nj, min64(right / L, (g.W - 2 * L) / (2 * L)) + 1));
  const bool stream = stream_nchw_rows(g.N * g.C * HW * int64_t(sizeof(T)),
                                       g.W * int64_t(sizeof(T)), gx);
  parallel(threads_for(g.flops(), nthreads), [&](int tid, int nth) {
    int64_t begin, end;
    split_range(g.N * g.C, nth, tid, &begin, &end);
    if (begin >= end) return;
    T* zeros = thread_scratch<T>(round_up(g.OW, L));
    zero_n(zeros, g.OW);
    PhaseTile<T> tile{{}, nullptr, g.W, g.OW, ql, 0, nullptr, stream, Prefetcher()};
    for (int64_t p = begin; p < end; ++p) {
      const T* gyp = gy + p * OHW;
      T* gxp = gx + p * HW;
      tile.w = w + p % g.C * S * S;
      tile.ahead = Prefetcher(p + 1 < end ? gyp + OHW : nullptr, OHW * int64_t(sizeof(T)),
                              ceil_div(ni, RT) * nj);
      for (int64_t i0 = 0; i0 < ni; i0 += RT) {
        for (int u = 0; u < U; ++u) {
          const int64_t oh = i0 + q + lo + u;
          tile.gy[u] = oh >= 0 && oh < g.OH ? gyp + oh * g.OW : zeros;
        }
        tile.gx = gxp + 2 * i0 * g.W;
        tile.rows = int(min64(2 * RT, g.H - 2 * i0));
        if (v_in > 0) grad_input_phase_columns<T, S, E, true>(tile, 0, v_in);
        if (v_out > v_in) grad_input_phase_columns<T, S, E, false>(tile, v_in * L, v_out - v_in);
        if (nj > v_out) grad_input_phase_columns<T, S, E, true>(tile, v_out * L, nj - v_out);
      }
      tile.ahead.finish();
    }
    if (stream) stream_fence();
  });
}

// NCHW stride-2 layers whose gx rows fill over a vector (phase rows over half of one;
// narrower ones scatter). 576 channels @14, batch 8: 0.30 ms scattered, 0.17 in phases.
template <typename T>
bool grad_input_phases_apply(const ConvGeom& g) {
  return kTilesBuilt<T> && g.Kg() == 1 && g.R == g.S && (g.S == 3 || g.S == 5) && g.sh == 2 && g.sw == 2 &&
         g.dh == 1 && g.dw == 1 && g.pt % 2 == g.pl % 2 && 2 * g.W > Vec<T>::lanes;
}

template <typename T>
void grad_input_phases(const ConvGeom& g, const T* gy, const T* w, T* gx, int nthreads) {
  if (g.S == 3)
    return g.pt % 2 ? grad_input_phases<T, 3, 1>(g, gy, w, gx, nthreads)
                    : grad_input_phases<T, 3, 0>(g, gy, w, gx, nthreads);
  return g.pt % 2 ? grad_input_phases<T, 5, 1>(g, gy, w, gx, nthreads)
                  : grad_input_phases<T, 5, 0>(g, gy, w, gx, nthreads);
}

// ---------------------------------------------------------------------------------------
// Channels_last grad-input of layers strided along the width, by column phases
// ---------------------------------------------------------------------------------------

// gx of a layer with stride 2 and S = 3 or 5 taps along the width (dilation 1 there;
// multiplier 1; any rows: R, stride, dilation and padding), on NHWC tensors, vectors along
// the channels. Gx column c receives the taps s of its parity (c + pl - s even), each from
// gy column (c + pl - s) / 2. A tile computes 2 J consecutive gx columns from c0 (c0 + pl
// even) of one gx row and channel vector: each of the J + S / 2 gy vectors of a gy row it
// reads is loaded once and multiplied by every tap that sends it into the tile (3 J FMAs per
// J + 1 loads for 3x3), into 2 J accumulators, over the gy rows whose taps reach the gx row;
// gx is written once. Tiles read only gy columns inside [0, OW), with no checks: narrower
// tiles end the row, and the one or two columns at each end that would read outside run a
// pixel at a time. (With checks in every tile, a 28-wide row, all edges, ran 1.6x slower.
// The scatter read and wrote each gx pixel once per tap: 192 channels @28 stride 2, batch 8,
// 0.25 ms, torch 0.13.)
constexpr int kPhaseColumnPairs = kVectorRegisters >= 32 ? 8 : 4;  // J, at most
constexpr int kPhaseMaxTapRows = 8;                                // R, at most

template <typename T>
struct NhwcPhaseRow {             // one gx row
  const T* gy[kPhaseMaxTapRows];  // the gy rows whose taps reach it
  const T* w[kPhaseMaxTapRows];   // and their taps' weights: tap s, channel k at w[s * Kp + k]
  int rows;
  int64_t Kp, C, pl;
  T* gx;
  bool stream;  // whole-line stores, non-temporal
};

// 2 J gx columns from c0 (c0 + pl even), channels [k0, k0 + L); Partial: the channel tail,
// its `lanes` masked.
template <typename T, int S, int J, bool Partial>
void nhwc_phase_tile(const NhwcPhaseRow<T>& row, int64_t c0, int64_t k0, LaneMask<T> lanes) {
  using V = Vec<T>;
  constexpr int lo = -(S - 1) / 2;
  const int64_t C = row.C, u = (c0 + row.pl) / 2;  // gy column of tap 0 at gx column c0
  V acc[2 * J];  // every loop over it unrolled, or GCC keeps it on the stack
#pragma GCC unroll 16
  for (int q = 0; q < 2 * J; ++q) acc[q] = V::zero();
  for (int i = 0; i < row.rows; ++i) {
    const T* gr = row.gy[i] + u * C + k0;
    V wv[S];
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) wv[s] = V::load(row.w[i] + s * row.Kp + k0);
#pragma GCC unroll 16
    for (int d = lo; d < J; ++d) {  // gy column u + d reaches gx columns c0 + 2 d + s
      V gv = Partial ? load_masked(gr + d * C, lanes) : V::load(gr + d * C);
      keep_in_register(gv);
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) {
        const int q = 2 * d + s;
        if (q >= 0 && q < 2 * J) acc[q] = fmadd(wv[s], gv, acc[q]);
      }
    }
  }
  T* gx = row.gx + c0 * C + k0;
#pragma GCC unroll 16
  for (int q = 0; q < 2 * J; ++q) {
    if (Partial)
      store_masked(gx + q * C, acc[q], lanes);
    else if (row.stream)
      acc[q].stream(gx + q * C);
    else
      acc[q].store(gx + q * C);
  }
}

// Gx column c alone, its taps checked against gy's width.
template <typename T, int S>
void nhwc_phase_pixel(const NhwcPhaseRow<T>& row, int64_t OW, int64_t c, int64_t k0,
                      LaneMask<T> lanes) {
  using V = Vec<T>;
  V acc = V::zero();
  for (int i = 0; i < row.rows; ++i)
    for (int s = (c + row.pl) & 1; s < S; s += 2) {
      const int64_t ow = (c + row.pl - s) / 2;
      if (ow >= 0 && ow < OW)
        acc = fmadd(V::load(row.w[i] + s * row.Kp + k0),
                    load_masked(row.gy[i] + ow * row.C + k0, lanes), acc);
    }
  store_masked(row.gx + c * row.C + k0, acc, lanes);
}

template <typename T>
bool nhwc_phases_apply(const ConvGeom& g, int gy_layout, int gx_layout) {
  return g.Kg() == 1 && gy_layout == kNHWC && gx_layout == kNHWC && g.sw == 2 && g.dw == 1 &&
         (g.S == 3 || g.S == 5) && g.R <= kPhaseMaxTapRows;
}

template <typename T, int S, int... I>
void grad_input_nhwc_phases(const ConvGeom& g, const T* gy, const T* w, T* gx, int nthreads,
                            std::integer_sequence<int, I...>) {
  using Tile = void (*)(const NhwcPhaseRow<T>&, int64_t, int64_t, LaneMask<T>);
  static const Tile tiles[2][sizeof...(I)] = {{&nhwc_phase_tile<T, S, I + 1, false>...},
                                              {&nhwc_phase_tile<T, S, I + 1, true>...}};
  constexpr int L = Vec<T>::lanes, J = kPhaseColumnPairs;
  const int64_t Kp = packed_channels<T>(g), KV = ceil_div(g.K, int64_t(L));
  const T* wp = packed_for_blocks(g, w, nthreads);
  // Tiles cover gx columns [a, b): from the first of pl's parity whose taps all read gy
  // columns >= 0, to the last whose taps read gy columns < OW (or W).
  const int64_t lowest = max64(0, S - 1 - g.pl), first = lowest + ((lowest + g.pl) & 1);
  const int64_t begin = min64(g.W, first), end = max64(begin, min64(g.W, 2 * g.OW - g.pl));
  // gx far larger than the caches goes around them (tuning.h).
  const bool stream = stream_nhwc(g.N * g.H * g.W * g.C * int64_t(sizeof(T)),
                                  tuning().depthwise_grad_input_stream_min_bytes, g.C, gx);
  parallel_for(g.N * g.H, threads_for(g.flops(), nthreads), [&](int64_t item) {
    const int64_t n = item / g.H, ih = item % g.H;
    NhwcPhaseRow<T> row{};
    row.Kp = Kp, row.C = g.C, row.pl = g.pl;
    for (int64_t r = 0; r < g.R; ++r) {  // the gy rows whose tap r reads gx row ih
      const int64_t at = ih + g.pt - r * g.dh;
      if (at < 0 || at % g.sh || at / g.sh >= g.OH) continue;
      row.gy[row.rows] = gy + (n * g.OH + at / g.sh) * g.OW * g.C;
      row.w[row.rows++] = wp + r * g.S * Kp;
    }
    row.gx = gx + item * g.W * g.C;
    row.stream = stream;
    const auto pixels = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t v = 0; v < KV; ++v)
          nhwc_phase_pixel<T, S>(row, g.OW, c, v * L, lane_mask<T>(0, g.K - v * L));
    };
    pixels(0, begin);
    // Pixel-major, as the forward's rows: consecutive tiles write neighbouring lines.
    int64_t c0 = begin;
    while (end - c0 >= 2) {
      const int64_t pairs = min64(J, (end - c0) / 2);
      for (int64_t v = 0; v < KV; ++v) {
        const int64_t k0 = v * L, lanes = min64(L, g.K - k0);
        tiles[lanes < L][pairs - 1](row, c0, k0, lane_mask<T>(0, lanes));
      }
      c0 += 2 * pairs;
    }
    pixels(c0, g.W);
    if (row.stream) stream_fence();
  });
}

template <typename T>
void grad_input_nhwc_phases(const ConvGeom& g, const T* gy, const T* w, T* gx, int nthreads) {
  const auto widths = std::make_integer_sequence<int, kPhaseColumnPairs>{};
  if (g.S == 3) return grad_input_nhwc_phases<T, 3>(g, gy, w, gx, nthreads, widths);
  return grad_input_nhwc_phases<T, 5>(g, gy, w, gx, nthreads, widths);
}

bool grad_input_as_forward(const ConvGeom& g) {
  const int64_t eh = g.dh * (g.R - 1), ew = g.dw * (g.S - 1);
  return g.Kg() == 1 && g.sh == 1 && g.sw == 1 && g.pt <= eh && g.pb <= eh && g.pl <= ew &&
         g.pr <= ew;
}

ConvGeom grad_input_geometry(const ConvGeom& g) {
  return phase_geometry(g, phase_axis(0, 1, g.dh, g.pt, g.R, g.H),
                        phase_axis(0, 1, g.dw, g.pl, g.S, g.W));
}

template <typename T>
void grad_input(const ConvGeom& g, const T* gy, int gy_layout, const T* w, T* gx, int gx_layout,
                int nthreads);

// Multiplier m > 1: gx is the sum over j < m of the grad-input of the multiplier-1 layer of
// output channels j, m + j, 2m + j, ... (their grad_y channels and filters gathered dense),
// each run by the paths below. The direct kernel filled m lanes of a vector per group:
// batch 8, 2 threads, ms (torch): 32 channels x 2 @56 14.2 (5.3), stride 2 8.1 (1.4);
// channels_last 64 x 2 @28 6.1 (1.3); 48 x 4 @28 stride 2 3.6 (0.67).
template <typename T>
void grad_input_by_multiplier(const ConvGeom& g, const T* gy, int gy_layout, const T* w, T* gx,
                              int gx_layout, int nthreads) {
  const int64_t m = g.Kg(), C = g.C, RS = g.R * g.S, OHW = g.OH * g.OW, HW = g.H * g.W;
  ConvGeom one = g;
  one.K = C;
  T* gy_j = workspace_as<T>(kWsMultiplierSlice, g.N * C * OHW + C * RS);
  T* w_j = gy_j + g.N * C * OHW;
  T* part = workspace_as<T>(kWsMultiplierSum, g.N * C * HW);
  const int threads = threads_for(g.N * g.K * OHW * 4, nthreads);
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t c = 0; c < C; ++c) copy_n(w_j + c * RS, w + (c * m + j) * RS, RS);
    if (gy_layout == kNCHW) {  // planes (n, c m + j) -> (n, c)
      parallel_for(g.N * C, threads, [&](int64_t p) {
        copy_n(gy_j + p * OHW, gy + (p / C * g.K + p % C * m + j) * OHW, OHW);
      });
    } else {  // pixels' channels c m + j -> c
      parallel_for(g.N * OHW, threads, [&](int64_t p) {
        const T* src = gy + p * g.K + j;
        T* dst = gy_j + p * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = src[c * m];
      });
    }
    T* out = j == 0 ? gx : part;
    grad_input(one, gy_j, gy_layout, w_j, out, gx_layout, nthreads);
    if (j > 0) {  // same layout, so elementwise
      const int64_t n = g.N * C * HW, chunk = 1 << 14;
      parallel_for(ceil_div(n, chunk), threads, [&](int64_t b) {
        const int64_t lo = b * chunk, len = min64(chunk, n - lo);
        for (int64_t i = 0; i < len; ++i) gx[lo + i] += part[lo + i];
      });
    }
  }
}

template <typename T>
void grad_input(const ConvGeom& g, const T* gy, int gy_layout, const T* w, T* gx, int gx_layout,
                int nthreads) {
  if (g.Kg() > 1) return grad_input_by_multiplier(g, gy, gy_layout, w, gx, gx_layout, nthreads);
  if (!grad_input_as_forward(g)) {
    if constexpr (kTilesBuilt<T>) {
      if (gy_layout == kNCHW && gx_layout == kNCHW && grad_input_phases_apply<T>(g))
        return grad_input_phases(g, gy, w, gx, nthreads);
    }
    if (nhwc_phases_apply<T>(g, gy_layout, gx_layout))
      return grad_input_nhwc_phases(g, gy, w, gx, nthreads);
    if (scatter_applies(g, Vec<T>::lanes, gy_layout, gx_layout))
      return grad_input_scatter(g, gy, gy_layout, w, gx, gx_layout, nthreads);
    return direct_kernels<T>().grad_input(g, gy, gy_layout, w, gx, gx_layout, nthreads);
  }
  const int64_t RS = g.R * g.S;
  T* rotated = workspace_as<T>(kWsWeightsTapMajor, g.K * RS);
  for (int64_t k = 0; k < g.K; ++k)
    for (int64_t t = 0; t < RS; ++t) rotated[k * RS + t] = w[k * RS + RS - 1 - t];
  forward<T>(grad_input_geometry(g), gy, gy_layout, rotated, nullptr, Epilogue<T>(), gx,
             gx_layout, nthreads);
}

// Mirrors the workspace_as calls above (NCHW tensors assumed).
template <typename T>
int64_t workspace_bytes(const ConvGeom& g, Pass pass) {
  if (pass == Pass::kGradInput) {
    if (g.Kg() > 1) {  // grad_input_by_multiplier: its two buffers, then each slice's call
      ConvGeom one = g;
      one.K = g.C;
      return int64_t(sizeof(T)) * (g.N * g.C * (g.OH * g.OW + g.H * g.W) + g.C * g.R * g.S) +
             workspace_bytes<T>(one, Pass::kGradInput);
    }
    if (!grad_input_as_forward(g)) {
      if constexpr (kTilesBuilt<T>) {
        if (grad_input_phases_apply<T>(g)) return 0;  // register tiles, reading gy as it is
      }
      // the scatter: packed weights (and per-thread scratch)
      return channel_blocks_apply(g, Vec<T>::lanes)
                 ? int64_t(sizeof(T)) * weight_packing<T>(g, kNHWC, kNHWC).elements
                 : direct_kernels<T>().workspace_bytes(g, pass);
    }
    return int64_t(sizeof(T)) * g.K * g.R * g.S +
           workspace_bytes<T>(grad_input_geometry(g), Pass::kForward);
  }
  if (pass == Pass::kGradWeight) return 0;  // NCHW operands need no copies
  // The NCHW forward packs weights for its channel blocks only (packed_for_blocks).
  return nchw_blocked_channels<T>(g) ? int64_t(sizeof(T)) * g.R * g.S * packed_channels<T>(g)
                                     : 0;
}

}  // namespace

template <typename T>
ConvKernels<T> depthwise_kernels() {
  return ConvKernels<T>::all(&forward<T>, &grad_input<T>, &grad_weight<T>, &workspace_bytes<T>)
      .with_packing(&weight_packing<T>, &pack_weights<T>);
}
template ConvKernels<float> depthwise_kernels<float>();
template ConvKernels<double> depthwise_kernels<double>();

}  // namespace FASTCONV_ISA
}  // namespace fastconv
