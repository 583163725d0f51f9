// Packed GEMM for one ISA: packing, the micro-kernel and the five loops (contract: gemm.h).
#include "gemm.h"

#include "../common/simd.h"
#include "../common/transpose.h"
#include "../common/tuning.h"
#include "../common/workspace.h"

namespace fastconv {
namespace FASTCONV_ISA {
namespace {

// Register tile MR x NR = MR x (NBV vectors) and cache blocks, per ISA and type.
//  * MR * NBV accumulators + NBV B vectors + 1 broadcast fit the register file.
//  * KC: a B micro-panel (KC x NR) stays in L1 (48 KiB) next to the streaming A panel.
//  * MC: the packed A block (MC x KC) fits in half of L2 (1 MiB).
//  * NC: the packed B block (KC x NC) lives in the shared 32 MiB L3.
// f32 AVX-512 sweep, sgemm 2048^3 / 4096^3 on 2 threads, GFLOP/s (numpy/OpenBLAS: 457-475):
//   KC 256, MC 480: 401 / 421   KC 384, MC 480: 406 / 457   KC 512, MC 480: 432 / 445
//   KC 512, MC 240: 464 / 461   KC 768, MC 240, NC 2048: 427 / 434
// so KC = 512 (B micro-panels stream from L2 at 15 B/cycle, well under its bandwidth, and C is
// read and written half as often as with 256) and MC = 240 (A block 480 KiB). Other ISAs and
// f64 use the same bytes per block.
template <typename T>
struct Blocking;
#if defined(FASTCONV_ISA_AVX512)
template <>
struct Blocking<float> {
  static constexpr int MR = 12, NBV = 2;  // 12 x 32: 24 zmm accumulators
  static constexpr int64_t KC = 512, MC = 240, NC = 4096;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 12, NBV = 2;  // 12 x 16
  static constexpr int64_t KC = 512, MC = 120, NC = 2048;
};
#elif defined(FASTCONV_ISA_AVX2)
template <>
struct Blocking<float> {
  static constexpr int MR = 6, NBV = 2;  // 6 x 16: 12 ymm accumulators
  static constexpr int64_t KC = 512, MC = 240, NC = 4096;
};
template <>
struct Blocking<double> {
  static constexpr int MR = 6, NBV = 2;  // 6 x 8
  static constexpr int64_t KC = 512, MC = 120, NC = 2048;
};
#else
template <typename T>
struct Blocking {
  static constexpr int MR = 4, NBV = 2;  // 4 x 8 (4-lane portable vectors)
  static constexpr int64_t KC = 512, MC = 128, NC = 2048;
};
#endif

// K is cut into blocks of equal size near KC (between KC * 2/3 and KC * 3/2) rather than KC
// blocks and a remainder: K = 576 (3x3 x 64 channels) is one block, not 512 + 64, which would
// read and write the C tile a second time for 64 steps.
template <typename T>
int64_t k_block(int64_t K) {
  const int64_t KC = Blocking<T>::KC;
  const int64_t blocks = max64(1, (K + KC / 2) / KC);
  return ceil_div(K, blocks);
}

// Calls run(offset, length, base) for the pieces of K range [p0, p0 + kc) that lie in one
// segment (GemmArgs::k_seg): the piece's first column inside the range, its length, and the
// element offset of its first column from the operand's origin (seg_stride between segments,
// cs within one). Without segments the range is one piece.
template <typename F>
inline void for_each_k_run(int64_t k_seg, int64_t k_seg_first, int64_t seg_stride, int64_t cs,
                           int64_t p0, int64_t kc, F run) {
  if (k_seg <= 0) return run(int64_t(0), kc, p0 * cs);
  for (int64_t off = 0; off < kc;) {
    const int64_t k = p0 + off + k_seg_first, seg = k / k_seg, pos = k % k_seg;
    const int64_t len = min64(k_seg - pos, kc - off);
    run(off, len, seg * seg_stride + pos * cs);
    off += len;
  }
}

// One run of kc steps of a W-wide micro-panel: d[k * W + i] = src[i * rs + k * cs] for
// i < n, zeros for n <= i < W. An A panel is rows i of A (rs = rs_a, cs = cs_a, W = MR); a
// B panel is columns i of B, i.e. rows of B^T (rs = cs_b, cs = rs_b, W = NR).
template <typename T, int W>
void pack_panel_run(const T* src, int64_t rs, int64_t cs, int64_t n, int64_t kc, T* d) {
  if (rs == 1) {  // each k is n contiguous values
    for (int64_t k = 0; k < kc; ++k) {
      const T* sk = src + k * cs;
      T* dk = d + k * W;
      if (n == W) {
        for (int i = 0; i < W; ++i) dk[i] = sk[i];
      } else {
        for (int i = 0; i < n; ++i) dk[i] = sk[i];
        for (int i = int(n); i < W; ++i) dk[i] = T(0);
      }
    }
    return;
  }
  if (cs == 1) {  // each i is a contiguous run of k: transpose 16 x 16 blocks
    for (int64_t i0 = 0; i0 < n; i0 += kTransposeBlock)
      for (int64_t k0 = 0; k0 < kc; k0 += kTransposeBlock)
        transpose_block(src + i0 * rs + k0, rs, d + k0 * W + i0, int64_t(W),
                        int(min64(kTransposeBlock, n - i0)), int(min64(kTransposeBlock, kc - k0)));
  } else {
    for (int i = 0; i < n; ++i) {
      const T* si = src + i * rs;
      for (int64_t k = 0; k < kc; ++k) d[k * W + i] = si[k * cs];
    }
  }
  for (int i = int(n); i < W; ++i)
    for (int64_t k = 0; k < kc; ++k) d[k * W + i] = T(0);
}

// Pack rows [i0, i0 + mc) x columns [p0, p0 + kc) of A into MR-tall micro-panels,
// Ap[panel][k][MR], zero-padding the last panel. Only panels [q0, q1) are packed.
template <typename T, int MR>
void pack_a(const GemmArgs<T>& g, int64_t i0, int64_t mc, int64_t p0, int64_t kc, T* ap,
            int64_t q0, int64_t q1) {
  for (int64_t q = q0; q < q1; ++q) {
    T* d = ap + q * kc * MR;
    const int64_t r0 = i0 + q * MR, rows = min64(MR, i0 + mc - r0);
    const T* a = g.a + r0 * g.rs_a;
    for_each_k_run(g.k_seg, g.k_seg_first, g.seg_stride_a, g.cs_a, p0, kc,
                   [&](int64_t off, int64_t len, int64_t base) {
      pack_panel_run<T, MR>(a + base, g.rs_a, g.cs_a, rows, len, d + off * MR);
    });
  }
}

// One B micro-panel, columns [c0, c0 + cols), when N runs over segments (GemmArgs::n_seg):
// each row of the panel is a few runs of columns, each inside one segment.
template <typename T, int NR>
void pack_b_panel_segmented(const GemmArgs<T>& g, int64_t p0, int64_t kc, int64_t c0,
                            int64_t cols, T* d) {
  int64_t run_j[NR], run_len[NR], run_base[NR];  // first panel column, length, offset in b
  int runs = 0;
  for (int64_t j = 0; j < cols; ++runs) {
    const int64_t col = c0 + j, pos = col % g.n_seg, len = min64(g.n_seg - pos, cols - j);
    run_j[runs] = j;
    run_len[runs] = len;
    run_base[runs] = (col / g.n_seg) * g.n_seg_stride_b + pos * g.cs_b;
    j += len;
  }
  if (runs == 1)  // inside one segment: the plain panel packer
    return pack_panel_run<T, NR>(g.b + run_base[0] + p0 * g.rs_b, g.cs_b, g.rs_b, cols, kc, d);
  for (int64_t k = 0; k < kc; ++k) {
    const T* bk = g.b + (p0 + k) * g.rs_b;
    T* dk = d + k * NR;
    for (int r = 0; r < runs; ++r) {
      const T* src = bk + run_base[r];
      T* dst = dk + run_j[r];
      if (g.cs_b == 1)
        copy_n(dst, src, run_len[r]);
      else
        for (int64_t i = 0; i < run_len[r]; ++i) dst[i] = src[i * g.cs_b];
    }
    for (int64_t j = cols; j < NR; ++j) dk[j] = T(0);
  }
}

// One B micro-panel: rows [p0, p0 + kc) x columns [c0, c0 + cols) of B into d[k][NR],
// zero-padded past cols.
template <typename T, int NR>
void pack_b_panel(const GemmArgs<T>& g, int64_t p0, int64_t kc, int64_t c0, int64_t cols,
                  T* d) {
  if (g.pack_b_panel) return g.pack_b_panel(g.pack_b_ctx, p0, kc, c0, cols, NR, d);
  if (g.n_seg > 0) return pack_b_panel_segmented<T, NR>(g, p0, kc, c0, cols, d);
  const T* b = g.b + c0 * g.cs_b;
  for_each_k_run(g.k_seg, g.k_seg_first, g.seg_stride_b, g.rs_b, p0, kc,
                 [&](int64_t off, int64_t len, int64_t base) {
    pack_panel_run<T, NR>(b + base, g.cs_b, g.rs_b, cols, len, d + off * NR);
  });
}

// Pack rows [p0, p0 + kc) x columns [j0, j0 + nc) of B into NR-wide micro-panels,
// Bp[panel][k][NR], zero-padding the last panel. Only panels [q0, q1) are packed.
template <typename T, int NR>
void pack_b(const GemmArgs<T>& g, int64_t p0, int64_t kc, int64_t j0, int64_t nc, T* bp,
            int64_t q0, int64_t q1) {
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t c0 = j0 + q * NR;
    pack_b_panel<T, NR>(g, p0, kc, c0, min64(NR, j0 + nc - c0), bp + q * kc * NR);
  }
}

// The micro-kernel (contract in gemm.h). row0/col0: position of the tile in C, for the
// epilogue's per-channel vectors.
//
// MR x NBV is the tile computed in registers; AS and BS are the packed panels' strides (the
// full MR and NR), so a smaller tile reads the same panels: edge tiles use the smallest one
// that covers them instead of wasting a full tile's FMAs on zero padding.
template <typename T, int MR, int NBV, int AS = MR, int BS = NBV * Vec<T>::lanes>
inline void ukernel(int64_t kc, const T* __restrict ap, const T* __restrict bp, T* c,
                    int64_t ldc, int64_t m, int64_t n, bool accumulate, bool last,
                    const Epilogue<T>& epi, int64_t row0, int64_t col0) {
  using V = Vec<T>;
  constexpr int L = V::lanes, NR = NBV * L;
  V acc[MR][NBV];
  for (int i = 0; i < MR; ++i)
    for (int b = 0; b < NBV; ++b) acc[i][b] = V::zero();
  // Start fetching the C tile now: it is read (when accumulating) and written after the loop.
  // (+5-18 % on sgemm 2048^3-4096^3.)
  for (int64_t i = 0; i < m; ++i)
    for (int j = 0; j < NR * int(sizeof(T)); j += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(c + i * ldc) + j, 1);
  for (int64_t k = 0; k < kc; ++k, ap += AS, bp += BS) {
    V bv[NBV];
    for (int b = 0; b < NBV; ++b) bv[b] = V::load(bp + b * L);
    for (int i = 0; i < MR; ++i) {
      const V av = V::broadcast(ap + i);
      for (int b = 0; b < NBV; ++b) acc[i][b] = fmadd(av, bv[b], acc[i][b]);
    }
  }
  const bool epilogue = last && epi.active();
  if (m == MR && n == NR) {
    // Statistics: per row (channel = row) or per column vector, summed in registers over
    // the tile, then added to the thread's float64 sums once.
    V col_s[NBV], col_q[NBV];
    for (int b = 0; b < NBV; ++b) col_s[b] = col_q[b] = V::zero();
    for (int i = 0; i < MR; ++i) {
      T* ci = c + i * ldc;
      V row_s = V::zero(), row_q = V::zero();
      for (int b = 0; b < NBV; ++b) {
        V v = acc[i][b];
        if (accumulate) v = add(v, V::load(ci + b * L));
        if (epilogue) {
          if (epi.scale)
            v = mul(v, epi.per_row ? V::broadcast(epi.scale + row0 + i)
                                   : V::load(epi.scale + col0 + b * L));
          if (epi.shift)
            v = add(v, epi.per_row ? V::broadcast(epi.shift + row0 + i)
                                   : V::load(epi.shift + col0 + b * L));
          if (epi.stats.sum) {
            if (epi.per_row) {
              row_s = add(row_s, v);
              row_q = fmadd(v, v, row_q);
            } else {
              col_s[b] = add(col_s[b], v);
              col_q[b] = fmadd(v, v, col_q[b]);
            }
          }
          v = activate(v, epi.act);
        }
        v.store(ci + b * L);
      }
      if (epilogue && epi.stats.sum && epi.per_row)
        add_stats(epi.stats, row0 + i, hsum(row_s), hsum(row_q));
    }
    if (epilogue && epi.stats.sum && !epi.per_row)
      for (int b = 0; b < NBV; ++b) add_stats(epi.stats, col0 + b * L, col_s[b], col_q[b], L);
    return;
  }
  // Edge tile: through a buffer, writing only the m x n valid values.
  alignas(64) T tile[MR * NR];
  for (int i = 0; i < MR; ++i)
    for (int b = 0; b < NBV; ++b) acc[i][b].store(tile + i * NR + b * L);
  for (int64_t i = 0; i < m; ++i) {
    T* ci = c + i * ldc;
    for (int64_t j = 0; j < n; ++j) ci[j] = tile[i * NR + j] + (accumulate ? ci[j] : T(0));
    if (!epilogue) continue;
    if (epi.per_row)
      finish_channel_run(epi, row0 + i, ci, n);
    else
      finish_pixel_run(epi, col0, ci, n);
  }
}

// One MR x NR tile of C, m x n of it valid: the full micro-kernel, or for edge tiles the
// smallest of (MR/3, 2 MR/3, MR rows) x (NR/2, NR columns) that covers them.
template <typename T>
inline void tile(int64_t kc, const T* ap, const T* bp, T* c, int64_t ldc, int64_t m, int64_t n,
                 bool accumulate, bool last, const Epilogue<T>& epi, int64_t row0, int64_t col0) {
  using B = Blocking<T>;
  constexpr int MR = B::MR, NBV = B::NBV, NR = NBV * Vec<T>::lanes;
  static_assert(MR % 3 == 0 || MR % 2 == 0, "tail tiles split MR");
  constexpr int M1 = MR % 3 == 0 ? MR / 3 : MR / 2, M2 = MR % 3 == 0 ? 2 * MR / 3 : MR;
  const bool narrow = NBV > 1 && n <= NR / NBV;
#define FASTCONV_TILE(ROWS, VECS) \
  ukernel<T, ROWS, VECS, MR, NR>(kc, ap, bp, c, ldc, m, n, accumulate, last, epi, row0, col0)
  if (m > M2) {
    if (narrow) FASTCONV_TILE(MR, 1); else FASTCONV_TILE(MR, NBV);
  } else if (m > M1) {
    if (narrow) FASTCONV_TILE(M2, 1); else FASTCONV_TILE(M2, NBV);
  } else {
    if (narrow) FASTCONV_TILE(M1, 1); else FASTCONV_TILE(M1, NBV);
  }
#undef FASTCONV_TILE
}

// The tile of C at (row, col) of the whole product, m x n of it valid. With column segments
// (GemmArgs::n_seg) a tile inside one segment goes straight to its place; one that crosses
// a segment boundary (a few per segment) is computed into a buffer and added to C run by run.
template <typename T>
inline void tile_of(const GemmArgs<T>& g, int64_t kc, const T* ap, const T* bp, int64_t row,
                    int64_t col, bool accumulate, bool last) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NBV * Vec<T>::lanes;
  const int64_t m = min64(MR, g.M - row), n = min64(NR, g.N - col);
  if (g.n_seg <= 0)
    return tile<T>(kc, ap, bp, g.c + row * g.ldc + col, g.ldc, m, n, accumulate, last, g.epi,
                   row, col);
  const int64_t pos = col % g.n_seg;
  if (pos + n <= g.n_seg)
    return tile<T>(kc, ap, bp, g.c + (col / g.n_seg) * g.n_seg_stride_c + row * g.ldc + pos,
                   g.ldc, m, n, accumulate, last, g.epi, row, col);
  alignas(64) T buf[MR * NR];
  tile<T>(kc, ap, bp, buf, NR, m, n, false, false, Epilogue<T>{}, row, col);
  const bool epilogue = last && g.epi.active();
  for (int64_t j = 0; j < n;) {
    const int64_t cj = col + j, at = cj % g.n_seg, len = min64(g.n_seg - at, n - j);
    T* c = g.c + (cj / g.n_seg) * g.n_seg_stride_c + row * g.ldc + at;
    for (int64_t i = 0; i < m; ++i) {
      T* ci = c + i * g.ldc;
      const T* bi = buf + i * NR + j;
      for (int64_t t = 0; t < len; ++t) ci[t] = bi[t] + (accumulate ? ci[t] : T(0));
      if (!epilogue) continue;
      if (g.epi.per_row)
        finish_channel_run(g.epi, row + i, ci, len);
      else
        finish_pixel_run(g.epi, cj, ci, len);
    }
    j += len;
  }
}

// The JR and IR loops over an m x n block of packed panels: tile_fn(A panel, B panel, ir,
// jr) for each MR x NR tile, jr outermost so that a B micro-panel stays in L1.
template <typename T, typename F>
inline void macro_loops(int64_t m, int64_t n, int64_t kc, const T* ap, const T* bp, F tile_fn) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NBV * Vec<T>::lanes;
  for (int64_t jr = 0; jr < n; jr += NR, bp += kc * NR) {  // JR
    const T* a = ap;
    for (int64_t ir = 0; ir < m; ir += MR, a += kc * MR)   // IR
      tile_fn(a, bp, ir, jr);
  }
}

// C = epilogue(accumulate ? C : 0) for K == 0.
template <typename T>
void gemm_empty_k(const GemmArgs<T>& g) {
  for (int64_t i = 0; i < g.M; ++i) {
    T* ci = g.c + i * g.ldc;
    for (int64_t j = 0; j < g.N; ++j) ci[j] = g.accumulate ? ci[j] : T(0);
    if (!g.epi.active()) continue;
    if (g.epi.per_row)
      finish_channel_run(g.epi, i, ci, g.N);
    else
      finish_pixel_run(g.epi, 0, ci, g.N);
  }
}

}  // namespace

// Narrow products (a few hundred columns: a 1x1 layer's pixels at batch 1) with rows for
// every thread split the rows instead: each thread packs the A blocks of its own rows into
// its own buffer and runs them against all of B, with no barrier between A blocks and no
// A panel read from the other core's cache. Interleaved, 2 threads, GFLOP/s split rows vs
// shared A blocks (torch.mm): M x N x K 1024 x 196 x 256: 186 vs 162 (160); 512 x 196 x
// 1024: 172 vs 154 (155); 2048 x 49 x 512: 131 vs 102 (120); 1024 x 392 x 256: 198 vs 183
// (172); but 1024 x 784 x 256: 174 vs 174, 256 x 784 x 1024: 116 vs 142.
constexpr int64_t kSplitRowsMaxColumns = 400;

template <typename T>
bool splits_rows(int64_t M, int64_t N, int nt) {
  return nt > 1 && N <= kSplitRowsMaxColumns && M >= 4 * Blocking<T>::MR * nt;
}

template <typename T>
void gemm_own_rows(const GemmArgs<T>& g, int nt, T* abuf, T* bbuf) {
  using B = Blocking<T>;
  constexpr int MR = B::MR, NR = B::NBV * Vec<T>::lanes;
  constexpr int64_t MC = B::MC;
  const int64_t KC = k_block<T>(g.K), a_block = min64(KC, g.K) * round_up(min64(MC, g.M), MR);
  const int64_t nb = ceil_div(g.N, NR);
  parallel(nt, [&](int tid, int nth) {
    int64_t r0, r1, q0, q1;
    split_range(ceil_div(g.M, MR), nth, tid, &r0, &r1);
    const int64_t row_end = min64(g.M, r1 * MR);
    T* own_a = abuf ? abuf + tid * a_block : nullptr;
    for (int64_t pc = 0; pc < g.K; pc += KC) {                   // PC loop
      const int64_t kc = min64(KC, g.K - pc);
      const bool accumulate = g.accumulate || pc > 0, last = pc + kc == g.K;
      const T* bblk = bbuf;
      if (g.b_packed) {
        bblk = g.b_packed + pc * round_up(g.N, NR);
      } else {
        split_range(nb, nth, tid, &q0, &q1);                     // threads pack B together
        pack_b<T, NR>(g, pc, kc, 0, g.N, bbuf, q0, q1);
#pragma omp barrier
      }
      for (int64_t ic = r0 * MR; ic < row_end; ic += MC) {      // IC loop, own rows
        const int64_t mc = min64(MC, row_end - ic), ma = ceil_div(mc, MR);
        const T* ablk = own_a;
        if (g.a_packed)
          ablk = g.a_packed + pc * round_up(g.M, MR) + (ic / MR) * kc * MR;
        else
          pack_a<T, MR>(g, ic, mc, pc, kc, own_a, 0, ma);
        macro_loops<T>(mc, g.N, kc, ablk, bblk, [&](const T* a, const T* b, int64_t ir,
                                                    int64_t jr) {  // JR and IR loops
          tile_of<T>(g, kc, a, b, ic + ir, jr, accumulate, last);
        });
      }
      if (!g.b_packed) {
#pragma omp barrier  // B is repacked next
      }
    }
  });
}

// Products of one A block (M <= MC rows, or more of a short K: the block's bytes are the
// budget, so 1x1 64>256 is one block of 256 x 64) whose B is not prepacked use each B
// micro-panel with that block only. Packing a whole KC x NC block of B first (all threads,
// into L3, then a barrier) moves B through the caches twice and leaves the FMAs waiting on
// the packing.
// Here each thread packs its own micro-panels one at a time into an L1-sized buffer and runs
// every tile of the A block over each at once; A's packing is the only barrier. Measured:
// see Tuning::gemm_own_panels_max_rows (common/tuning.h).
template <typename T>
bool fits_one_a_block(int64_t M, int64_t K) {
  using B = Blocking<T>;
  return M <= tuning().gemm_own_panels_max_rows &&
         (M <= B::MC || round_up(M, B::MR) * min64(k_block<T>(K), K) <= B::MC * B::KC);
}

template <typename T>
bool packs_own_panels(int64_t M, int64_t N, int64_t K, bool b_prepacked, int nt) {
  constexpr int NR = Blocking<T>::NBV * Vec<T>::lanes;
  return !b_prepacked && fits_one_a_block<T>(M, K) && ceil_div(N, NR) >= 2 * nt;
}

template <typename T>
void gemm_own_panels(const GemmArgs<T>& g, int nt, T* abuf, T* bbuf) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NBV * Vec<T>::lanes;
  const int64_t KC = k_block<T>(g.K), kc_max = min64(KC, g.K);
  const int64_t ma = ceil_div(g.M, MR), nb = ceil_div(g.N, NR);
  parallel(nt, [&](int tid, int nth) {
    T* own_b = bbuf + tid * kc_max * NR;
    int64_t q0, q1;
    for (int64_t pc = 0; pc < g.K; pc += KC) {                   // PC loop
      const int64_t kc = min64(KC, g.K - pc);
      const bool accumulate = g.accumulate || pc > 0, last = pc + kc == g.K;
      const T* ablk = abuf;
      if (g.a_packed) {
        ablk = g.a_packed + pc * round_up(g.M, MR);
      } else {
        split_range(ma, nth, tid, &q0, &q1);                     // threads pack A together
        pack_a<T, MR>(g, 0, g.M, pc, kc, abuf, q0, q1);
#pragma omp barrier
      }
      split_range(nb, nth, tid, &q0, &q1);
      for (int64_t q = q0; q < q1; ++q) {                        // JR loop, own panels
        const int64_t col = q * NR;
        pack_b_panel<T, NR>(g, pc, kc, col, min64(NR, g.N - col), own_b);
        for (int64_t ir = 0; ir < ma; ++ir)                      // IR loop
          tile_of<T>(g, kc, ablk + ir * kc * MR, own_b, ir * MR, col, accumulate, last);
      }
      if (!g.a_packed) {
#pragma omp barrier  // A is repacked next
      }
    }
  });
}

template <typename T>
void gemm(const GemmArgs<T>& g, int nthreads) {
  using B = Blocking<T>;
  constexpr int MR = B::MR, NR = B::NBV * Vec<T>::lanes;
  constexpr int64_t MC = B::MC, NC = round_up(B::NC, NR);
  const int64_t KC = k_block<T>(g.K);
  if (g.M <= 0 || g.N <= 0) return;
  if (g.K <= 0) return gemm_empty_k(g);

  const int64_t kc_max = min64(KC, g.K);
  const int nt = threads_for(2 * g.M * g.N * g.K, nthreads);
  const bool own_rows = splits_rows<T>(g.M, g.N, nt);
  const bool own_panels = !own_rows && packs_own_panels<T>(g.M, g.N, g.K, g.b_packed, nt);
  const int64_t a_block = kc_max * round_up(own_panels ? g.M : min64(MC, g.M), MR);
  T* bbuf = g.b_packed    ? nullptr
            : own_panels ? workspace_as<T>(kWsGemmPanelsB, nt * kc_max * NR)
                         : workspace_as<T>(kWsGemmPanelsB, kc_max * round_up(min64(NC, g.N), NR));
  T* abuf = g.a_packed ? nullptr : workspace_as<T>(kWsGemmPanelsA, (own_rows ? nt : 1) * a_block);
  if (own_rows) return gemm_own_rows<T>(g, nt, abuf, bbuf);
  if (own_panels) return gemm_own_panels<T>(g, nt, abuf, bbuf);

  parallel(nt, [&](int tid, int nth) {
    for (int64_t jc = 0; jc < g.N; jc += NC) {                   // JC loop
      const int64_t nc = min64(NC, g.N - jc), nb = ceil_div(nc, NR);
      for (int64_t pc = 0; pc < g.K; pc += KC) {                 // PC loop
        const int64_t kc = min64(KC, g.K - pc);
        const bool accumulate = g.accumulate || pc > 0, last = pc + kc == g.K;
        int64_t q0, q1;
        const T* bblk = bbuf;
        if (g.b_packed) {
          bblk = g.b_packed + pc * round_up(g.N, NR) + (jc / NR) * kc * NR;
        } else {
          split_range(nb, nth, tid, &q0, &q1);                   // threads pack B together
          pack_b<T, NR>(g, pc, kc, jc, nc, bbuf, q0, q1);
#pragma omp barrier
        }
        for (int64_t ic = 0; ic < g.M; ic += MC) {               // IC loop
          const int64_t mc = min64(MC, g.M - ic), ma = ceil_div(mc, MR);
          const T* ablk = abuf;
          if (g.a_packed) {
            ablk = g.a_packed + pc * round_up(g.M, MR) + (ic / MR) * kc * MR;
          } else {
            split_range(ma, nth, tid, &q0, &q1);                 // ... and A
            pack_a<T, MR>(g, ic, mc, pc, kc, abuf, q0, q1);
#pragma omp barrier
          }
          // JR and IR loops, their tiles split across threads in JR-major order so that a
          // thread keeps its B micro-panel in L1 across consecutive tiles.
          int64_t t0, t1;
          split_range(nb * ma, nth, tid, &t0, &t1);
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t jr = t / ma, ir = t % ma;
            const int64_t row = ic + ir * MR, col = jc + jr * NR;
            tile_of<T>(g, kc, ablk + ir * kc * MR, bblk + jr * kc * NR, row, col, accumulate,
                       last);
          }
          if (!g.a_packed || !g.b_packed) {
#pragma omp barrier  // a buffer is repacked next
          }
        }
      }
    }
  });
}

template <typename T>
int64_t gemm_workspace_bytes(int64_t M, int64_t N, int64_t K, unsigned calls) {
  const bool a_prepacked = calls & kGemmAPrepacked, b_prepacked = calls & kGemmBPrepacked;
  using B = Blocking<T>;
  constexpr int MR = B::MR, NR = B::NBV * Vec<T>::lanes;
  if (M <= 0 || N <= 0 || K <= 0) return 0;
  // Callers size one workspace for calls whose K varies up to K (image groups, the last one
  // shorter), and k_block is not monotonic (767 -> 767, 768 -> 384): bound it by the largest
  // block any K' <= K takes, just under 1.5 KC.
  const int64_t kc_max = max64(k_block<T>(K), min64(K, B::KC + B::KC / 2 - 1));
  const int nt = threads_for(2 * M * N * K, omp_get_max_threads());
  // A and B: split rows' per-thread A blocks and a shared B block; or one A block (all of
  // A) and a micro-panel per thread; or shared blocks of both. Callers estimate with shapes
  // that bound their calls' rather than equal them, and a call of fewer columns, a shorter
  // K or another thread count may take another path than this shape would. So each term
  // bounds every path a call within the shape can take:
  //  * A: one A block of more than MC rows holds at most MC x KC values (fits_one_a_block)
  //    and kc_max columns, whatever the call's K; split rows take nt shared-size blocks.
  //  * B: with at most MC rows (and the tests' row cap not below M), a micro-panel per
  //    thread, at most 2 x threads of them (packs_own_panels), or, where calls may have
  //    fewer columns and one of at most kSplitRowsMaxColumns splits rows (8 MR rows or
  //    more), that many columns of B; otherwise whole shared blocks.
  const bool rows = splits_rows<T>(M, N, nt);
  const bool own_possible = M <= tuning().gemm_own_panels_max_rows;
  const int64_t shared_a = kc_max * round_up(min64(B::MC, M), MR);
  const int64_t one_a = M <= B::MC ? shared_a : min64(round_up(M, MR) * kc_max, B::MC * B::KC);
  const int64_t a =
      a_prepacked ? 0 : max64(rows ? nt * shared_a : shared_a, own_possible ? one_a : 0);
  const int64_t panels = ceil_div(min64(round_up(B::NC, NR), N), NR);
  const int64_t own_b = kc_max * NR * min64(panels, 2 * int64_t(omp_get_max_threads()));
  const bool rows_possible = (calls & kGemmFewerColumns) && M >= 8 * MR;
  const int64_t rows_b = rows_possible ? kc_max * round_up(min64(N, kSplitRowsMaxColumns), NR) : 0;
  const int64_t b = b_prepacked                          ? 0
                    : !rows && M <= B::MC && own_possible ? max64(own_b, rows_b)
                                                          : kc_max * NR * panels;
  return (a + b) * int64_t(sizeof(T));
}
template int64_t gemm_workspace_bytes<float>(int64_t, int64_t, int64_t, unsigned);
template int64_t gemm_workspace_bytes<double>(int64_t, int64_t, int64_t, unsigned);

template <typename T>
int64_t gemm_packed_size_a(int64_t M, int64_t K) {
  return round_up(M, Blocking<T>::MR) * K;
}
template <typename T>
int64_t gemm_packed_size_b(int64_t K, int64_t N) {
  return round_up(N, Blocking<T>::NBV * Vec<T>::lanes) * K;
}

template <typename T>
void gemm_pack_a(const GemmArgs<T>& g, T* out, int nthreads) {
  using B = Blocking<T>;
  const int64_t panels = ceil_div(g.M, B::MR), mpad = panels * B::MR, KC = k_block<T>(g.K);
  for (int64_t pc = 0; pc < g.K; pc += KC) {
    const int64_t kc = min64(KC, g.K - pc);
    parallel(threads_for(mpad * kc * 4, nthreads), [&](int tid, int nth) {
      int64_t q0, q1;
      split_range(panels, nth, tid, &q0, &q1);
      pack_a<T, B::MR>(g, 0, g.M, pc, kc, out + pc * mpad, q0, q1);
    });
  }
}

template <typename T>
void gemm_pack_b(const GemmArgs<T>& g, T* out, int nthreads) {
  using B = Blocking<T>;
  constexpr int NR = B::NBV * Vec<T>::lanes;
  const int64_t panels = ceil_div(g.N, NR), npad = panels * NR, KC = k_block<T>(g.K);
  for (int64_t pc = 0; pc < g.K; pc += KC) {
    const int64_t kc = min64(KC, g.K - pc);
    parallel(threads_for(npad * kc * 4, nthreads), [&](int tid, int nth) {
      int64_t q0, q1;
      split_range(panels, nth, tid, &q0, &q1);
      pack_b<T, NR>(g, pc, kc, 0, g.N, out + pc * npad, q0, q1);
    });
  }
}

template <typename T>
int64_t gemm_k_block(int64_t K) {
  return k_block<T>(K);
}
template int64_t gemm_k_block<float>(int64_t);
template int64_t gemm_k_block<double>(int64_t);

template <typename T>
void gemm_macro_kernel(int64_t m, int64_t n, int64_t kc, const T* ap, const T* bp, T* c,
                       int64_t ldc, bool accumulate, bool last, const Epilogue<T>& epi,
                       int64_t row0, int64_t col0) {
  constexpr int MR = Blocking<T>::MR, NR = Blocking<T>::NBV * Vec<T>::lanes;
  macro_loops<T>(m, n, kc, ap, bp, [&](const T* a, const T* b, int64_t ir, int64_t jr) {
    tile<T>(kc, a, b, c + ir * ldc + jr, ldc, min64(MR, m - ir), min64(NR, n - jr), accumulate,
            last, epi, row0 + ir, col0 + jr);
  });
}
template void gemm_macro_kernel<float>(int64_t, int64_t, int64_t, const float*, const float*,
                                       float*, int64_t, bool, bool, const Epilogue<float>&,
                                       int64_t, int64_t);
template void gemm_macro_kernel<double>(int64_t, int64_t, int64_t, const double*,
                                        const double*, double*, int64_t, bool, bool,
                                        const Epilogue<double>&, int64_t, int64_t);

template void gemm<float>(const GemmArgs<float>&, int);
template void gemm<double>(const GemmArgs<double>&, int);

template <typename T>
GemmBlocking gemm_blocking() {
  using B = Blocking<T>;
  constexpr int64_t NR = B::NBV * Vec<T>::lanes;
  return {B::MR, NR, B::KC, B::MC, round_up(B::NC, NR)};
}
template GemmBlocking gemm_blocking<float>();
template GemmBlocking gemm_blocking<double>();
template int64_t gemm_packed_size_a<float>(int64_t, int64_t);
template int64_t gemm_packed_size_a<double>(int64_t, int64_t);
template int64_t gemm_packed_size_b<float>(int64_t, int64_t);
template int64_t gemm_packed_size_b<double>(int64_t, int64_t);
template void gemm_pack_a<float>(const GemmArgs<float>&, float*, int);
template void gemm_pack_a<double>(const GemmArgs<double>&, double*, int);
template void gemm_pack_b<float>(const GemmArgs<float>&, float*, int);
template void gemm_pack_b<double>(const GemmArgs<double>&, double*, int);

}  // namespace FASTCONV_ISA
}  // namespace fastconv
