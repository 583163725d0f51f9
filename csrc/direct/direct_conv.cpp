// Direct convolution: forward, grad-input, grad-weight and grad-bias, for one ISA (this file
// is compiled once per ISA, see simd.h).
//
// Strategy (after oneDNN's jit_avx512_common / brgconv kernels, ../shared/notes §1):
//   * Activations are read as NHWC: a channels_last input in place, an NCHW one transposed
//     (16 x 16 register blocks) into a reused workspace, a group of images at a time.
//     Padding is applied inside the kernel: tiles whose windows stay inside the input take
//     the unchecked path (InteriorTaps); border tiles read a row of zeros for the taps that
//     fall outside (BorderTaps), so no padded copy is ever made.
//   * Weights are packed per group and per block of BK = NBK * lanes output channels as
//     [tap = r*S + s][c][BK]: one vector load gives BK/NBK output channels of one (c, tap).
//   * The micro-kernel holds an UR x NBK tile of accumulators: UR consecutive output pixels
//     (flattened over n, oh, ow, so 7x7 and 14x14 maps fill every tile) times NBK vectors of
//     output channels. Per input channel it loads NBK weight vectors and broadcasts UR input
//     values, then issues UR * NBK FMAs.
//   * Grad-input is the same kernel run over the output gradient (zeros inserted between
//     pixels when strided) with the weights flipped and in/out channels swapped.
//   * Grad-weight holds a URC x NBK tile of dW (URC input channels of one tap, NBK vectors of
//     output channels) in registers and sweeps a chunk of output pixels.
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/layout.h"
#include "../common/simd.h"
#include "../common/tuning.h"
#include "../common/workspace.h"
#include "../isa/kernel_table.h"

namespace fastconv {
namespace FASTCONV_ISA {
namespace {

// Register blocking: UR pixels x NBK channel vectors. UR * NBK accumulators + NBK weight
// vectors + one broadcast fill the register file. Any UR >= 1 and NBK >= 1 that fit are
// valid: a block of kv < NBK * lanes channels runs the kernel instantiated for its
// ceil(kv / lanes) vectors (with_vectors).
// AVX-512: 6 x 4 replaced 12 x 2 (chosen on Zen 5) after an interleaved sweep on the Xeon
// VM (family 6 model 207; 12x2, 6x4, 8x3, 9x3, 4x6, 14x2, 7x4; forward vs torch, median of
// 9-15 rounds, 3 alternating runs): ResNet-50 N=8 3x3/2 128 @56 0.82-0.92x (12x2:
// 0.75-0.84x), 3x3/2 256 @28 0.85-0.97x (0.84-0.88x), 3x3/2 512 @14 even there and 0.92x
// against 0.77x in report_passes.py; N=1 3x3 512 @7 1.01-1.09x (0.83-0.97x). Half the
// broadcasts per FMA. benchmarks/results/direct_tile_ab_2026-11-27-xeon.txt has the runs.
// On Zen 4 (2026-12-06) 6 x 4 is as good or 4-9 % faster than 12 x 2 on the same strided
// forwards (benchmarks/results/direct_tile_ab_2026-12-06-zen4.txt).
#if defined(FASTCONV_ISA_AVX512)
constexpr int kUr = 6, kNbk = 4;  // 24 accumulators of 32 zmm
#elif defined(FASTCONV_ISA_AVX2)
constexpr int kUr = 6, kNbk = 2;  // 12 accumulators of 16 ymm
#else
constexpr int kUr = 4, kNbk = 2;
#endif
constexpr int kUrc = kUr;  // grad-weight: input channels per tile
static_assert(kUr >= 1 && kNbk >= 1, "direct: empty register tile");

// Calls f(std::integral_constant<int, V>) for the V = nv in [1, NBK] vectors of a channel
// block, so each partial block runs a kernel of exactly its width.
template <int NBK, typename F>
inline void with_vectors(int64_t nv, F&& f) {
  if constexpr (NBK > 1)
    if (nv < NBK) return with_vectors<NBK - 1>(nv, f);
  f(std::integral_constant<int, NBK>{});
}

// ---------------------------------------------------------------------------------------
// Weight packing
// ---------------------------------------------------------------------------------------

// Grad-input's packed weights: the filters flipped, input and output channels swapped, and
// split by stride phase, each phase in the forward's packed layout. For G groups of Cg
// "output" channels (the convolution's inputs c) x Kg "input" channels (its outputs k), a
// phase with n taps has blocks (g, cb) from its `offset` + ((g * CB + cb) * n * Kg) * BK,
// each [tap'][k][bw] (bw = BK, or for the last block round_up(remaining channels, lanes);
// channels past Cg are zero). Filter tap s (r * S + s) is that phase's tap' `slot`.
struct PackedTap {
  int64_t offset = -1;  // its phase's packing in wp (-1: no phase reads the tap)
  int64_t ntaps = 0, slot = 0;
};

// All phases in one pass over w (a pass per phase read the weights sh * sw times). Threads
// take whole filters w[k] (Cg * RS contiguous values, read in order: reading one block's
// slice of every filter crossed a page per filter and defeated the prefetchers); each 16 c x
// RS piece is transposed in registers and each tap's run of channels stored at its packed
// place (a scratch piece copied out read back masked stores: 3x3 512 @7, batch 1, a third
// of grad-input's time; a gather of single values took 1.2 ms).
template <typename T>
void pack_grad_input_weights(const T* w, int64_t G, int64_t Kg, int64_t Cg, int64_t RS,
                             const PackedTap* taps, int64_t BK, int lanes, T* wp, int nthreads) {
  constexpr int64_t B = kTransposeBlock;
  const int64_t CB = ceil_div(Cg, BK);
  const T* const end = w + G * Kg * Cg * RS;
  parallel_for(G * Kg, threads_for(G * Kg * Cg * RS * 4, nthreads), [&](int64_t gk) {
    const int64_t g = gk / Kg, k = gk % Kg;
    T** dst = thread_scratch<T*>(RS);  // per tap, its row of the block (null: unused)
    T* unused = thread_scratch<T>(B);  // where unused taps' runs land
    const T* src = w + gk * Cg * RS;  // (c, tap) at src[c * RS + tap]
    for (int64_t cb = 0; cb < CB; ++cb) {
      const int64_t c0 = cb * BK, cv = min64(BK, Cg - c0), bw = round_up(cv, lanes);
      for (int64_t t = 0; t < RS; ++t)  // tap t's row of block (g, cb) for filter k
        dst[t] = taps[t].offset < 0 ? nullptr
                                    : wp + taps[t].offset + (g * CB + cb) * taps[t].ntaps * Kg * BK +
                                          (taps[t].slot * Kg + k) * bw;
      for (int64_t cc = 0; cc < cv; cc += B) {
        const int rows = int(min64(B, cv - cc));
        for (int64_t t0 = 0; t0 < RS; t0 += B)
          transpose_block_to(src + (c0 + cc) * RS + t0, RS, rows, int(min64(B, RS - t0)),
                             [&](int j) { return dst[t0 + j] ? dst[t0 + j] + cc : unused; }, end);
      }
      if (bw > cv)
        for (int64_t t = 0; t < RS; ++t)
          if (dst[t]) zero_n(dst[t] + cv, bw - cv);
    }
  });
}

// Elements of pack_weights' output for G groups of Kg output x Cg input channels.
template <typename T>
int64_t packed_weight_count(int64_t G, int64_t Kg, int64_t Cg, int64_t RS) {
  constexpr int64_t BK = kNbk * Vec<T>::lanes;
  return G * ceil_div(Kg, BK) * BK * Cg * RS;
}

// ---------------------------------------------------------------------------------------
// Forward micro-kernel and driver
// ---------------------------------------------------------------------------------------

// out[j][b*lanes + i] = sum over taps t and input channels c of
//     p_t[j][c] * w[(t * Cg + c) * NBK*lanes + b*lanes + i]
// for UR pixels j and NBK vectors of output channels, where taps(t, p_t) supplies the UR
// input pointers of tap t (see InteriorTaps and BorderTaps).
template <typename T, int UR, int NBK, typename Taps>
inline void f_direct_tile(const Taps& taps, int64_t ntaps, int64_t Cg, const T* w, T* out) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  V acc[UR][NBK];
  for (int j = 0; j < UR; ++j)
    for (int b = 0; b < NBK; ++b) acc[j][b] = V::zero();
  for (int64_t t = 0; t < ntaps; ++t) {
    const T* p[UR];
    taps(t, p, UR);
    for (int64_t c = 0; c < Cg; ++c, w += NBK * L) {
      V wv[NBK];
      for (int b = 0; b < NBK; ++b) wv[b] = V::load(w + b * L);
      for (int j = 0; j < UR; ++j) {
        const V xv = V::broadcast(p[j] + c);
        for (int b = 0; b < NBK; ++b) acc[j][b] = fmadd(xv, wv[b], acc[j][b]);
      }
    }
  }
  for (int j = 0; j < UR; ++j)
    for (int b = 0; b < NBK; ++b) acc[j][b].store(out + (j * NBK + b) * L);
}

// f_direct_tile for a tile with m valid pixels and nv channel vectors: the full UR = kUr
// kernel, or for the last tile of the batch's flattened pixels the smallest of kUr/3,
// 2 kUr/3 that covers it (a 7x7 map at batch 1 is 8 tiles of 6 pixels and one of 1, which
// runs the 2-pixel kernel; when tiles were 12 pixels a full last tile computed 60 for 49).
template <typename T, typename Taps>
inline void f_direct_tile_for(const Taps& taps, int64_t m, int64_t nv, int64_t ntaps,
                              int64_t Cg, const T* w, T* out) {
  constexpr int U1 = kUr % 3 == 0 ? kUr / 3 : kUr, U2 = kUr % 3 == 0 ? 2 * kUr / 3 : kUr;
  with_vectors<kNbk>(nv, [&](auto v) {
    constexpr int V = decltype(v)::value;
    if (m <= U1)
      f_direct_tile<T, U1, V>(taps, ntaps, Cg, w, out);
    else if (m <= U2)
      f_direct_tile<T, U2, V>(taps, ntaps, Cg, w, out);
    else
      f_direct_tile<T, kUr, V>(taps, ntaps, Cg, w, out);
  });
}

// Tap pointers of a tile whose every tap lies inside the input: one add per pixel.
template <typename T>
struct InteriorTaps {
  const T* const* px;      // kUr pixel base pointers (tap 0, first channel of the group)
  const int64_t* tap_off;  // element offset of each tap from the pixel base
  void operator()(int64_t t, const T** p, int n) const {  // the first n pixels
    for (int j = 0; j < n; ++j) p[j] = px[j] + tap_off[t];
  }
};

// Tap pointers of a tile that touches the padding: taps outside the input read a row of
// zeros instead. This is how padding is applied without a padded copy of the input.
template <typename T>
struct BorderTaps {
  const T* x;              // the input's first element of this group's channels
  const int64_t* ih0;      // per pixel: top-left input row / column of its window (may be < 0)
  const int64_t* iw0;
  const int64_t* n_off;    // per pixel: offset of its image
  const int64_t* tap_dh;   // per tap: row / column offset within the window
  const int64_t* tap_dw;
  int64_t H, W, C;
  const T* zeros;
  void operator()(int64_t t, const T** p, int n) const {  // the first n pixels
    for (int j = 0; j < n; ++j) {
      const int64_t ih = ih0[j] + tap_dh[t], iw = iw0[j] + tap_dw[t];
      p[j] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? x + n_off[j] + (ih * W + iw) * C : zeros;
    }
  }
};

// The tensors of forward_nhwc's convolution.
template <typename T>
struct NhwcOperands {
  const T* x = nullptr;     // (n, h, w, c) at x[((n * H + h) * W + w) * C + c]
  const T* wp = nullptr;    // packed as in pack_weights with BK = kNbk * lanes, or null:
  const T* w = nullptr;     //   the OIHW weights, each thread packing the blocks it reaches
  T* block_buf = nullptr;   //   into its own block of this (packs_block_by_block)
  Epilogue<T> epi;          // bias (epi.shift), activation, statistics
  T* y = nullptr;           // N x K x OH x OW in y_layout
  int y_layout = kNCHW;
};

// The forward's packed [tap][c][BK] blocks from torch's OIHW weights in one pass (a gather
// with stride C*R*S was most of the call on the weight-bound layers, 3x3 512 @7 at batch 1).
// 16 filters at a time, read as 16 in-order streams along their (c, tap) entries: each
// 16 x 16 block of them is transposed in registers into 16 vectors of 16 filters, one per
// (c, tap), stored at its packed place. One transpose per weight: the earlier two (each
// filter's piece to tap-major, then each tap's block to [c][k]) made packing take longer
// than the convolution, 3x3 512 @7 at batch 1: 0.85 ms of 1.55 (prepacked 0.69).
template <typename T>
void pack_weight_block_oihw(const T* w, int64_t Kg, int64_t Cg, int64_t RS, int64_t BK, int lanes,
                            int64_t blk, T* d) {
  constexpr int B = kTransposeBlock;
  const int64_t KB = ceil_div(Kg, BK), CRS = Cg * RS;
  const int64_t g = blk / KB, kb = blk % KB;
  const int64_t k0 = kb * BK, kv = min64(BK, Kg - k0), bw = round_up(kv, lanes);
  for (int64_t kk = 0; kk < kv; kk += B) {
    const int krows = int(min64(B, kv - kk));
    const T* src = w + (g * Kg + k0 + kk) * CRS;  // filter kk + i's entry c * RS + t
    for (int64_t j0 = 0; j0 < CRS; j0 += B) {
      const int cols = int(min64(B, CRS - j0));
      // entry j0 + j = c * RS + t goes to d[(t * Cg + c) * bw + kk]
      int64_t at[B];
      for (int64_t j = 0, c = j0 / RS, t = j0 % RS; j < cols; ++j) {
        at[j] = (t * Cg + c) * bw + kk;
        if (++t == RS) t = 0, ++c;
      }
      transpose_block_to(src + j0, CRS, krows, cols, [&](int j) { return d + at[j]; });
    }
  }
  if (bw > kv)
    for (int64_t tc = 0; tc < RS * Cg; ++tc) zero_n(d + tc * bw + kv, bw - kv);
}

// Whether all of a forward's packed weights fit in the L2 budget (tuning.h), so that a
// pixel tile runs its channel blocks back to back.
template <typename T>
bool weights_fit_l2(const ConvGeom& p) {
  constexpr int64_t BK = kNbk * Vec<T>::lanes;
  return p.groups * ceil_div(p.Kg(), BK) * p.R * p.S * p.Cg() * BK * int64_t(sizeof(T)) <=
         tuning().direct_blocks_fastest_max_weight_bytes;
}

// Whether a forward without prepacked weights packs each block of them as its units reach
// it, into a per-thread buffer, rather than all of them first. Taken where the units run
// block by block (the weights overflow L2) and the call converts its input in one image
// group, so each block is packed once (twice at most where a thread's units begin inside
// one): the packed copy is then read from L2 instead of written to memory and read back.
// Batch 1, ms, two alternating runs each, packed first / block by block / prepacked (the
// weight cache) / torch: 3x3 512 @7 (9 MiB of weights) 1.84 1.83 / 1.46 1.44 / 0.95 0.91 /
// 1.27 1.25; 3x3/2 512 @14 1.80 1.87 / 1.45 1.58 / 1.11 1.13 / 1.38 1.47.
template <typename T>
bool packs_block_by_block(const ConvGeom& p) {
  const int64_t image = p.C * p.H * p.W;
  return !weights_fit_l2<T>(p) && images_per_group(image * int64_t(sizeof(T))) >= p.N;
}

// The convolution `p` of an NHWC input: output (oh, ow) reads input rows oh*sh - pt + r*dh
// and columns ow*sw - pl + s*dw; anything outside H x W is zero (pt, pl may be negative;
// pb, pr are not read: OH and OW say where the output ends).
template <typename T>
void forward_nhwc(const ConvGeom& p, const NhwcOperands<T>& op, int nthreads) {
  constexpr int L = Vec<T>::lanes, BK = kNbk * L;
  const int64_t K = p.K, Cg = p.Cg(), Kg = p.Kg(), KB = ceil_div(Kg, BK), RS = p.R * p.S;
  const int64_t OHW = p.OH * p.OW, P = p.N * OHW, NT = ceil_div(P, kUr);
  const int64_t blocks = p.groups * KB, units = blocks * NT;
  if (P == 0 || K == 0) return;

  // Per-tap tables, and a row of zeros that out-of-range taps read.
  int64_t* tables = workspace_as<int64_t>(kWsTapTables, 3 * RS + ceil_div(p.C * int64_t(sizeof(T)), 8));
  int64_t *tap_off = tables, *tap_dh = tables + RS, *tap_dw = tables + 2 * RS;
  T* zeros = reinterpret_cast<T*>(tables + 3 * RS);
  std::memset(zeros, 0, sizeof(T) * p.C);
  for (int64_t t = 0; t < RS; ++t) {
    tap_dh[t] = (t / p.S) * p.dh;
    tap_dw[t] = (t % p.S) * p.dw;
    tap_off[t] = (tap_dh[t] * p.W + tap_dw[t]) * p.C;
  }
  const int64_t ext_h = (p.R - 1) * p.dh, ext_w = (p.S - 1) * p.dw;

  // Unit order (tuning.h): the channel blocks of a tile back to back when every block's
  // weights fit in L2, so the tile's input is read once; else the tiles of one block.
  // 3x3/2 128 @56, batch 8 (590 KiB of weights, 2 blocks), best of 25 calls in three
  // alternating runs, ms: NCHW 11.30 11.90 11.67 -> 9.89 10.92 11.01, channels_last 8.88
  // 9.54 9.53 -> 8.26 9.06 9.06 (the Xeon VM, host loaded).
  const bool blocks_fastest = weights_fit_l2<T>(p);
  parallel(threads_for(2 * P * K * Cg * RS, nthreads), [&](int tid, int nth) {
    int64_t u0, u1;
    split_range(units, nth, tid, &u0, &u1);
    T* own_block = op.wp ? nullptr : op.block_buf + tid * RS * Cg * BK;
    int64_t own_blk = -1;  // the block own_block holds
    alignas(64) T tile[kUr * BK];
    const T* px[kUr];
    int64_t pn[kUr], pq[kUr], ih0[kUr], iw0[kUr], n_off[kUr];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t tile_i = blocks_fastest ? u / blocks : u % NT;
      const int64_t blk = blocks_fastest ? u % blocks : u / NT;
      const int64_t g = blk / KB, kb = blk % KB;
      const int64_t first = tile_i * kUr, m = min64(kUr, P - first);
      const T* xg = op.x + g * Cg;
      bool interior = true;
      for (int j = 0; j < kUr; ++j) {
        // Pixels past the end repeat the last one; their results are not stored.
        const int64_t pix = first + min64(j, m - 1);
        const int64_t n = pix / OHW, q = pix % OHW, oh = q / p.OW, ow = q % p.OW;
        pn[j] = n;
        pq[j] = q;
        ih0[j] = oh * p.sh - p.pt;
        iw0[j] = ow * p.sw - p.pl;
        n_off[j] = n * p.H * p.W * p.C;
        interior = interior && ih0[j] >= 0 && ih0[j] + ext_h < p.H && iw0[j] >= 0 &&
                   iw0[j] + ext_w < p.W;
        if (interior) px[j] = xg + n_off[j] + (ih0[j] * p.W + iw0[j]) * p.C;
      }
      const int64_t k0 = kb * BK, kv = min64(BK, Kg - k0);
      const T* w = own_block;
      if (op.wp) {
        w = op.wp + blk * RS * Cg * BK;
      } else if (blk != own_blk) {
        pack_weight_block_oihw(op.w, Kg, Cg, RS, BK, L, blk, own_block);
        own_blk = blk;
      }
      const int64_t nv = ceil_div(kv, int64_t(L));  // the block's packed width is nv * L
      if (interior) {
        const InteriorTaps<T> taps{px, tap_off};
        f_direct_tile_for(taps, m, nv, RS, Cg, w, tile);
      } else {
        BorderTaps<T> taps;
        taps.x = xg;
        taps.ih0 = ih0;
        taps.iw0 = iw0;
        taps.n_off = n_off;
        taps.tap_dh = tap_dh;
        taps.tap_dw = tap_dw;
        taps.H = p.H;
        taps.W = p.W;
        taps.C = p.C;
        taps.zeros = zeros;
        f_direct_tile_for(taps, m, nv, RS, Cg, w, tile);
      }
      const int64_t bw = round_up(kv, L), kg0 = g * Kg + k0;
      // Epilogue (bias, activation, statistics) on the tile's valid pixels, in L1, then
      // stored in the output's layout.
      for (int64_t j = 0; j < m; ++j) finish_pixel_run(op.epi, kg0, tile + j * bw, kv);
      if (op.y_layout == kNHWC) {
        for (int64_t j = 0; j < m; ++j) copy_n(op.y + (first + j) * K + kg0, tile + j * bw, kv);
      } else if (pn[0] == pn[m - 1]) {
        // NCHW, one image: each channel gets a contiguous run of m pixels; the tile is
        // transposed in (pixels x 16 channels) register blocks.
        T* y0 = op.y + (pn[0] * K + kg0) * OHW + pq[0];
        for (int64_t k0 = 0; k0 < kv; k0 += kTransposeBlock)
          transpose_block(tile + k0, bw, y0 + k0 * OHW, OHW, int(m),
                          int(min64(kTransposeBlock, kv - k0)));
      } else {
        for (int64_t j = 0; j < m; ++j)
          for (int64_t k = 0; k < kv; ++k)
            op.y[(pn[j] * K + kg0 + k) * OHW + pq[j]] = tile[j * bw + k];
      }
    }
  });
}

// All the blocks, threads taking whole blocks.
template <typename T>
void pack_weights_oihw(const T* w, int64_t G, int64_t Kg, int64_t Cg, int64_t RS, int64_t BK,
                       int lanes, T* wp, int nthreads) {
  const int nt = threads_for(G * Kg * Cg * RS * 4, nthreads);
  parallel_for(G * ceil_div(Kg, BK), nt, [&](int64_t blk) {
    pack_weight_block_oihw(w, Kg, Cg, RS, BK, lanes, blk, wp + blk * RS * Cg * BK);
  });
}

// The forward's packed weights (the same whatever the layouts).
template <typename T>
WeightPacking weight_packing(const ConvGeom& g, int, int) {
  return {packed_weight_count<T>(g.groups, g.Kg(), g.Cg(), g.R * g.S), 0};
}

template <typename T>
void pack_forward_weights(const ConvGeom& g, int, int, const T* w, T* wp, int nthreads) {
  constexpr int L = Vec<T>::lanes, BK = kNbk * L;
  pack_weights_oihw(w, g.groups, g.Kg(), g.Cg(), g.R * g.S, BK, L, wp, nthreads);
}

template <typename T>
void forward(const ConvGeom& g, const T* x, int x_layout, const T* w, const T* packed,
             const Epilogue<T>& epi, T* y, int y_layout, int nthreads) {
  NhwcOperands<T> op;
  if (!packed && packs_block_by_block<T>(g)) {
    constexpr int64_t BK = kNbk * Vec<T>::lanes;
    op.w = w;
    op.block_buf = workspace_as<T>(kWsPackedWeights, nthreads * g.R * g.S * g.Cg() * BK);
  } else {
    op.wp = packed_or_pack_now(packed, g, x_layout, y_layout, w, kWsPackedWeights,
                               &weight_packing<T>, &pack_forward_weights<T>, nthreads);
  }
  op.x = x;
  op.epi = epi;
  op.y = y;
  op.y_layout = y_layout;
  if (x_layout == kNHWC) return forward_nhwc(g, op, nthreads);
  // NCHW input: transposed to NHWC a group of images at a time, the weights packed once.
  const int64_t out_image = g.K * g.OH * g.OW;
  over_nhwc_image_groups(g, x, nthreads, [&](const ConvGeom& part, const T* xn, int64_t n0) {
    op.x = xn;
    op.y = y + n0 * out_image;  // image n0's output starts here in either layout
    forward_nhwc(part, op, nthreads);
  });
}

// grad_x is the adjoint of the forward: each grad_y pixel (oh, ow) spreads over the input
// pixels (oh*sh - pt + r*dh, ow*sw - pl + s*dw). Its stride-1 form is a forward convolution
// over grad_y with the flipped weights, input and output channels swapped,
//   w'[c][k][r][s] = w[k][c][R-1-r][S-1-s]   (per group).
// A strided convolution is split into sh x sw such problems, one per output phase (a, b),
// i.e. per residue ((ih + pt) mod sh, (iw + pl) mod sw): the rows of phase a receive only the
// taps r with r*dh = a (mod sh), so each phase is a stride-1 convolution of grad_y with that
// sub-sampled filter, and no FLOP is spent on zeros inserted between grad_y's pixels.

// The taps of one dimension that reach phase a: r*dh = a (mod stride), listed from the
// largest r down (the flipped order), each reading grad_y at offset -e = -(r*dh - a)/stride
// from the phase's output index q. Consecutive listed taps are `step` apart in e.
struct PhaseTaps {
  int64_t count = 0;   // taps in this phase (0: the phase's pixels get no gradient)
  int64_t r_first = 0; // the largest such r
  int64_t r_step = 0;  // r decreases by this much from one listed tap to the next
  int64_t e_first = 0; // (r_first*d - a) / stride
  int64_t e_step = 0;  // e decreases by this much per tap: the sub-problem's dilation
};

// floor(a / b) for b > 0 and any a.
constexpr int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

inline PhaseTaps phase_taps(int64_t R, int64_t d, int64_t stride, int64_t a) {
  PhaseTaps p;
  for (int64_t r = R - 1; r >= 0; --r) {
    if ((r * d - a) % stride != 0) continue;
    if (p.count == 0) {
      p.r_first = r;
      p.e_first = (r * d - a) / stride;
    } else if (p.count == 1) {
      p.r_step = p.r_first - r;
      p.e_step = p.r_step * d / stride;
    }
    ++p.count;
  }
  if (p.count == 1) p.e_step = 1;  // any dilation works for one tap
  return p;
}

// One output phase (a, b) of grad_x that some tap reaches: its rows ih = a - pt + sh*q for q
// in [q0, q1), its columns likewise, its taps, and where its packed weights start.
struct GradInputPhase {
  int64_t a, b, q0, q1, u0, u1;
  PhaseTaps th, tw;
  int64_t packed_offset;
};

template <typename T>
std::vector<GradInputPhase> grad_input_phases(const ConvGeom& g, int64_t* packed_total) {
  std::vector<GradInputPhase> phases;
  *packed_total = 0;
  for (int64_t a = 0; a < g.sh; ++a)
    for (int64_t b = 0; b < g.sw; ++b) {
      const int64_t q0 = -floor_div(a - g.pt, g.sh), q1 = floor_div(g.H - 1 + g.pt - a, g.sh) + 1;
      const int64_t u0 = -floor_div(b - g.pl, g.sw), u1 = floor_div(g.W - 1 + g.pl - b, g.sw) + 1;
      const PhaseTaps th = phase_taps(g.R, g.dh, g.sh, a), tw = phase_taps(g.S, g.dw, g.sw, b);
      if (q1 <= q0 || u1 <= u0 || th.count == 0 || tw.count == 0) continue;
      phases.push_back({a, b, q0, q1, u0, u1, th, tw, *packed_total});
      *packed_total += packed_weight_count<T>(g.groups, g.Cg(), g.Kg(), th.count * tw.count);
    }
  return phases;
}

// Images per group of the grad-input: its grad_y (as NHWC) and, strided, its phase outputs
// stay under the layout budget, so the extra memory of a call does not grow with the batch.
template <typename T>
int64_t grad_input_group(const ConvGeom& g, bool gy_copy) {
  const bool strided = g.sh != 1 || g.sw != 1;
  const int64_t image = (gy_copy ? g.OH * g.OW * g.K : 0) +
                        (strided ? ceil_div(g.H, g.sh) * ceil_div(g.W, g.sw) * g.C : 0);
  return min64(g.N, images_per_group(image * int64_t(sizeof(T))));
}

template <typename T>
void grad_input(const ConvGeom& g, const T* gy, int gy_layout, const T* w, T* gx, int gx_layout,
                int nthreads) {
  constexpr int L = Vec<T>::lanes, BK = kNbk * L;
  const int64_t Cg = g.Cg(), Kg = g.Kg(), R = g.R, S = g.S, HW = g.H * g.W;
  const bool strided = g.sh != 1 || g.sw != 1, gy_copy = gy_layout != kNHWC;
  // Every phase's flipped, sub-sampled filter, packed once for all image groups.
  int64_t packed_total = 0;
  const std::vector<GradInputPhase> phases = grad_input_phases<T>(g, &packed_total);
  T* wp = workspace_as<T>(kWsPackedWeights, packed_total);
  std::vector<PackedTap> taps(R * S);
  for (const GradInputPhase& ph : phases) {
    const int64_t Sp = ph.tw.count, n = ph.th.count * Sp;
    for (int64_t t = 0; t < n; ++t) {  // the phase's taps, flipped
      PackedTap& tap = taps[(ph.th.r_first - (t / Sp) * ph.th.r_step) * S + ph.tw.r_first -
                            (t % Sp) * ph.tw.r_step];
      tap.offset = ph.packed_offset;
      tap.ntaps = n;
      tap.slot = t;
    }
  }
  pack_grad_input_weights(w, g.groups, Kg, Cg, R * S, taps.data(), BK, L, wp, nthreads);
  // Pixels of a phase that no tap reaches (a kernel smaller than the stride) get zero: a
  // phase is unreached when its row residue or its column residue has no tap.
  bool unreached = false;
  for (int64_t a = 0; a < g.sh; ++a) unreached |= phase_taps(g.R, g.dh, g.sh, a).count == 0;
  for (int64_t b = 0; b < g.sw; ++b) unreached |= phase_taps(g.S, g.dw, g.sw, b).count == 0;
  if (unreached) std::memset(gx, 0, sizeof(T) * g.N * g.C * HW);
  // grad_y as NHWC (no zeros inserted) and, strided, each phase written densely in grad_x's
  // layout then copied into grad_x with the strides: a group of images at a time.
  const int64_t group = grad_input_group<T>(g, gy_copy);
  T* buf = gy_copy ? workspace_as<T>(kWsActivationNhwc, group * g.OH * g.OW * g.K) : nullptr;
  T* phase_out = strided ? workspace_as<T>(kWsOutputNhwc, group * ceil_div(g.H, g.sh) *
                                                             ceil_div(g.W, g.sw) * g.C)
                         : nullptr;
  for (int64_t n0 = 0; n0 < g.N; n0 += group) {
    const int64_t images = min64(group, g.N - n0);
    const T* src = gy + n0 * g.K * g.OH * g.OW;  // image n0 starts here in either layout
    if (gy_copy) {
      scatter_to_nhwc(src, gy_layout, images, g.K, g.OH, g.OW, buf, g.OH, g.OW, 0, 0, 1, 1,
                      nthreads);
      src = buf;
    }
    T* gxn = gx + n0 * g.C * HW;
    for (const GradInputPhase& ph : phases) {
      // Output index j = q - q0 reads grad_y row q - e_i, e_i = e_first - i*e_step: a
      // stride-1 convolution with dilation e_step and top padding e_first - q0.
      ConvGeom t = g;
      t.N = images;
      t.H = g.OH;
      t.W = g.OW;
      t.C = g.K;
      t.K = g.C;
      t.R = ph.th.count;
      t.S = ph.tw.count;
      t.OH = ph.q1 - ph.q0;
      t.OW = ph.u1 - ph.u0;
      t.sh = t.sw = 1;
      t.dh = ph.th.e_step;
      t.dw = ph.tw.e_step;
      t.pt = ph.th.e_first - ph.q0;
      t.pl = ph.tw.e_first - ph.u0;
      t.pb = t.pr = 0;  // not read by forward_nhwc
      NhwcOperands<T> op;
      op.x = src;
      op.wp = wp + ph.packed_offset;
      op.y_layout = gx_layout;
      if (!strided) {
        op.y = gxn;
        forward_nhwc(t, op, nthreads);
        continue;
      }
      // The phase in grad_x's layout, then copied into grad_x with its strides: pixel (j, v)
      // goes to (a - pt + sh*(q0 + j), b - pl + sw*(u0 + v)).
      op.y = phase_out;
      forward_nhwc(t, op, nthreads);
      const int64_t ih0 = ph.a - g.pt + g.sh * ph.q0, iw0 = ph.b - g.pl + g.sw * ph.u0;
      if (gx_layout == kNHWC) {
        const int64_t rows = images * t.OH;
        parallel_for(rows, threads_for(rows * t.OW * g.C * 4, nthreads), [&](int64_t row) {
          const int64_t n = row / t.OH, ih = ih0 + g.sh * (row % t.OH);
          for (int64_t v = 0; v < t.OW; ++v)
            std::memcpy(gxn + ((n * g.H + ih) * g.W + iw0 + g.sw * v) * g.C,
                        phase_out + (row * t.OW + v) * g.C, sizeof(T) * g.C);
        });
      } else {
        const int64_t rows = images * g.C * t.OH;  // (n, c, j): one output row of one channel
        parallel_for(rows, threads_for(rows * t.OW * 4, nthreads), [&](int64_t row) {
          const int64_t nc = row / t.OH, ih = ih0 + g.sh * (row % t.OH);
          const T* sp = phase_out + row * t.OW;
          T* d = gxn + nc * HW + ih * g.W + iw0;
          for (int64_t v = 0; v < t.OW; ++v) d[v * g.sw] = sp[v];
        });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Grad-weight
// ---------------------------------------------------------------------------------------

// acc[j][b*lanes + i] += sum over output pixels (oh in [oh0, oh1), ow in [0, OW)) of
//     x[oh*xrow + ow*xpix + j] * gy[oh*grow + ow*gpix + b*lanes + i]
// x points at (tap, first channel) of output pixel (oh=0, ow=0) of one image.
template <typename T, int URC, int NBK>
inline void gw_tile(const T* x, int64_t xrow, int64_t xpix, const T* gy, int64_t grow,
                    int64_t gpix, int64_t oh0, int64_t oh1, int64_t OW, T* acc_out) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  V acc[URC][NBK];
  for (int j = 0; j < URC; ++j)
    for (int b = 0; b < NBK; ++b) acc[j][b] = V::zero();
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const T* xr = x + oh * xrow;
    const T* gr = gy + oh * grow;
    for (int64_t ow = 0; ow < OW; ++ow, xr += xpix, gr += gpix) {
      V gv[NBK];
      for (int b = 0; b < NBK; ++b) gv[b] = V::load(gr + b * L);
      for (int j = 0; j < URC; ++j) {
        const V xv = V::broadcast(xr + j);
        for (int b = 0; b < NBK; ++b) acc[j][b] = fmadd(xv, gv[b], acc[j][b]);
      }
    }
  }
  // Add this chunk's partial sums to the running total: a two-level sum loses less precision
  // than one long chain over every pixel.
  for (int j = 0; j < URC; ++j)
    for (int b = 0; b < NBK; ++b) {
      T* o = acc_out + (j * NBK + b) * L;
      add(V::load(o), acc[j][b]).store(o);
    }
}

// Whether grad-weight tiles its dW rows by (s, c) strips of a tap row rather than by input
// channels of a tap: possible with one group and no column dilation, and chosen where it
// needs at least a quarter fewer tiles, i.e. few channels (the stem, C = 3 x 7 taps: 2 tiles
// per tap row instead of 7 tiles of 3 useful rows in 12). Measured, ResNet-50 N=8
// grad-weight: stem 41.1 -> 14.9-15.0 ms (torch 11.8-12.4); on the 3x3 layers with 64-512
// channels (4-11 % fewer tiles) strips and channel tiles differed by less than the run-to-run
// noise (about 8 %), so those keep the channel tiles.
inline bool use_strips(const ConvGeom& g) {
  const int64_t channel_tiles = g.R * g.S * ceil_div(g.Cg(), int64_t(kUrc));
  const int64_t strip_tiles = g.R * ceil_div(g.S * g.Cg(), int64_t(kUrc));
  return g.groups == 1 && g.dw == 1 && 4 * strip_tiles <= 3 * channel_tiles;
}

// out[i] += the sum over output pixels (oh in [oh0, oh1), ow in [0, OW)) of
// gy[oh*grow + ow*gpix + i] for i < NBK * lanes: grad-bias of one block of output channels.
// A chunk's sum (at most a few hundred pixels) is kept in T, the running total in double,
// as the shared grad-bias pass does.
template <typename T, int NBK>
inline void gy_sum_tile(const T* gy, int64_t grow, int64_t gpix, int64_t oh0, int64_t oh1,
                        int64_t OW, double* out) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  V acc[NBK];
  for (int b = 0; b < NBK; ++b) acc[b] = V::zero();
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const T* gr = gy + oh * grow;
    for (int64_t ow = 0; ow < OW; ++ow, gr += gpix)
      for (int b = 0; b < NBK; ++b) acc[b] = add(acc[b], V::load(gr + b * L));
  }
  alignas(64) T sums[NBK * L];
  for (int b = 0; b < NBK; ++b) acc[b].store(sums + b * L);
  for (int i = 0; i < NBK * L; ++i) out[i] += sums[i];
}

// dst[q * ld + c] = src[c * plane + p0 + q] for c < C, q < P: pixels p0 .. p0 + P - 1 of C
// planes of an NCHW image turned NHWC.
template <typename T>
void nchw_pixels_to_nhwc(const T* src, int64_t C, int64_t plane, int64_t p0, int64_t P,
                         int64_t ld, T* dst) {
  constexpr int B = kTransposeBlock;
  // A block of channels at a time along the pixels: 16 read streams, not C (64 streams,
  // one line each per block, left every read to miss: the stem's grad-weight took 7 ms more).
  for (int64_t c0 = 0; c0 < C; c0 += B)
    for (int64_t q0 = 0; q0 < P; q0 += B)
      transpose_block(src + c0 * plane + p0 + q0, plane, dst + q0 * ld + c0, ld,
                      int(min64(B, C - c0)), int(min64(B, P - q0)));
}

// Copies of grad-weight's unit sums (`bytes` each): one per thread where they are small
// and the chunks many enough (the pixel split, see grad_weight_bias), else one.
// `chunks`: the chunks of one parallel region (an image group's).
inline int grad_weight_sum_copies(int64_t bytes, int64_t chunks, int nt) {
  const bool split = nt > 1 && chunks >= 2 * nt &&
                     bytes <= tuning().direct_grad_weight_pixel_split_max_bytes;
  return split ? nt : 1;
}

// gb (optional): grad-bias from the same sweep. The unit of each channel block's first tile
// also sums the chunk of grad_y it has just read (from L2, not memory): VGG-16's stem at
// batch 8 spent 2.9 ms of its 28 ms weight and bias gradients in a separate pass over the
// 103 MB grad_y; the other layers spend under 2 % there.
template <typename T>
void grad_weight_bias(const ConvGeom& g, const T* gy, int gy_layout, const T* x, int x_layout,
                      T* gw, T* gb, int nthreads) {
  constexpr int L = Vec<T>::lanes, BK = kNbk * L;
  const int64_t G = g.groups, Cg = g.Cg(), Kg = g.Kg(), RS = g.R * g.S;
  const int64_t KB = ceil_div(Kg, BK), CT = ceil_div(Cg, int64_t(kUrc));
  const int64_t Hp = g.H + g.pt + g.pb, Wp = g.W + g.pl + g.pr;
  if (g.N * g.OH * g.OW == 0 || Kg * Cg * RS == 0) {
    std::memset(gw, 0, sizeof(T) * g.K * Cg * RS);
    return;
  }
  // A dW tile's URC rows are URC input channels of one tap, or, in strip mode, URC
  // consecutive (s, c) pairs of one tap row r: with one group and no column dilation the
  // input values of taps s = 0..S-1 at one output pixel are S*C consecutive values of the
  // NHWC row, so few-channel layers (the stem: C = 3, 7x7) fill the tile's rows instead of
  // padding 3 channels to 12. Strip mode is used where it needs fewer tiles.
  const int64_t ST = ceil_div(g.S * Cg, int64_t(kUrc));
  const bool strip = use_strips(g);
  const int64_t taps = strip ? g.R : RS, tiles = strip ? ST : CT;
  // Input as padded NHWC. Channel mode pads the channels to a whole number of URC tiles so
  // the last tile can broadcast past Cg without leaving the pixel; strip mode leaves URC
  // values of slack after the buffer, which the last strip tile may read past the end of
  // the strip (results there are dropped). Output gradient as NHWC with each group's
  // channels padded to whole vectors.
  const int64_t Cp = strip ? g.C : (G - 1) * Cg + CT * kUrc, slack = strip ? kUrc : 0;
  const int64_t Kgp = round_up(Kg, L);
  const bool x_copy = !(Cp == g.C && x_layout == kNHWC && !g.padded() && !strip);
  const bool gy_copy = gy_layout != kNHWC || Kgp != Kg;
  const int64_t ldg = gy_copy ? G * Kgp : g.K, kgs = gy_copy ? Kgp : Kg;
  // Chunks of whole output rows of one image: x and gy of a chunk stay in L2 while every unit
  // sweeps it.
  const int64_t rows_per_chunk =
      max64(1, tuning().direct_grad_weight_chunk_pixels / max64(1, g.OW));
  const int64_t chunks_per_image = ceil_div(g.OH, rows_per_chunk);
  // NCHW grad_y (channels in whole vectors per group) is turned NHWC a chunk at a time, each
  // thread the channels of its own units into its own L2-sized buffer, right before it
  // sweeps them: not written out whole and read back. Stem, batch 8 (25.7 MB of grad_y),
  // grad-weight minus the same call on an NHWC grad_y, ms: converted whole first 2.6; in
  // chunks shared by the threads (a barrier each, half of every chunk read from the other
  // core's L2) 1.8-2.0, with the next chunk prefetched no better; per thread 1.0-1.1.
  const bool gy_chunks = gy_layout == kNCHW && Kgp == Kg;
  const int64_t gy_chunk = min64(rows_per_chunk, g.OH) * g.OW * ldg;
  const int nt = threads_for(g.flops(), nthreads);
  // Both copies are made a group of images at a time, under the layout budget, so the
  // extra memory of a call does not grow with the batch.
  const int64_t x_image = Hp * Wp * Cp, gy_image = g.OH * g.OW * ldg;
  const int64_t group = min64(g.N, images_per_group(((x_copy ? x_image : 0) +
                                                     (gy_copy && !gy_chunks ? gy_image : 0)) *
                                                    int64_t(sizeof(T))));
  T* xbuf = x_copy ? workspace_as<T>(kWsActivationNhwc, group * x_image + slack) : nullptr;
  T* gybuf = gy_copy ? workspace_as<T>(kWsGradOutputNhwc, gy_chunks ? nt * gy_chunk
                                                                    : group * gy_image)
                     : nullptr;
  if (slack) std::memset(xbuf + group * x_image, 0, sizeof(T) * slack);

  // Units: (group, k block, tap (strip mode: tap row), tile), each owned by one thread for
  // the whole of a parallel region, so the accumulators need no synchronisation and results
  // are deterministic. Or, where the units' sums are small (the stem: 28 units, 43 KiB),
  // each thread runs every unit over its share of the chunks into its own copy of the sums,
  // added up at the end: it converts only its own chunks of an NCHW grad_y, where a split
  // of the units has every thread convert the whole chunk its units need.
  const int64_t units = G * KB * taps * tiles, sums = units * kUrc * BK;
  const int copies =
      grad_weight_sum_copies(sums * int64_t(sizeof(T)), group * chunks_per_image, nt);
  const bool pixel_split = copies > 1;
  T* accum = workspace_as<T>(kWsAccumulators, copies * sums);
  if (pixel_split) std::memset(accum, 0, sizeof(T) * copies * sums);
  // With gb: one row of BK float64 sums per channel block (a copy per thread, as above).
  const int64_t bias_sums = G * KB * BK;
  double* bias_accum =
      gb ? workspace_as<double>(kWsGradBiasSums, copies * bias_sums) : nullptr;
  if (gb) std::fill(bias_accum, bias_accum + copies * bias_sums, 0.0);
  for (int64_t n0 = 0; n0 < g.N; n0 += group) {
    const int64_t images = min64(group, g.N - n0);
    const T* xp = x + n0 * g.C * g.H * g.W;
    if (x_copy && Cp == g.C) {
      scatter_to_nhwc(xp, x_layout, images, g.C, g.H, g.W, xbuf, Hp, Wp, g.pt, g.pl, 1, 1,
                      nthreads);
      xp = xbuf;
    } else if (x_copy) {
      // Build the group with C channels, then widen it to Cp (rare: the last group's
      // channel count is not a multiple of URC).
      T* tmp = workspace_as<T>(kWsStaging, images * Hp * Wp * g.C);
      scatter_to_nhwc(xp, x_layout, images, g.C, g.H, g.W, tmp, Hp, Wp, g.pt, g.pl, 1, 1,
                      nthreads);
      for (int64_t i = 0; i < images * Hp * Wp; ++i) {
        std::memcpy(xbuf + i * Cp, tmp + i * g.C, sizeof(T) * g.C);
        std::memset(xbuf + i * Cp + g.C, 0, sizeof(T) * (Cp - g.C));
      }
      xp = xbuf;
    }
    const T* gyn = gy + n0 * g.K * g.OH * g.OW;
    // An NCHW grad_y with whole vectors per group is converted in the units' region (gy_chunks);
    // groups padded to whole vectors are copied here, a value at a time.
    if (gy_copy && !gy_chunks) {
      const int64_t OHW = g.OH * g.OW;
      for (int64_t pix = 0; pix < images * OHW; ++pix) {
        const int64_t n = pix / OHW, q = pix % OHW;
        T* d = gybuf + pix * ldg;
        for (int64_t gi = 0; gi < G; ++gi)
          for (int64_t k = 0; k < Kgp; ++k) {
            const int64_t kk = gi * Kg + k;
            d[gi * Kgp + k] = k >= Kg                ? T(0)
                              : gy_layout == kNHWC ? gyn[pix * g.K + kk]
                                                   : gyn[(n * g.K + kk) * OHW + q];
          }
      }
      gyn = gybuf;
    }
    parallel(nt, [&](int tid, int nth) {
      // Units [u0, u1) over chunks [f0, f1) (numbered n * chunks_per_image + ch), into
      // sums at acc and bias sums at bacc.
      int64_t u0 = 0, u1 = units, f0 = 0, f1 = images * chunks_per_image;
      T* acc = accum;
      double* bacc = bias_accum;
      if (pixel_split) {
        split_range(f1, nth, tid, &f0, &f1);
        acc += tid * sums;
        if (bacc) bacc += tid * bias_sums;
      } else {
        split_range(units, nth, tid, &u0, &u1);
        if (n0 == 0) std::memset(acc + u0 * kUrc * BK, 0, sizeof(T) * (u1 - u0) * kUrc * BK);
      }
      // The channels of this thread's units: their blocks' [k_lo, k_hi).
      const auto block_start = [&](int64_t blk) { return blk / KB * Kg + blk % KB * BK; };
      const auto block_end = [&](int64_t blk) {
        return blk / KB * Kg + min64(Kg, (blk % KB + 1) * BK);
      };
      const int64_t k_lo = u0 < u1 ? block_start(u0 / (tiles * taps)) : 0;
      const int64_t k_hi = u0 < u1 ? block_end((u1 - 1) / (tiles * taps)) : 0;
      T* own = gy_chunks ? gybuf + tid * gy_chunk : nullptr;
      for (int64_t f = f0; f < f1; ++f) {
        const int64_t n = f / chunks_per_image, ch = f % chunks_per_image;
        const int64_t oh0 = ch * rows_per_chunk, oh1 = min64(g.OH, oh0 + rows_per_chunk);
        // The chunk's grad_y, NHWC, as rows [first, oh1) from gy_rows.
        const T* gy_rows = gyn + n * g.OH * g.OW * ldg;
        int64_t first = 0;
        if (gy_chunks && k_lo < k_hi) {
          nchw_pixels_to_nhwc(gyn + (n * g.K + k_lo) * g.OH * g.OW, k_hi - k_lo, g.OH * g.OW,
                              oh0 * g.OW, (oh1 - oh0) * g.OW, g.K, own + k_lo);
          gy_rows = own, first = oh0;
        }
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t tile = u % tiles, t = (u / tiles) % taps, blk = u / (tiles * taps);
          const int64_t gi = blk / KB, kb = blk % KB;
          const int64_t r = strip ? t : t / g.S, s = strip ? 0 : t % g.S;
          const int64_t xrow = g.sh * Wp * Cp;
          const T* xb = xp + ((n * Hp + r * g.dh) * Wp + s * g.dw) * Cp + gi * Cg +
                        tile * kUrc + first * xrow;
          const T* gyb = gy_rows + gi * kgs + kb * BK;
          const int64_t kv = min64(BK, Kg - kb * BK);
          T* a = acc + u * kUrc * BK;
          const bool with_bias = bacc && t == 0 && tile == 0;  // one unit per block
          with_vectors<kNbk>(ceil_div(kv, int64_t(L)), [&](auto v) {
            constexpr int V = decltype(v)::value;
            gw_tile<T, kUrc, V>(xb, xrow, g.sw * Cp, gyb, g.OW * ldg, ldg, oh0 - first,
                                oh1 - first, g.OW, a);
            if (with_bias)
              gy_sum_tile<T, V>(gyb, g.OW * ldg, ldg, oh0 - first, oh1 - first, g.OW,
                                bacc + blk * BK);
          });
        }
      }
    });
  }
  for (int c = 1; c < copies; ++c) {  // the other threads' sums, in a fixed order
    for (int64_t i = 0; i < sums; ++i) accum[i] += accum[c * sums + i];
    for (int64_t i = 0; bias_accum && i < bias_sums; ++i)
      bias_accum[i] += bias_accum[c * bias_sums + i];
  }
  // Unpack [unit][row of tile][k in block] into OIHW; a row is input channel c of tap t, or
  // in strip mode the pair (s, c) at position s*Cg + c of tap row t's strip.
  for (int64_t u = 0; u < units; ++u) {
    const int64_t tile = u % tiles, t = (u / tiles) % taps, blk = u / (tiles * taps);
    const int64_t gi = blk / KB, kb = blk % KB;
    // bw: the row width gw_tile wrote
    const int64_t kv = min64(BK, Kg - kb * BK), bw = round_up(kv, int64_t(L));
    const T* a = accum + u * kUrc * BK;
    for (int64_t j = 0; j < kUrc; ++j) {
      const int64_t row = tile * kUrc + j;
      if (row >= (strip ? g.S * Cg : Cg)) break;
      const int64_t c = strip ? row % Cg : row, tap = strip ? t * g.S + row / Cg : t;
      for (int64_t k = 0; k < kv; ++k)
        gw[((gi * Kg + kb * BK + k) * Cg + c) * RS + tap] = a[j * bw + k];
    }
  }
  if (gb)
    for (int64_t blk = 0; blk < G * KB; ++blk) {
      const int64_t gi = blk / KB, kb = blk % KB, kv = min64(BK, Kg - kb * BK);
      for (int64_t k = 0; k < kv; ++k) gb[gi * Kg + kb * BK + k] = T(bias_accum[blk * BK + k]);
    }
}

template <typename T>
void grad_weight(const ConvGeom& g, const T* gy, int gy_layout, const T* x, int x_layout, T* gw,
                 int nthreads) {
  grad_weight_bias(g, gy, gy_layout, x, x_layout, gw, static_cast<T*>(nullptr), nthreads);
}

// Mirrors the workspace_as calls above, NCHW tensors assumed.
template <typename T>
int64_t workspace_bytes(const ConvGeom& g, Pass pass) {
  constexpr int64_t L = Vec<T>::lanes, BK = kNbk * L, E = sizeof(T);
  const int64_t G = g.groups, Cg = g.Cg(), Kg = g.Kg(), RS = g.R * g.S;
  const auto tap_tables = [&](int64_t channels) { return 3 * RS * 8 + round_up(channels * E, 8); };
  switch (pass) {
    case Pass::kForward: {
      const int64_t image = g.C * g.H * g.W;
      const int64_t weights = packs_block_by_block<T>(g)
                                  ? omp_get_max_threads() * RS * Cg * BK  // a block per thread
                                  : packed_weight_count<T>(G, Kg, Cg, RS);
      return E * (weights + min64(images_per_group(image * E), g.N) * image) + tap_tables(g.C);
    }
    case Pass::kGradInput: {
      const bool strided = g.sh != 1 || g.sw != 1;
      int64_t packed = 0;
      grad_input_phases<T>(g, &packed);
      const int64_t group = grad_input_group<T>(g, true);
      const int64_t phase = strided ? ceil_div(g.H, g.sh) * ceil_div(g.W, g.sw) * g.C : 0;
      return E * (group * (g.OH * g.OW * g.K + phase) + packed) + tap_tables(g.K);
    }
    case Pass::kGradWeight: {
      const int64_t Hp = g.H + g.pt + g.pb, Wp = g.W + g.pl + g.pr;
      const bool strip = use_strips(g);
      const int64_t CT = ceil_div(Cg, int64_t(kUrc)), ST = ceil_div(g.S * Cg, int64_t(kUrc));
      const int64_t Cp = strip ? g.C : (G - 1) * Cg + CT * kUrc;
      const int64_t units = G * ceil_div(Kg, BK) * (strip ? g.R * ST : RS * CT);
      const int64_t x_image = Hp * Wp * Cp, gy_image = g.OH * g.OW * G * round_up(Kg, L);
      // NCHW grad_y with whole vectors per group goes NHWC a chunk at a time, a buffer per
      // thread.
      const bool gy_chunks = Kg % L == 0;
      const int64_t rows_per_chunk =
          max64(1, tuning().direct_grad_weight_chunk_pixels / max64(1, g.OW));
      const int64_t gy_whole = gy_chunks ? 0 : gy_image;
      const int nt = threads_for(g.flops(), omp_get_max_threads());
      const int64_t gy_chunks_size = gy_chunks ? nt * min64(rows_per_chunk, g.OH) * g.OW * g.K : 0;
      // A copy of the sums per thread wherever they are small enough (a bound: a call with
      // fewer threads may split the pixels where this one would not).
      const int copies = grad_weight_sum_copies(units * kUrc * BK * E, 2 * int64_t(nt), nt);
      const int64_t group = min64(g.N, images_per_group((x_image + gy_whole) * E));
      return E * (group * (x_image + gy_whole) + gy_chunks_size + (strip ? kUrc : 0) +
                  (Cp != g.C ? group * Hp * Wp * g.C : 0) + copies * units * kUrc * BK) +
             8 * copies * G * ceil_div(Kg, BK) * BK;  // the grad-bias sums, when asked for
    }
  }
  return 0;
}

}  // namespace

template <typename T>
ConvKernels<T> direct_kernels() {
  return ConvKernels<T>::all(&forward<T>, &grad_input<T>, &grad_weight<T>, &workspace_bytes<T>)
      .with_packing(&weight_packing<T>, &pack_forward_weights<T>)
      .with_grad_weight_bias(&grad_weight_bias<T>);
}
template ConvKernels<float> direct_kernels<float>();
template ConvKernels<double> direct_kernels<double>();

}  // namespace FASTCONV_ISA
}  // namespace fastconv
