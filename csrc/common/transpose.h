// Small matrix transposes for layout changes (NCHW <-> NHWC), per ISA (include after simd.h).
#pragma once
#include "simd.h"

namespace fastconv {
namespace FASTCONV_ISA {

constexpr int kTransposeBlock = 16;

// column_dst(j)[i] = src[i * ss + j] for i < rows, j < cols; rows, cols <= kTransposeBlock:
// column j of the block goes wherever column_dst says (a packer's scattered destinations are
// written straight from registers: staging them in a local block stalls every read back on
// the masked stores, which do not forward). Rows whose kTransposeBlock values all lie before
// `readable_end` (null: none past `cols`) may be read whole; the first `whole_cols` columns
// may be stored whole, their lanes past `rows` landing where later columns are stored
// (columns are stored in order, j = 0, 1, ...). See the AVX-512 version.
template <typename T, typename ColumnDst>
inline void transpose_block_to(const T* src, int64_t ss, int rows, int cols, ColumnDst column_dst,
                               const T* readable_end = nullptr, int whole_cols = 0) {
  (void)readable_end;
  (void)whole_cols;
  for (int j = 0; j < cols; ++j) {
    T* d = column_dst(j);
    for (int i = 0; i < rows; ++i) d[i] = src[i * ss + j];
  }
}

#if defined(FASTCONV_ISA_AVX512)
// Float blocks of up to 16 x 16 in registers: 4 shuffle stages instead of 256 scalar moves.
// Partial blocks store with a mask and load their rows with a mask (missing rows are zero)
// unless the whole row may be read: a masked load that crosses a cache line is slow on Zen 4
// (16 x 9 weight pieces, rows 36 bytes apart: loaded whole, grad-input's packing of 3x3/2
// 512 @14 at batch 1 went from 2.0 to 1.55 ms a call), and likewise the masked stores:
// columns of 9 stored back to back (grad-weight's taps turned back into OIHW, 3x3/2 512 @14,
// batch 1: 0.5 ms of a 1.7 ms pass) are stored whole where later columns overwrite the rest.
template <typename ColumnDst>
inline void transpose_block_to(const float* src, int64_t ss, int rows, int cols,
                               ColumnDst column_dst, const float* readable_end = nullptr,
                               int whole_cols = 0) {
  const __mmask16 col_mask = __mmask16((1u << cols) - 1u), row_mask = __mmask16((1u << rows) - 1u);
  const uintptr_t end = reinterpret_cast<uintptr_t>(readable_end);
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) {
    const float* row = src + i * ss;
    if (i >= rows)
      r[i] = _mm512_setzero_ps();
    else if (cols == 16 || reinterpret_cast<uintptr_t>(row + 16) <= end)
      r[i] = _mm512_loadu_ps(row);  // lanes past cols land in columns that are not stored
    else
      r[i] = _mm512_maskz_loadu_ps(col_mask, row);
  }
  // Interleave row pairs, then pairs of pairs: lane l of t[4i + j] holds column 4l + j of
  // rows 4i .. 4i+3.
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // Gather the 128-bit lanes: first rows 0-7 and 8-15 separately, then both halves.
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
  // The last stage makes each column just before it is stored, in column order, so that
  // only the columns wanted are made and the 16 results never need 16 more registers (all
  // 16 made first, then stored up to a run-time `cols`, spilled to the stack: 3x3/2 512 @14,
  // batch 1, grad-input's weight packing 0.38 -> 0.30 ms in isolation).
  if (rows == 16) whole_cols = cols;
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    if (j >= cols) break;
    const int lo = (j & 3) + (j & 4);  // columns j, j + 8 come from t[lo] and t[lo + 8]
    const __m512 v = j < 8 ? _mm512_shuffle_f32x4(t[lo], t[lo + 8], 0x88)
                           : _mm512_shuffle_f32x4(t[lo], t[lo + 8], 0xdd);
    if (j < whole_cols)
      _mm512_storeu_ps(column_dst(j), v);
    else
      _mm512_mask_storeu_ps(column_dst(j), row_mask, v);
  }
}
#endif

// dst[j * ds + i] = src[i * ss + j] for i < rows, j < cols; rows, cols <= kTransposeBlock.
// Columns back to back (ds == rows) are stored whole while they end inside the block.
template <typename T>
inline void transpose_block(const T* src, int64_t ss, T* dst, int64_t ds, int rows, int cols) {
  int whole = 0;  // columns j with j * rows + 16 <= cols * rows
  if (ds == rows && rows > 0 && cols * rows >= kTransposeBlock)
    whole = (cols * rows - kTransposeBlock) / rows + 1;
  transpose_block_to(src, ss, rows, cols, [=](int j) { return dst + j * ds; }, (const T*)nullptr,
                     whole);
}

// A filter's piece turned tap-major: dst[t * 16 + c] = src[c * RS + t] for c < rows (<= 16),
// t < RS, where src is `rows` channels of one OIHW filter (channels x taps, contiguous) in a
// tensor that ends at `end`. Every weight packer that reorders OIHW filters starts from these
// pieces.
template <typename T>
inline void filter_piece_tap_major(const T* src, int64_t RS, int rows, T* dst, const T* end) {
  for (int64_t t0 = 0; t0 < RS; t0 += kTransposeBlock) {
    T* d = dst + t0 * kTransposeBlock;
    transpose_block_to(src + t0, RS, rows, int(min64(kTransposeBlock, RS - t0)),
                       [=](int j) { return d + j * kTransposeBlock; }, end);
  }
}

}  // namespace FASTCONV_ISA
}  // namespace fastconv
