// Winograd F(m x m, 3 x 3) convolution, m = 2, 4, 6, for one ISA (compiled once per ISA, see
// simd.h): forward, grad-input and grad-weight.
//
// A 3x3 stride-1 convolution computes each m x m output tile from an a x a input tile
// (a = m + 2) as  Y = AT [ (G g GT) . (BT d B) ] A,  '.' elementwise (Lavin & Gray 2015). Over
// channels, the elementwise products become a^2 independent GEMMs, one per transform-domain
// point xi:  M_xi[k][tile] = sum_c U_xi[k][c] * V_xi[c][tile].
//
// Structure (ncnn's and oneDNN's W_SGD schedule, ../shared/notes §3):
//   * Filters: U = G g GT for every (k, c), written straight into the GEMM's packed-A layout
//     (one packed K x C matrix per xi), once per call.
//   * Work items: (group, block of tiles, block of output channels), split over threads in
//     that order. Per item a thread
//       1. transforms its block of tiles, for every input channel, straight into the GEMM's
//          packed-B layout (the input transform is the packing) -- skipped when the previous
//          item had the same tiles;
//       2. runs the a^2 GEMMs of its channel block with the packed GEMM's macro-kernel
//          (csrc/gemm: the same micro-kernels as every other GEMM here);
//       3. applies the output transform, bias / scale / shift / ReLU, and writes the tiles.
//     Only one block of tiles is ever in the transform domain (per thread), never the whole
//     transformed tensor.
//   * Transforms run on vectors of `lanes` tiles (one channel), so they vectorise for every
//     ISA; their constant matrices are expanded at compile time (zeros skipped, +-1 as
//     add/sub).
//   * Grad-input is the same forward over grad_y, with the filters rotated by 180 degrees and
//     their in/out channels swapped, and padding 2 - p (negative: cropped).
//   * Grad-weight runs the algorithm backwards: dW = GT [sum over tiles (A dY A^T) . (BT d B)]
//     G, a^2 GEMMs with K = tiles (see its section below).
#include <chrono>
#include <utility>
#include <vector>

#include "../common/layout.h"
#include "../common/phase_times.h"
#include "../common/simd.h"
#include "../common/transpose.h"
#include "../common/tuning.h"
#include "../common/workspace.h"
#include "../isa/kernel_table.h"
#include "winograd.h"

namespace fastconv {
namespace FASTCONV_ISA {

namespace {

// ---------------------------------------------------------------------------------------
// Transforms: out[i] = sum_u M(i, u) * in[u] for a constant matrix M, expanded at compile time
// ---------------------------------------------------------------------------------------

template <typename T, const auto& Mat, int I, int U>
inline Vec<T> term(Vec<T> acc, const Vec<T>* in, int step) {
  constexpr double a = Mat.v[I][U];
  constexpr int first = Mat.first_nonzero(I);
  const Vec<T> x = in[U * step];
  if constexpr (a == 0) {
    return acc;
  } else if constexpr (U == first) {
    if constexpr (a == 1) return x;
    if constexpr (a == -1) return sub(Vec<T>::zero(), x);
    const T c = T(a);
    return mul(Vec<T>::broadcast(&c), x);
  } else {
    if constexpr (a == 1) return add(acc, x);
    if constexpr (a == -1) return sub(acc, x);
    const T c = T(a);
    return fmadd(Vec<T>::broadcast(&c), x, acc);
  }
}

template <typename T, const auto& Mat, int I, int... U>
inline Vec<T> combine_row(const Vec<T>* in, int step, std::integer_sequence<int, U...>) {
  Vec<T> acc = Vec<T>::zero();
  ((acc = term<T, Mat, I, U>(acc, in, step)), ...);
  return acc;
}

template <typename T, const auto& Mat, int... I>
inline void combine(const Vec<T>* in, int in_step, Vec<T>* out, int out_step,
                    std::integer_sequence<int, I...>) {
  using M = std::decay_t<decltype(Mat)>;
  ((out[I * out_step] = combine_row<T, Mat, I>(in, in_step, std::make_integer_sequence<int, M::cols>())),
   ...);
}

// out (R x R) = Mat . in (C x C) . Mat^T for Mat R x C, on row-major arrays of vectors.
template <typename T, const auto& Mat>
inline void sandwich(const Vec<T>* in, Vec<T>* out) {
  using M = std::decay_t<decltype(Mat)>;
  constexpr int R = M::rows, C = M::cols;
  Vec<T> t[R * C];
  for (int v = 0; v < C; ++v)  // t = Mat . in (column by column)
    combine<T, Mat>(in + v, C, t + v, C, std::make_integer_sequence<int, R>());
  for (int i = 0; i < R; ++i)  // out = t . Mat^T (row by row)
    combine<T, Mat>(t + i * C, 1, out + i * R, 1, std::make_integer_sequence<int, R>());
}

// ---------------------------------------------------------------------------------------
// Blocking and layouts
// ---------------------------------------------------------------------------------------

template <typename T, int M>
struct Plan {
  static constexpr int A = M + 2, A2 = A * A, L = Vec<T>::lanes;
  int64_t G, Cg, Kg;            // groups, input and output channels per group
  int64_t TH, TW, tiles;        // tile rows and columns per image, tiles in the batch
  int64_t MR, NR, KCB;          // GEMM register tile and K (= input channel) block
  int64_t Kpad;                 // Kg rounded up to MR: rows of one packed U matrix
  int64_t nb, nb_pad;           // tiles per block (and rounded up to NR)
  int64_t mb;                   // output channels per block (a multiple of MR)
  int64_t TB, KB, items;        // tile blocks, channel blocks, work items

  explicit Plan(const ConvGeom& g) {
    const GemmBlocking b = gemm_blocking<T>();
    G = g.groups, Cg = g.Cg(), Kg = g.Kg();
    TH = ceil_div(g.OH, M), TW = ceil_div(g.OW, M), tiles = g.N * TH * TW;
    MR = b.mr, NR = b.nr, KCB = gemm_k_block<T>(Cg), Kpad = round_up(Kg, MR);
    nb = min64(round_up(tuning().winograd_tile_block, L), round_up(tiles, L));
    nb_pad = round_up(nb, NR);
    mb = min64(round_up(tuning().winograd_channel_block, MR), Kpad);
    TB = ceil_div(tiles, nb), KB = ceil_div(Kg, mb), items = G * TB * KB;
  }
  // Elements of the packed filters (all groups), of one thread's transformed tile block, and
  // of one thread's transform-domain products.
  int64_t filter_size() const { return G * A2 * u_stride(); }
  // One transform-domain matrix apart from the next: its size plus a cache line, so that the
  // a^2 stores (loads) of one tile's (filter's) transform do not all land in the same L1 and
  // L2 set (the plain sizes are multiples of 4 KiB; for U 1 MiB at 512x512, where the 36
  // store streams of F4's filter transform would share one 16-way L2 set).
  int64_t u_stride() const { return Kpad * Cg + 64 / int64_t(sizeof(T)); }
  int64_t v_stride() const { return Cg * nb_pad + 64 / int64_t(sizeof(T)); }
  int64_t m_stride() const { return mb * nb_pad + 64 / int64_t(sizeof(T)); }
  int64_t input_block_size() const { return A2 * v_stride(); }
  int64_t output_block_size() const { return A2 * m_stride(); }
  // Image, tile row and tile column of tile t of the batch (tiles are numbered row-major
  // within an image, images one after the other).
  struct TilePos {
    int64_t n, ty, tx;
  };
  TilePos locate(int64_t t) const { return {t / (TH * TW), t / TW % TH, t % TW}; }
  // Offset of element (k, c) in one packed U matrix (gemm.h's whole-operand A layout).
  int64_t a_offset(int64_t k, int64_t c) const {
    const int64_t pc = c / KCB * KCB, kc = min64(KCB, Cg - pc);
    return pc * Kpad + k / MR * kc * MR + (c - pc) * MR + k % MR;
  }
  // Offset of element (c, tile j) in one packed V matrix (the whole-operand B layout).
  int64_t b_offset(int64_t c, int64_t j) const {
    const int64_t pc = c / KCB * KCB, kc = min64(KCB, Cg - pc);
    return pc * nb_pad + j / NR * kc * NR + (c - pc) * NR + j % NR;
  }
};

// Strides of an N x C x H x W tensor in either layout.
struct Strides {
  int64_t n, c, h, w;
  Strides(int layout, int64_t C, int64_t H, int64_t W)
      : n(C * H * W), c(layout == kNHWC ? 1 : H * W), h(layout == kNHWC ? W * C : W),
        w(layout == kNHWC ? C : 1) {}
};

// ---------------------------------------------------------------------------------------
// Filter transform
// ---------------------------------------------------------------------------------------

// Where filter (group gi, out channel k, in channel c, tap r, s) of a problem lives in an
// OIHW weight tensor: forward reads it as is; grad-input's derived problem reads it with in
// and out channels swapped (strides exchanged) and the taps rotated by 180 degrees.
template <typename T>
struct FilterSource {
  const T* w;
  int64_t group, k, c;  // strides
  bool rotated;
  const T* at(int64_t gi, int64_t kk, int64_t cc) const { return w + gi * group + kk * k + cc * c; }
  int tap(int i) const { return rotated ? 8 - i : i; }
};

// stage[(cl * 9 + t) * lanes + l] = tap t (as stored, before any rotation) of filter
// (k0 + l, c0 + cl), for l < valid and cl < cn: the filters of one panel chunk transposed so
// that each tap of `lanes` filters is one vector load, by 16 x 16 block transposes.
template <typename T>
void stage_filters(const FilterSource<T>& src, int64_t gi, int64_t k0, int valid, int64_t c0,
                   int cn, T* stage) {
  constexpr int L = Vec<T>::lanes, B = kTransposeBlock;
  const T* base = src.at(gi, k0, c0);
  if (src.c == 9) {  // forward: the cn channels of one filter are 9 * cn contiguous values
    const int64_t cols = 9 * int64_t(cn);
    for (int64_t j = 0; j < cols; j += B)
      transpose_block(base + j, src.k, stage + j * L, L, valid, int(min64(B, cols - j)));
  } else {  // grad-input's swapped channels: the filters of one channel lie 9 apart
    for (int cl = 0; cl < cn; ++cl)
      transpose_block(base + cl * src.c, src.k, stage + cl * 9 * L, L, valid, 9);
  }
}

// U_xi(k, c) = (G g_kc GT)[xi] for every group, into the packed layout; rows k >= Kg of the
// last MR panel are zero. Vectorised over the output channels of one MR-row panel (in chunks
// of `lanes`), whose values for one (c, xi) are contiguous in the packed layout: each store
// is a short copy. The taps are staged 16 input channels at a time by block transposes
// rather than gathered lane by lane at stride C*9. Measured per call, 2 threads (noisy VM,
// ranges over runs): gathers and unpadded U -> staged and padded: 512x512 F2 1.1-1.7 ->
// 0.8-1.3 ms, 256x256 F2 0.47 -> 0.26-0.33, F4 1.14 -> 0.83; 512x512 F4 3.6-3.8 -> 3.4-3.9
// ms: writing its 38 MB of U dominates (with no stores it takes 1.2-2.3 ms; contiguous
// 16-128-channel runs per xi and non-temporal stores measured no better).
template <typename T, int M>
void transform_filters(const Plan<T, M>& p, const FilterSource<T>& src, T* u, int nthreads) {
  using P = Plan<T, M>;
  using V = Vec<T>;
  constexpr int L = P::L, A2 = P::A2, CB = kTransposeBlock;
  const int64_t per_group = A2 * p.u_stride(), per_xi = p.u_stride();
  const int64_t panels = p.Kpad / p.MR;
  parallel_for(p.G * panels, threads_for(p.G * p.Kpad * p.Cg * 100, nthreads), [&](int64_t job) {
    const int64_t gi = job / panels, k_panel = job % panels * p.MR;
    T* ug = u + gi * per_group;
    alignas(64) T stage[CB * 9 * L];
    alignas(64) T buf[A2 * L];
    for (int64_t r0 = 0; r0 < p.MR; r0 += L) {  // rows of the panel, `lanes` at a time
      const int64_t k0 = k_panel + r0, rows = min64(L, p.MR - r0);
      const int valid = int(max64(0, min64(rows, p.Kg - k0)));
      zero_n(stage, CB * 9 * L);  // lanes >= valid stay zero: the padding rows of U
      for (int64_t c0 = 0; c0 < p.Cg; c0 += CB) {
        const int cn = int(min64(CB, p.Cg - c0));
        if (valid > 0) stage_filters(src, gi, k0, valid, c0, cn, stage);
        for (int cl = 0; cl < cn; ++cl) {
          V g[9], out[A2];
          for (int i = 0; i < 9; ++i) g[i] = V::load(stage + (cl * 9 + src.tap(i)) * L);
          sandwich<T, WinogradMatrices<M>::G>(g, out);
          for (int xi = 0; xi < A2; ++xi) out[xi].store(buf + xi * L);
          T* dst = ug + p.a_offset(k0, c0 + cl);
          for (int xi = 0; xi < A2; ++xi) copy_n(dst + xi * per_xi, buf + xi * L, rows);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Input transform (fused into packing) and output transform
// ---------------------------------------------------------------------------------------

// Where the tiles of one group of `lanes` tiles start: per lane, the offset of its first
// input (or output) element in image coordinates, and whether the tile lies fully inside.
template <int L>
struct LaneTiles {
  int64_t base[L];  // offset of (n, channel 0, row, col) with row/col the tile's origin
  int64_t row[L], col[L];
  bool inside[L];
  int count = 0;    // lanes holding a tile (the rest are zero padding)
};

template <typename T, int M>
void transform_input_block(const Plan<T, M>& p, const ConvGeom& g, const T* x,
                           const Strides& xs, int64_t gi, int64_t t0, int64_t nt, T* vblk) {
  using P = Plan<T, M>;
  using V = Vec<T>;
  constexpr int A = P::A, A2 = P::A2, L = P::L;
  const T* xg = x + gi * p.Cg * xs.c;
  const int64_t per_xi = p.v_stride();
  for (int64_t j0 = 0; j0 < round_up(nt, p.NR); j0 += L) {
    LaneTiles<L> lt;
    lt.count = int(max64(0, min64(L, nt - j0)));
    for (int l = 0; l < lt.count; ++l) {
      const auto pos = p.locate(t0 + j0 + l);
      const int64_t h0 = pos.ty * M - g.pt, w0 = pos.tx * M - g.pl;
      lt.row[l] = h0, lt.col[l] = w0;
      lt.base[l] = pos.n * xs.n + h0 * xs.h + w0 * xs.w;
      lt.inside[l] = h0 >= 0 && h0 + A <= g.H && w0 >= 0 && w0 + A <= g.W;
    }
    // Lane l's a x a inputs go to patches[l][a * a] (a row of a values: one short vector
    // copy in NCHW), then one transpose gives the transform's layout [a * a][lanes]. (Gathers
    // measured 1.4x slower than scalar moves here, this 1.26x faster on 3x3 64 @56, F(4,3).)
    alignas(64) T patches[L * A2], buf[A2 * L];
    zero_n(patches + lt.count * A2, (L - lt.count) * A2);  // lanes past the last tile
    for (int64_t c = 0; c < p.Cg; ++c) {
      const T* xc = xg + c * xs.c;
      for (int l = 0; l < lt.count; ++l) {
        T* d = patches + l * A2;
        if (lt.inside[l]) {
          const T* s = xc + lt.base[l];
          for (int u = 0; u < A; ++u) {
            if (xs.w == 1) copy_n(d + u * A, s + u * xs.h, A);
            else copy_strided_n(d + u * A, s + u * xs.h, A, xs.w);
          }
        } else {
          for (int u = 0; u < A; ++u)
            for (int v = 0; v < A; ++v) {
              const int64_t h = lt.row[l] + u, w = lt.col[l] + v;
              d[u * A + v] = h >= 0 && h < g.H && w >= 0 && w < g.W
                                 ? xc[lt.base[l] + u * xs.h + v * xs.w]
                                 : T(0);
            }
        }
      }
      for (int i0 = 0; i0 < A2; i0 += kTransposeBlock)
        transpose_block(patches + i0, A2, buf + i0 * L, L, L, int(min64(kTransposeBlock, A2 - i0)));
      V d[A2], out[A2];
      for (int i = 0; i < A2; ++i) d[i] = V::load(buf + i * L);
      sandwich<T, WinogradMatrices<M>::BT>(d, out);
      T* dst = vblk + p.b_offset(c, j0);
      for (int xi = 0; xi < A2; ++xi) out[xi].store(dst + xi * per_xi);
    }
  }
}

// y tiles of output channels [k0, k0 + mk) of tiles [t0, t0 + nt) from the products
// mblk[xi][k - k0][j], with the epilogue (channel = group's k0 + k).
template <typename T, int M>
void transform_output_block(const Plan<T, M>& p, const ConvGeom& g, const T* mblk,
                            int64_t gi, int64_t k0, int64_t mk, int64_t t0, int64_t nt,
                            const Epilogue<T>& epi, T* y, const Strides& ys) {
  using P = Plan<T, M>;
  using V = Vec<T>;
  constexpr int A2 = P::A2, L = P::L, M2 = M * M;
  const int64_t per_xi = p.m_stride();
  for (int64_t j0 = 0; j0 < nt; j0 += L) {
    LaneTiles<L> lt;
    lt.count = int(min64(L, nt - j0));
    for (int l = 0; l < lt.count; ++l) {
      const auto pos = p.locate(t0 + j0 + l);
      lt.row[l] = min64(M, g.OH - pos.ty * M);  // valid rows and columns of the tile
      lt.col[l] = min64(M, g.OW - pos.tx * M);
      lt.base[l] = pos.n * ys.n + pos.ty * M * ys.h + pos.tx * M * ys.w;
    }
    alignas(64) T buf[M2 * L], tiles[L * M2];
    for (int64_t k = 0; k < mk; ++k) {
      const int64_t ch = gi * p.Kg + k0 + k;
      V m[A2], out[M2];
      for (int xi = 0; xi < A2; ++xi) m[xi] = V::load(mblk + xi * per_xi + k * p.nb_pad + j0);
      sandwich<T, WinogradMatrices<M>::AT>(m, out);
      if (epi.active()) {
        for (int i = 0; i < M2; ++i) {
          if (epi.scale) out[i] = mul(out[i], V::broadcast(epi.scale + ch));
          if (epi.shift) out[i] = add(out[i], V::broadcast(epi.shift + ch));
          out[i] = activate(out[i], epi.act);
        }
      }
      for (int i = 0; i < M2; ++i) out[i].store(buf + i * L);
      // [m * m][lanes] -> [lanes][m * m], so each lane writes rows of m contiguous values.
      for (int i0 = 0; i0 < M2; i0 += kTransposeBlock)
        transpose_block(buf + i0 * L, L, tiles + i0, M2, int(min64(kTransposeBlock, M2 - i0)), L);
      T* yk = y + ch * ys.c;
      double s = 0, q = 0;  // statistics of the values written (no activation with them)
      for (int l = 0; l < lt.count; ++l) {
        T* d = yk + lt.base[l];
        const T* src = tiles + l * M2;
        for (int i = 0; i < lt.row[l]; ++i) {
          if (ys.w == 1) copy_n(d + i * ys.h, src + i * M, lt.col[l]);
          else for (int j = 0; j < lt.col[l]; ++j) d[i * ys.h + j * ys.w] = src[i * M + j];
          if (!epi.stats.sum) continue;
          for (int j = 0; j < lt.col[l]; ++j) {
            const T z = src[i * M + j];
            s += z;
            q += double(z) * z;
          }
        }
      }
      if (epi.stats.sum) add_stats(epi.stats, ch, s, q);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------

// y = epilogue(conv3x3(x, w)) for a stride-1, dilation-1, 3x3 problem g (forward, or the
// derived forward of grad-input), its filters read from w.
// `u` holds the filters already transformed (the weight cache), or is null.
template <typename T, int M>
void winograd_conv(const ConvGeom& g, const T* x, int x_layout, const FilterSource<T>& w,
                   const T* u, const Epilogue<T>& epi, T* y, int y_layout, int nthreads) {
  using Clock = std::chrono::steady_clock;
  using P = Plan<T, M>;
  constexpr int A2 = P::A2;
  const auto start = Clock::now();
  const P p(g);
  const Strides xs(x_layout, g.C, g.H, g.W), ys(y_layout, g.K, g.OH, g.OW);

  if (!u) {
    T* buf = workspace_as<T>(kWsPackedWeights, p.filter_size());
    transform_filters<T, M>(p, w, buf, nthreads);
    u = buf;
  }
  PhaseTimes times;
  times.filter_transform = seconds_since(start);

  const int nt = threads_for(g.flops() / 4, nthreads);
  T* vbuf = workspace_as<T>(kWsWinogradInput, nt * p.input_block_size());
  T* mbuf = workspace_as<T>(kWsWinogradOutput, nt * p.output_block_size());
  std::vector<double> phase(3 * nt, 0.0);  // per thread: input, GEMM, output seconds
  const Epilogue<T> none;
  parallel(nt, [&](int tid, int nth) {
    T* vblk = vbuf + tid * p.input_block_size();
    T* mblk = mbuf + tid * p.output_block_size();
    double* ph = phase.data() + 3 * tid;
    int64_t i0, i1, transformed = -1;
    split_range(p.items, nth, tid, &i0, &i1);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t kb = item % p.KB, tb = item / p.KB % p.TB, gi = item / (p.KB * p.TB);
      const int64_t t0 = tb * p.nb, ntile = min64(p.nb, p.tiles - t0);
      const int64_t k0 = kb * p.mb, mk = min64(p.mb, p.Kg - k0);
      auto t = Clock::now();
      if (item / p.KB != transformed) {  // a new (group, tile block)
        transform_input_block<T, M>(p, g, x, xs, gi, t0, ntile, vblk);
        transformed = item / p.KB;
        ph[0] += seconds_since(t);
        t = Clock::now();
      }
      const T* ug = u + gi * A2 * p.u_stride();
      for (int xi = 0; xi < A2; ++xi) {
        const T* uxi = ug + xi * p.u_stride();
        const T* vxi = vblk + xi * p.v_stride();
        T* mxi = mblk + xi * p.m_stride();
        for (int64_t pc = 0; pc < p.Cg; pc += p.KCB) {
          const int64_t kc = min64(p.KCB, p.Cg - pc);
          gemm_macro_kernel<T>(mk, ntile, kc, uxi + pc * p.Kpad + k0 / p.MR * kc * p.MR,
                               vxi + pc * p.nb_pad, mxi, p.nb_pad, pc > 0, pc + kc == p.Cg,
                               none, 0, 0);
        }
      }
      ph[1] += seconds_since(t);
      t = Clock::now();
      transform_output_block<T, M>(p, g, mblk, gi, k0, mk, t0, ntile, epi, y, ys);
      ph[2] += seconds_since(t);
    }
  });
  for (int i = 0; i < nt; ++i) {
    times.input_transform += phase[3 * i];
    times.gemm += phase[3 * i + 1];
    times.output_transform += phase[3 * i + 2];
  }
  times.threads = nt;
  times.wall = seconds_since(start);
  last_phase_times() = times;
}

// ---------------------------------------------------------------------------------------
// The three passes
// ---------------------------------------------------------------------------------------

// The forward reads filter (group gi, out channel k, in channel c) as w[gi*Kg + k][c].
template <typename T>
FilterSource<T> forward_filters(const ConvGeom& g, const T* w) {
  return {w, g.Kg() * g.Cg() * 9, g.Cg() * 9, 9, false};
}

template <typename T, int M>
WeightPacking weight_packing(const ConvGeom& g, int, int) {
  return {Plan<T, M>(g).filter_size(), 0};
}

template <typename T, int M>
void transform_forward_filters(const ConvGeom& g, int, int, const T* w, T* u, int nthreads) {
  transform_filters<T, M>(Plan<T, M>(g), forward_filters(g, w), u, nthreads);
}

template <typename T, int M>
void forward(const ConvGeom& g, const T* x, int x_layout, const T* w, const T* packed,
             const Epilogue<T>& epi, T* y, int y_layout, int nthreads) {
  winograd_conv<T, M>(g, x, x_layout, forward_filters(g, w), packed, epi, y, y_layout, nthreads);
}

// The forward whose output is grad-input: grad_y (N x K x OH x OW) convolved with the rotated,
// channel-swapped filters, padding 2 - p on each side, gives N x C x H x W.
ConvGeom grad_input_problem(const ConvGeom& g) {
  ConvGeom d = g;
  d.C = g.K, d.H = g.OH, d.W = g.OW;
  d.K = g.C, d.OH = g.H, d.OW = g.W;
  d.pt = 2 - g.pt, d.pb = 2 - g.pb, d.pl = 2 - g.pl, d.pr = 2 - g.pr;
  return d;
}

template <typename T, int M>
void grad_input(const ConvGeom& g, const T* gy, int gy_layout, const T* w, T* gx, int gx_layout,
                int nthreads) {
  const int64_t Cg = g.Cg(), Kg = g.Kg();
  // Derived filter (group gi, out channel c, in channel k) = w[gi*Kg + k][c], rotated.
  const FilterSource<T> src{w, Kg * Cg * 9, 9, Cg * 9, true};
  winograd_conv<T, M>(grad_input_problem(g), gy, gy_layout, src, nullptr, Epilogue<T>(), gx,
                      gx_layout, nthreads);
}

// ---------------------------------------------------------------------------------------
// Grad-weight: dW[k][c] = GT [sum over tiles (A dY_k A^T) . (BT d_c B)] G  (winograd.h)
// ---------------------------------------------------------------------------------------
//
// Per tile block the a^2 transform-domain sums are GEMMs with K = tiles:
//   S_xi[k][c] += sum_t Z_xi[k][t] * V_xi[t][c],  Z = A dY A^T (grad_y), V = BT d B (input).
// Work items own a block of S (group, mb output x mb input channels, and a share of the tiles
// when there are fewer blocks than threads); per tile block an item transforms its grad_y
// channels into packed A panels and its input channels into packed B panels, vectorised over
// channels of NHWC copies (padded with zeros to whole tiles), and runs the a^2 GEMMs on the
// packed GEMM's macro-kernel. At the end GT S G gives the 3 x 3 filters.
template <typename T, int M>
struct GradWeightPlan {
  static constexpr int A = M + 2, A2 = A * A, L = Vec<T>::lanes;
  int64_t G, Cg, Kg, TH, TW, Hp, Wp;  // Hp x Wp: padded input per image (whole tiles)
  int64_t MR, NR, mb_pad, cb_pad, KB, CB, splits, blocks, nb;
  GradWeightPlan(const ConvGeom& g, int nthreads) {
    const GemmBlocking b = gemm_blocking<T>();
    G = g.groups, Cg = g.Cg(), Kg = g.Kg();
    TH = ceil_div(g.OH, M), TW = ceil_div(g.OW, M), Hp = TH * M + 2, Wp = TW * M + 2;
    MR = b.mr, NR = b.nr;
    const int64_t block = tuning().winograd_grad_weight_channel_block;
    mb_pad = min64(round_up(block, MR), round_up(Kg, MR));  // output channels: GEMM rows
    cb_pad = min64(round_up(block, NR), round_up(Cg, NR));  // input channels: GEMM columns
    KB = ceil_div(Kg, mb_pad), CB = ceil_div(Cg, cb_pad);
    blocks = G * KB * CB;
    splits = ceil_div(nthreads, blocks);  // tile shares, when blocks alone cannot fill the threads
    nb = tuning().winograd_grad_weight_tile_block;
  }
  int64_t items() const { return blocks * splits; }
  int64_t s_block() const { return A2 * mb_pad * cb_pad; }  // one item's sums [xi][k][c]
  int64_t z_block() const { return A2 * mb_pad * nb; }      // packed A panels per xi
  int64_t v_block() const { return A2 * nb * cb_pad; }      // packed B panels per xi
};

// Z_xi for output channels [k0, k0 + mk) of group gi and tiles [t0, t0 + nt) of the image
// group, as packed A panels: zp[xi * mb_pad * nt + (k / MR) * nt * MR + t * MR + k % MR].
template <typename T, int M>
void transform_grad_output_block(const GradWeightPlan<T, M>& p, const T* gy, int64_t K,
                                 int64_t gi, int64_t k0, int64_t mk, int64_t t0, int64_t nt,
                                 T* zp) {
  using V = Vec<T>;
  using W = WinogradGradMatrices<M>;
  constexpr int A2 = GradWeightPlan<T, M>::A2, L = V::lanes;
  const int64_t per_xi = p.mb_pad * nt, rows_total = round_up(mk, p.MR);
  alignas(64) T buf[A2 * L];
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t tile = t0 + t, n = tile / (p.TH * p.TW), ty = tile / p.TW % p.TH,
                  tx = tile % p.TW;
    const T* base = gy + ((n * p.TH * M + ty * M) * p.TW * M + tx * M) * K + gi * p.Kg + k0;
    for (int64_t r = 0; r < rows_total; r += L) {  // lanes = output channels
      const int64_t rows = min64(L, rows_total - r);
      V dy[M * M], z[A2];
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < M; ++j) dy[i * M + j] = V::load(base + (i * p.TW * M + j) * K + r);
      sandwich<T, W::A>(dy, z);
      for (int xi = 0; xi < A2; ++xi) z[xi].store(buf + xi * L);
      // Rows r .. r + rows of the block, split where they cross an MR panel.
      for (int64_t k = r; k < r + rows;) {
        const int64_t run = min64(r + rows, (k / p.MR + 1) * p.MR) - k;
        T* dst = zp + (k / p.MR) * nt * p.MR + t * p.MR + k % p.MR;
        for (int xi = 0; xi < A2; ++xi) copy_n(dst + xi * per_xi, buf + xi * L + (k - r), run);
        k += run;
      }
    }
  }
}

// V_xi for input channels [c0, c0 + cn) of group gi and tiles [t0, t0 + nt), as packed B
// panels: vp[xi * nt * cb_pad + (c / NR) * nt * NR + t * NR + c % NR].
template <typename T, int M>
void transform_input_for_weights(const GradWeightPlan<T, M>& p, const T* x, int64_t C,
                                 int64_t gi, int64_t c0, int64_t cn, int64_t t0, int64_t nt,
                                 T* vp) {
  using V = Vec<T>;
  constexpr int A = M + 2, A2 = A * A, L = V::lanes;
  const int64_t per_xi = nt * p.cb_pad, cols_total = round_up(cn, p.NR);
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t tile = t0 + t, n = tile / (p.TH * p.TW), ty = tile / p.TW % p.TH,
                  tx = tile % p.TW;
    const T* base = x + ((n * p.Hp + ty * M) * p.Wp + tx * M) * C + gi * p.Cg + c0;
    for (int64_t c = 0; c < cols_total; c += L) {  // lanes = input channels
      V d[A2], v[A2];
      for (int u = 0; u < A; ++u)
        for (int w = 0; w < A; ++w) d[u * A + w] = V::load(base + (u * p.Wp + w) * C + c);
      sandwich<T, WinogradMatrices<M>::BT>(d, v);
      T* dst = vp + (c / p.NR) * nt * p.NR + t * p.NR + c % p.NR;
      for (int xi = 0; xi < A2; ++xi) v[xi].store(dst + xi * per_xi);
    }
  }
}

// Padding lanes: Z rows [mk, round_up(mk, MR)) and V columns [cn, round_up(cn, NR)) are
// loaded from whatever channels follow (the next block, group or pixel, or the zeroed slack
// after the last pixel), and the final sums are read in whole vectors past cn. All of them
// only reach rows and columns of S that are never written out: GEMM rows and columns are
// independent, and dW's stores are masked to cn. The slack covers the furthest such load
// (less than MR + L past a pixel's channels for grad_y, NR for the input).
template <typename T, int M>
void winograd_grad_weight(const ConvGeom& g, const T* gy, int gy_layout, const T* x,
                          int x_layout, T* gw, int nthreads) {
  using P = GradWeightPlan<T, M>;
  using V = Vec<T>;
  constexpr int A2 = P::A2, L = P::L;
  const int nt = threads_for(g.flops() / 4, nthreads);
  const P p(g, nt);
  // NHWC copies of a group of images at a time, zero-padded to whole tiles. Vectors of L
  // channels start at any channel of a block, so each copy has L values of slack (zeroed).
  const int64_t x_image = p.Hp * p.Wp * g.C, gy_image = p.TH * M * p.TW * M * g.K;
  const int64_t images = min64(g.N, images_per_group((x_image + gy_image) * int64_t(sizeof(T))));
  const int64_t slack = round_up(max64(p.mb_pad, p.cb_pad), L) + L;
  T* xbuf = workspace_as<T>(kWsActivationNhwc, images * x_image + slack);
  T* gybuf = workspace_as<T>(kWsGradOutputNhwc, images * gy_image + slack);
  zero_n(xbuf + images * x_image, slack);
  zero_n(gybuf + images * gy_image, slack);
  T* sums = workspace_as<T>(kWsAccumulators, p.items() * p.s_block());
  T* panels = workspace_as<T>(kWsWinogradInput, nt * (p.z_block() + p.v_block()));
  std::vector<char> started(p.items(), 0);
  const Epilogue<T> none;
  for (int64_t n0 = 0; n0 < g.N; n0 += images) {
    const int64_t in = min64(images, g.N - n0), tiles = in * p.TH * p.TW;
    scatter_to_nhwc(x + n0 * g.C * g.H * g.W, x_layout, in, g.C, g.H, g.W, xbuf, p.Hp, p.Wp,
                    g.pt, g.pl, 1, 1, nthreads);
    scatter_to_nhwc(gy + n0 * g.K * g.OH * g.OW, gy_layout, in, g.K, g.OH, g.OW, gybuf,
                    p.TH * M, p.TW * M, 0, 0, 1, 1, nthreads);
    parallel(nt, [&](int tid, int nth) {
      T* zp = panels + tid * (p.z_block() + p.v_block());
      T* vp = zp + p.z_block();
      int64_t i0, i1;
      split_range(p.items(), nth, tid, &i0, &i1);
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t split = item % p.splits, block = item / p.splits;
        const int64_t cb = block % p.CB, kb = block / p.CB % p.KB, gi = block / (p.CB * p.KB);
        const int64_t k0 = kb * p.mb_pad, mk = min64(p.mb_pad, p.Kg - k0);
        const int64_t c0 = cb * p.cb_pad, cn = min64(p.cb_pad, p.Cg - c0);
        int64_t s0, s1;
        split_range(tiles, int(p.splits), int(split), &s0, &s1);
        T* s = sums + item * p.s_block();
        for (int64_t t0 = s0; t0 < s1; t0 += p.nb) {
          const int64_t ntile = min64(p.nb, s1 - t0);
          transform_grad_output_block<T, M>(p, gybuf, g.K, gi, k0, mk, t0, ntile, zp);
          transform_input_for_weights<T, M>(p, xbuf, g.C, gi, c0, cn, t0, ntile, vp);
          for (int xi = 0; xi < A2; ++xi)
            gemm_macro_kernel<T>(mk, cn, ntile, zp + xi * p.mb_pad * ntile,
                                 vp + xi * ntile * p.cb_pad, s + xi * p.mb_pad * p.cb_pad,
                                 p.cb_pad, started[item] != 0, false, none, 0, 0);
          started[item] = 1;
        }
      }
    });
  }
  // dW = GT (sum of the tile shares) G, vectorised over input channels; [tap][lane] is
  // transposed to OIHW's [c][tap] on the way out.
  parallel_for(p.blocks, threads_for(p.blocks * p.s_block() * 8, nt), [&](int64_t block) {
    const int64_t cb = block % p.CB, kb = block / p.CB % p.KB, gi = block / (p.CB * p.KB);
    const int64_t k0 = kb * p.mb_pad, mk = min64(p.mb_pad, p.Kg - k0);
    const int64_t c0 = cb * p.cb_pad, cn = min64(p.cb_pad, p.Cg - c0);
    const int64_t per_xi = p.mb_pad * p.cb_pad;
    alignas(64) T buf[9 * L];
    for (int64_t k = 0; k < mk; ++k)
      for (int64_t c = 0; c < cn; c += L) {
        V sxi[A2], dw[9];
        for (int xi = 0; xi < A2; ++xi) sxi[xi] = V::zero();
        for (int64_t sp = 0; sp < p.splits; ++sp) {
          const int64_t item = block * p.splits + sp;
          if (!started[item]) continue;
          const T* s = sums + item * p.s_block() + k * p.cb_pad + c;
          for (int xi = 0; xi < A2; ++xi) sxi[xi] = add(sxi[xi], V::load(s + xi * per_xi));
        }
        sandwich<T, WinogradGradMatrices<M>::GT>(sxi, dw);
        for (int i = 0; i < 9; ++i) dw[i].store(buf + i * L);
        T* dst = gw + ((gi * p.Kg + k0 + k) * p.Cg + c0 + c) * 9;
        transpose_block(buf, L, dst, 9, 9, int(min64(L, cn - c)));
      }
  });
}

template <typename T, int M>
void grad_weight(const ConvGeom& g, const T* gy, int gy_layout, const T* x, int x_layout, T* gw,
                 int nthreads) {
  winograd_grad_weight<T, M>(g, gy, gy_layout, x, x_layout, gw, nthreads);
}

template <typename T, int M>
int64_t workspace_bytes(const ConvGeom& g, Pass pass) {
  if (pass == Pass::kGradWeight) {
    const int nt = threads_for(g.flops() / 4, omp_get_max_threads());
    const GradWeightPlan<T, M> p(g, nt);
    const int64_t x_image = p.Hp * p.Wp * g.C, gy_image = p.TH * M * p.TW * M * g.K;
    const int64_t images = min64(g.N, images_per_group((x_image + gy_image) * int64_t(sizeof(T))));
    const int64_t L = Vec<T>::lanes, slack = round_up(max64(p.mb_pad, p.cb_pad), L) + L;
    return int64_t(sizeof(T)) * (images * (x_image + gy_image) + 2 * slack +
                                 p.items() * p.s_block() + nt * (p.z_block() + p.v_block()));
  }
  const ConvGeom d = pass == Pass::kGradInput ? grad_input_problem(g) : g;
  const Plan<T, M> p(d);
  const int nt = threads_for(d.flops() / 4, omp_get_max_threads());
  return int64_t(sizeof(T)) *
         (p.filter_size() + nt * (p.input_block_size() + p.output_block_size()));
}

template <typename T, int M>
ConvKernels<T> winograd_kernels() {
  return ConvKernels<T>::all(&forward<T, M>, &grad_input<T, M>, &grad_weight<T, M>,
                             &workspace_bytes<T, M>)
      .with_packing(&weight_packing<T, M>, &transform_forward_filters<T, M>);
}


// The vectorised transforms alone, for tests: `count` tiles, each row-major and contiguous in
// `in` and `out`: which = 0 input (a x a -> BT d B), 1 filter (3 x 3 -> G g GT),
// 2 output (a x a -> AT m A, m x m).
template <typename T, int M>
void apply_transform(int which, const T* in, T* out, int64_t count) {
  using V = Vec<T>;
  constexpr int A = M + 2, L = V::lanes;
  const int n_in = which == 1 ? 9 : A * A, n_out = which == 2 ? M * M : A * A;
  alignas(64) T buf[A * A * L];
  for (int64_t t0 = 0; t0 < count; t0 += L) {
    const int64_t lanes = min64(L, count - t0);
    for (int i = 0; i < n_in; ++i)
      for (int l = 0; l < L; ++l) buf[i * L + l] = l < lanes ? in[(t0 + l) * n_in + i] : T(0);
    V v_in[A * A], v_out[A * A];
    for (int i = 0; i < n_in; ++i) v_in[i] = V::load(buf + i * L);
    if (which == 0) sandwich<T, WinogradMatrices<M>::BT>(v_in, v_out);
    else if (which == 1) sandwich<T, WinogradMatrices<M>::G>(v_in, v_out);
    else sandwich<T, WinogradMatrices<M>::AT>(v_in, v_out);
    for (int i = 0; i < n_out; ++i) v_out[i].store(buf + i * L);
    for (int64_t l = 0; l < lanes; ++l)
      for (int i = 0; i < n_out; ++i) out[(t0 + l) * n_out + i] = buf[i * L + l];
  }
}

}  // namespace

template <typename T>
void winograd_transform(int m, int which, const T* in, T* out, int64_t count) {
  if (m == 2) return apply_transform<T, 2>(which, in, out, count);
  if (m == 4) return apply_transform<T, 4>(which, in, out, count);
  return apply_transform<T, 6>(which, in, out, count);
}
template void winograd_transform<float>(int, int, const float*, float*, int64_t);
template void winograd_transform<double>(int, int, const double*, double*, int64_t);


template <typename T> ConvKernels<T> winograd_f2_kernels() { return winograd_kernels<T, 2>(); }
template <typename T> ConvKernels<T> winograd_f4_kernels() { return winograd_kernels<T, 4>(); }
template <typename T> ConvKernels<T> winograd_f6_kernels() { return winograd_kernels<T, 6>(); }
template ConvKernels<float> winograd_f2_kernels<float>();
template ConvKernels<double> winograd_f2_kernels<double>();
template ConvKernels<float> winograd_f4_kernels<float>();
template ConvKernels<double> winograd_f4_kernels<double>();
template ConvKernels<float> winograd_f6_kernels<float>();
template ConvKernels<double> winograd_f6_kernels<double>();

}  // namespace FASTCONV_ISA
}  // namespace fastconv
