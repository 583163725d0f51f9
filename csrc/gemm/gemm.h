// Packed GEMM, BLIS style: C = A * B (+ C), then an optional per-channel epilogue.
//
//   A is M x K, A(i, k) = a[i * rs_a + k * cs_a]   (any strides: row- or column-major views)
//   B is K x N, B(k, j) = b[k * rs_b + j * cs_b]
//   C is M x N, C(i, j) = c[i * ldc + j]           (row-major)
//
// Five loops around one micro-kernel (gemm.cpp):
//
//   JC: for jc in [0, N) step NC            B block  KC x NC  -> L3
//     PC: for pc in [0, K) step KC          pack B block into NR-wide micro-panels
//       IC: for ic in [0, M) step MC        pack A block into MR-tall micro-panels -> L2
//         JR: for jr in [0, NC) step NR     B micro-panel KC x NR -> L1
//           IR: for ir in [0, MC) step MR   micro-kernel: MR x NR tile of C in registers
//
// Micro-kernel contract: given kc, a packed A micro-panel Ap and a packed B micro-panel Bp,
//
//   tile(i, j) = sum_{k < kc} Ap[k * MR + i] * Bp[k * NR + j]      (i < MR, j < NR)
//
// and writes the m x n valid part (edge tiles: m <= MR, n <= NR) to C, adding C's previous
// value when accumulating and applying the epilogue after the last K block. Packed layouts
// (f32 AVX-512, MR = 12, NR = 32; edges are zero-padded so the kernel never branches):
//
//   Ap (one A micro-panel):  | a(0,0) a(1,0) .. a(11,0) | a(0,1) a(1,1) .. a(11,1) | ..   kc x 12
//   Bp (one B micro-panel):  | b(0,0) b(0,1) .. b(0,31) | b(1,0) b(1,1) .. b(1,31) | ..   kc x 32
//
// Per k the kernel loads NR/lanes vectors of Bp, broadcasts MR values of Ap, and issues
// MR * NR/lanes FMAs into that many accumulator registers.
#pragma once
#include <cstdint>

#if defined(FASTCONV_ISA_AVX512) || defined(FASTCONV_ISA_AVX2) || defined(FASTCONV_ISA_SCALAR)
#include "../common/simd.h"  // an ISA translation unit: FASTCONV_ISA names its namespace
#endif
#include "../common/epilogue.h"

namespace fastconv {

// The epilogue (csrc/common/epilogue.h) is applied to each finished element C(i, j), its
// channel being i (epi.per_row) or j.
template <typename T>
struct GemmArgs {
  int64_t M, N, K;
  const T* a;
  int64_t rs_a, cs_a;
  const T* b;
  int64_t rs_b, cs_b;
  T* c;
  int64_t ldc;
  bool accumulate;  // C += A * B rather than C = A * B
  Epilogue<T> epi;
  // Optional: the whole of A (or B) already packed by gemm_pack_a (gemm_pack_b), when one
  // operand is reused across calls (a convolution's weights across images and chunks).
  const T* a_packed = nullptr;
  const T* b_packed = nullptr;
  // Optional: B generated while packing instead of read from b (implicit im2col). The
  // function fills one panel, dst[k * nr + j] = B(k0 + k, j0 + j) for k < kc, j < cols, and
  // zeros for cols <= j < nr. It sees K indices as they are: K segments (below) do not apply.
  void (*pack_b_panel)(const void* ctx, int64_t k0, int64_t kc, int64_t j0, int64_t cols,
                       int64_t nr, T* dst) = nullptr;
  const void* pack_b_ctx = nullptr;
  // Optional: K runs over segments of k_seg indices each (the images of a batch), so that
  // with kk = k + k_seg_first, A(i, k) = a[i * rs_a + (kk / k_seg) * seg_stride_a +
  // (kk % k_seg) * cs_a] and B(k, j) = b[(kk / k_seg) * seg_stride_b + (kk % k_seg) * rs_b +
  // j * cs_b]: one GEMM sums over several images' pixels. 0: K is one run. Packing only.
  int64_t k_seg = 0, k_seg_first = 0;
  int64_t seg_stride_a = 0, seg_stride_b = 0;
  // Optional: N runs over segments of n_seg columns each (the images of an NCHW batch, so
  // that one GEMM covers every image's pixels), so that with s = j / n_seg, jj = j % n_seg,
  // B(k, j) = b[s * n_seg_stride_b + k * rs_b + jj * cs_b] and C(i, j) = c[s * n_seg_stride_c
  // + i * ldc + jj]. 0: N is one run. Not with K segments or pack_b_panel. A per-column
  // epilogue is indexed by j, the column of the whole product.
  int64_t n_seg = 0;
  int64_t n_seg_stride_b = 0, n_seg_stride_c = 0;
};

// Whole-operand packed layout, per KC block of K (pc = 0, KC, 2 KC, ...):
//   A: block pc at a_packed + pc * round_up(M, MR); panel q of it (rows q*MR ..) at + q * kc * MR
//   B: block pc at b_packed + pc * round_up(N, NR); panel q of it (cols q*NR ..) at + q * kc * NR
// with kc = min(KC, K - pc): exactly the panels the five loops would pack, stored once.

// The register tile (MR x NR) and cache blocks of one ISA's GEMM, for tests and benchmarks.
struct GemmBlocking {
  int64_t mr, nr, kc, mc, nc;
};

#if defined(FASTCONV_ISA)  // per-ISA entry points, for the ISA translation units (simd.h)
namespace FASTCONV_ISA {
template <typename T> void gemm(const GemmArgs<T>& args, int nthreads);
template <typename T> GemmBlocking gemm_blocking();
// Pack all of A (or B) of `args` into `out` (gemm_packed_size elements), see GemmArgs.
template <typename T> int64_t gemm_packed_size_a(int64_t M, int64_t K);
template <typename T> int64_t gemm_packed_size_b(int64_t K, int64_t N);
template <typename T> void gemm_pack_a(const GemmArgs<T>& args, T* out, int nthreads);
template <typename T> void gemm_pack_b(const GemmArgs<T>& args, T* out, int nthreads);
// The size of the K blocks the five loops (and the whole-operand layouts) cut K into: blocks
// of this many, the last one possibly shorter.
template <typename T> int64_t gemm_k_block(int64_t K);
// The macro-kernel alone (JR and IR loops), in the calling thread, for callers that pack
// their own panels (Winograd packs transformed tiles as B): C (m x n, row stride ldc) =
// [C +] Ap * Bp over kc, where Ap holds ceil(m / MR) A micro-panels (kc x MR each, one after
// the other) and Bp ceil(n / NR) B micro-panels (kc x NR each). `last` applies epi, whose
// channels are row0 + i (per_row) or col0 + j.
template <typename T>
void gemm_macro_kernel(int64_t m, int64_t n, int64_t kc, const T* ap, const T* bp, T* c,
                       int64_t ldc, bool accumulate, bool last, const Epilogue<T>& epi,
                       int64_t row0, int64_t col0);
// What the calls one workspace serves have in common besides their bounding shape.
enum GemmCalls : unsigned {
  kGemmPacksBoth = 0,
  kGemmAPrepacked = 1,     // A comes packed (gemm_pack_a): no A panels
  kGemmBPrepacked = 2,     // B comes packed: no B panels
  kGemmFewerColumns = 4,   // a call may have fewer columns than N (an image group cut short)
};
// Bytes of panel workspace any gemm() call of at most M x N x K takes (rows and K may be
// shorter in any call; columns only with kGemmFewerColumns).
template <typename T> int64_t gemm_workspace_bytes(int64_t M, int64_t N, int64_t K,
                                                   unsigned calls);
}  // namespace FASTCONV_ISA
#endif

}  // namespace fastconv
