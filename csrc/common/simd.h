// The vector type each ISA build computes with. A kernel source includes this header and is
// compiled once per ISA (setup.py passes -DFASTCONV_ISA_<NAME> and that ISA's -m flags); all
// of its code lives in namespace fastconv::<isa>, so the three builds never share a symbol.
//
// Rule for ISA translation units: do not instantiate std:: templates with code in them
// (std::min, std::vector, ...). The linker keeps one copy of such weak symbols for the whole
// library, and it may be the AVX-512 one, which would then run on the scalar path.
#pragma once
#include <cstdint>
#include <utility>

#include <omp.h>

#if defined(FASTCONV_ISA_AVX512) || defined(FASTCONV_ISA_AVX2)
#include <immintrin.h>
#endif

#if defined(FASTCONV_ISA_AVX512)
#define FASTCONV_ISA avx512
#elif defined(FASTCONV_ISA_AVX2)
#define FASTCONV_ISA avx2
#elif defined(FASTCONV_ISA_SCALAR)
#define FASTCONV_ISA scalar
#else
#error "compile with -DFASTCONV_ISA_AVX512, -DFASTCONV_ISA_AVX2 or -DFASTCONV_ISA_SCALAR"
#endif

#define FASTCONV_STR2(x) #x
#define FASTCONV_STR(x) FASTCONV_STR2(x)

namespace fastconv {
namespace FASTCONV_ISA {

// Vec<T>: `lanes` values of T. Operations: zero, load (unaligned), broadcast of one value
// from memory, fused multiply-add, add, sub, mul, relu, min_with, clamp, where_between, store
// (unaligned), stream (a non-temporal store to a vector-aligned address, past the caches;
// stream_fence after), gather(base, int32 indices), permute(v, int32 lane indices),
// even_lanes / odd_lanes (a stride-2 split) and zip_low / zip_high (its inverse). Nothing
// else is needed by the kernels.
// Gathers cost ~5 cycles per element here: they beat only scalar loops with per-lane
// branches (csrc/winograd).
template <typename T>
struct Vec;

#if defined(FASTCONV_ISA_AVX512)

constexpr int kVectorRegisters = 32;

template <>
struct Vec<float> {
  static constexpr int lanes = 16;
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec broadcast(const float* p) { return {_mm512_set1_ps(*p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void stream(float* p) const { _mm512_stream_ps(p, v); }
};
template <>
struct Vec<double> {
  static constexpr int lanes = 8;
  __m512d v;
  static Vec zero() { return {_mm512_setzero_pd()}; }
  static Vec load(const double* p) { return {_mm512_loadu_pd(p)}; }
  static Vec broadcast(const double* p) { return {_mm512_set1_pd(*p)}; }
  void store(double* p) const { _mm512_storeu_pd(p, v); }
  void stream(double* p) const { _mm512_stream_pd(p, v); }
};
inline Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) {
  return {_mm512_fmadd_ps(a.v, b.v, c.v)};
}
inline Vec<double> fmadd(Vec<double> a, Vec<double> b, Vec<double> c) {
  return {_mm512_fmadd_pd(a.v, b.v, c.v)};
}
inline Vec<float> add(Vec<float> a, Vec<float> b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec<double> add(Vec<double> a, Vec<double> b) { return {_mm512_add_pd(a.v, b.v)}; }
inline Vec<float> gather(const float* base, const int32_t* idx) {  // base[idx[i]] per lane
  return {_mm512_i32gather_ps(_mm512_loadu_si512(idx), base, 4)};
}
inline Vec<double> gather(const double* base, const int32_t* idx) {
  return {_mm512_i32gather_pd(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), base, 8)};
}
// v[idx[i]] per lane (idx[i] < lanes): one cross-lane permute.
inline Vec<float> permute(Vec<float> v, const int32_t* idx) {
  return {_mm512_permutexvar_ps(_mm512_loadu_si512(idx), v.v)};
}
inline Vec<double> permute(Vec<double> v, const int32_t* idx) {
  const __m256i i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx));
  return {_mm512_permutexvar_pd(_mm512_cvtepi32_epi64(i), v.v)};
}
inline Vec<float> sub(Vec<float> a, Vec<float> b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec<double> sub(Vec<double> a, Vec<double> b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline Vec<float> mul(Vec<float> a, Vec<float> b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec<double> mul(Vec<double> a, Vec<double> b) { return {_mm512_mul_pd(a.v, b.v)}; }
// max(0, v) with NaN kept (maxps returns its second operand when either is NaN).
inline Vec<float> relu(Vec<float> v) { return {_mm512_max_ps(_mm512_setzero_ps(), v.v)}; }
inline Vec<double> relu(Vec<double> v) { return {_mm512_max_pd(_mm512_setzero_pd(), v.v)}; }
// min(c, v) with NaN kept (minps likewise).
inline Vec<float> min_with(float c, Vec<float> v) { return {_mm512_min_ps(_mm512_set1_ps(c), v.v)}; }
inline Vec<double> min_with(double c, Vec<double> v) { return {_mm512_min_pd(_mm512_set1_pd(c), v.v)}; }
// min(hi, max(lo, v)), NaN kept.
inline Vec<float> clamp(Vec<float> lo, Vec<float> hi, Vec<float> v) {
  return {_mm512_min_ps(hi.v, _mm512_max_ps(lo.v, v.v))};
}
inline Vec<double> clamp(Vec<double> lo, Vec<double> hi, Vec<double> v) {
  return {_mm512_min_pd(hi.v, _mm512_max_pd(lo.v, v.v))};
}
// v where lo < a < hi, else 0 (a NaN: 0).
inline Vec<float> where_between(Vec<float> a, float lo, float hi, Vec<float> v) {
  const __mmask16 m = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(lo), _CMP_GT_OQ) &
                      _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(hi), _CMP_LT_OQ);
  return {_mm512_maskz_mov_ps(m, v.v)};
}
inline Vec<double> where_between(Vec<double> a, double lo, double hi, Vec<double> v) {
  const __mmask8 m = _mm512_cmp_pd_mask(a.v, _mm512_set1_pd(lo), _CMP_GT_OQ) &
                     _mm512_cmp_pd_mask(a.v, _mm512_set1_pd(hi), _CMP_LT_OQ);
  return {_mm512_maskz_mov_pd(m, v.v)};
}
// Lanes 0, 2, 4, .. (even_lanes) or 1, 3, 5, .. (odd_lanes) of a then b, as one vector: the
// two stride phases of 2 L consecutive values.
inline Vec<float> even_lanes(Vec<float> a, Vec<float> b) {
  const __m512i i = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return {_mm512_permutex2var_ps(a.v, i, b.v)};
}
inline Vec<float> odd_lanes(Vec<float> a, Vec<float> b) {
  const __m512i i = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return {_mm512_permutex2var_ps(a.v, i, b.v)};
}
inline Vec<double> even_lanes(Vec<double> a, Vec<double> b) {
  return {_mm512_permutex2var_pd(a.v, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), b.v)};
}
inline Vec<double> odd_lanes(Vec<double> a, Vec<double> b) {
  return {_mm512_permutex2var_pd(a.v, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), b.v)};
}
// even_lanes / odd_lanes undone: the lanes of e and o alternated, e0 o0 e1 o1 .. as two
// vectors (zip_low: the first L values, zip_high: the last L).
inline Vec<float> zip_low(Vec<float> e, Vec<float> o) {
  const __m512i i = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  return {_mm512_permutex2var_ps(e.v, i, o.v)};
}
inline Vec<float> zip_high(Vec<float> e, Vec<float> o) {
  const __m512i i = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  return {_mm512_permutex2var_ps(e.v, i, o.v)};
}
inline Vec<double> zip_low(Vec<double> e, Vec<double> o) {
  return {_mm512_permutex2var_pd(e.v, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), o.v)};
}
inline Vec<double> zip_high(Vec<double> e, Vec<double> o) {
  return {_mm512_permutex2var_pd(e.v, _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15), o.v)};
}

#elif defined(FASTCONV_ISA_AVX2)

constexpr int kVectorRegisters = 16;

template <>
struct Vec<float> {
  static constexpr int lanes = 8;
  __m256 v;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec broadcast(const float* p) { return {_mm256_broadcast_ss(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void stream(float* p) const { _mm256_stream_ps(p, v); }
};
template <>
struct Vec<double> {
  static constexpr int lanes = 4;
  __m256d v;
  static Vec zero() { return {_mm256_setzero_pd()}; }
  static Vec load(const double* p) { return {_mm256_loadu_pd(p)}; }
  static Vec broadcast(const double* p) { return {_mm256_broadcast_sd(p)}; }
  void store(double* p) const { _mm256_storeu_pd(p, v); }
  void stream(double* p) const { _mm256_stream_pd(p, v); }
};
inline Vec<float> fmadd(Vec<float> a, Vec<float> b, Vec<float> c) {
  return {_mm256_fmadd_ps(a.v, b.v, c.v)};
}
inline Vec<double> fmadd(Vec<double> a, Vec<double> b, Vec<double> c) {
  return {_mm256_fmadd_pd(a.v, b.v, c.v)};
}
inline Vec<float> add(Vec<float> a, Vec<float> b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec<double> add(Vec<double> a, Vec<double> b) { return {_mm256_add_pd(a.v, b.v)}; }
inline Vec<float> gather(const float* base, const int32_t* idx) {  // base[idx[i]] per lane
  return {_mm256_i32gather_ps(base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4)};
}
inline Vec<double> gather(const double* base, const int32_t* idx) {
  return {_mm256_i32gather_pd(base, _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx)), 8)};
}
// v[idx[i]] per lane (idx[i] < lanes). Doubles as pairs of floats: lane i takes float
// lanes 2 idx[i] and 2 idx[i] + 1.
inline Vec<float> permute(Vec<float> v, const int32_t* idx) {
  return {_mm256_permutevar8x32_ps(v.v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)))};
}
inline Vec<double> permute(Vec<double> v, const int32_t* idx) {
  const __m256i twice = _mm256_slli_epi64(
      _mm256_cvtepi32_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx))), 1);
  const __m256i pairs = _mm256_or_si256(
      twice, _mm256_slli_epi64(_mm256_add_epi64(twice, _mm256_set1_epi64x(1)), 32));
  return {_mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(v.v), pairs))};
}
inline Vec<float> sub(Vec<float> a, Vec<float> b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec<double> sub(Vec<double> a, Vec<double> b) { return {_mm256_sub_pd(a.v, b.v)}; }
inline Vec<float> mul(Vec<float> a, Vec<float> b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec<double> mul(Vec<double> a, Vec<double> b) { return {_mm256_mul_pd(a.v, b.v)}; }
inline Vec<float> relu(Vec<float> v) { return {_mm256_max_ps(_mm256_setzero_ps(), v.v)}; }
inline Vec<double> relu(Vec<double> v) { return {_mm256_max_pd(_mm256_setzero_pd(), v.v)}; }
inline Vec<float> min_with(float c, Vec<float> v) { return {_mm256_min_ps(_mm256_set1_ps(c), v.v)}; }
inline Vec<double> min_with(double c, Vec<double> v) { return {_mm256_min_pd(_mm256_set1_pd(c), v.v)}; }
inline Vec<float> clamp(Vec<float> lo, Vec<float> hi, Vec<float> v) {
  return {_mm256_min_ps(hi.v, _mm256_max_ps(lo.v, v.v))};
}
inline Vec<double> clamp(Vec<double> lo, Vec<double> hi, Vec<double> v) {
  return {_mm256_min_pd(hi.v, _mm256_max_pd(lo.v, v.v))};
}
inline Vec<float> where_between(Vec<float> a, float lo, float hi, Vec<float> v) {
  const __m256 m = _mm256_and_ps(_mm256_cmp_ps(a.v, _mm256_set1_ps(lo), _CMP_GT_OQ),
                                 _mm256_cmp_ps(a.v, _mm256_set1_ps(hi), _CMP_LT_OQ));
  return {_mm256_and_ps(m, v.v)};
}
inline Vec<double> where_between(Vec<double> a, double lo, double hi, Vec<double> v) {
  const __m256d m = _mm256_and_pd(_mm256_cmp_pd(a.v, _mm256_set1_pd(lo), _CMP_GT_OQ),
                                  _mm256_cmp_pd(a.v, _mm256_set1_pd(hi), _CMP_LT_OQ));
  return {_mm256_and_pd(m, v.v)};
}
// In-lane shuffles pick a0 a2 b0 b2 | a4 a6 b4 b6; the 64-bit permute puts a's pairs first.
inline Vec<float> even_lanes(Vec<float> a, Vec<float> b) {
  const __m256 t = _mm256_shuffle_ps(a.v, b.v, _MM_SHUFFLE(2, 0, 2, 0));
  return {_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), _MM_SHUFFLE(3, 1, 2, 0)))};
}
inline Vec<float> odd_lanes(Vec<float> a, Vec<float> b) {
  const __m256 t = _mm256_shuffle_ps(a.v, b.v, _MM_SHUFFLE(3, 1, 3, 1));
  return {_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), _MM_SHUFFLE(3, 1, 2, 0)))};
}
inline Vec<double> even_lanes(Vec<double> a, Vec<double> b) {
  return {_mm256_permute4x64_pd(_mm256_unpacklo_pd(a.v, b.v), _MM_SHUFFLE(3, 1, 2, 0))};
}
inline Vec<double> odd_lanes(Vec<double> a, Vec<double> b) {
  return {_mm256_permute4x64_pd(_mm256_unpackhi_pd(a.v, b.v), _MM_SHUFFLE(3, 1, 2, 0))};
}
// unpack interleaves within 128-bit halves; permute2f128 puts the halves in order.
inline Vec<float> zip_low(Vec<float> e, Vec<float> o) {
  return {_mm256_permute2f128_ps(_mm256_unpacklo_ps(e.v, o.v), _mm256_unpackhi_ps(e.v, o.v), 0x20)};
}
inline Vec<float> zip_high(Vec<float> e, Vec<float> o) {
  return {_mm256_permute2f128_ps(_mm256_unpacklo_ps(e.v, o.v), _mm256_unpackhi_ps(e.v, o.v), 0x31)};
}
inline Vec<double> zip_low(Vec<double> e, Vec<double> o) {
  return {_mm256_permute2f128_pd(_mm256_unpacklo_pd(e.v, o.v), _mm256_unpackhi_pd(e.v, o.v), 0x20)};
}
inline Vec<double> zip_high(Vec<double> e, Vec<double> o) {
  return {_mm256_permute2f128_pd(_mm256_unpacklo_pd(e.v, o.v), _mm256_unpackhi_pd(e.v, o.v), 0x31)};
}

#else  // scalar: plain C++ on the baseline ISA; the compiler may still use SSE2.

constexpr int kVectorRegisters = 16;

template <typename T>
struct Vec {
  static constexpr int lanes = 4;
  T v[lanes];
  static Vec zero() {
    Vec r;
    for (int i = 0; i < lanes; ++i) r.v[i] = T(0);
    return r;
  }
  static Vec load(const T* p) {
    Vec r;
    for (int i = 0; i < lanes; ++i) r.v[i] = p[i];
    return r;
  }
  static Vec broadcast(const T* p) {
    Vec r;
    for (int i = 0; i < lanes; ++i) r.v[i] = *p;
    return r;
  }
  void store(T* p) const {
    for (int i = 0; i < lanes; ++i) p[i] = v[i];
  }
  void stream(T* p) const { store(p); }
};
template <typename T>
inline Vec<T> fmadd(Vec<T> a, Vec<T> b, Vec<T> c) {
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
  return r;
}
template <typename T>
inline Vec<T> add(Vec<T> a, Vec<T> b) {
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}
template <typename T>
inline Vec<T> gather(const T* base, const int32_t* idx) {  // base[idx[i]] per lane
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) r.v[i] = base[idx[i]];
  return r;
}
template <typename T>
inline Vec<T> permute(Vec<T> v, const int32_t* idx) {  // v[idx[i]] per lane
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) r.v[i] = v.v[idx[i]];
  return r;
}
template <typename T>
inline Vec<T> sub(Vec<T> a, Vec<T> b) {
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) r.v[i] = a.v[i] - b.v[i];
  return r;
}
template <typename T>
inline Vec<T> mul(Vec<T> a, Vec<T> b) {
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) r.v[i] = a.v[i] * b.v[i];
  return r;
}
template <typename T>
inline Vec<T> relu(Vec<T> v) {
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) r.v[i] = v.v[i] < T(0) ? T(0) : v.v[i];  // NaN kept
  return r;
}
template <typename T>
inline Vec<T> clamp(Vec<T> lo, Vec<T> hi, Vec<T> v) {
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) {
    const T m = v.v[i] < lo.v[i] ? lo.v[i] : v.v[i];  // NaN kept: the comparisons are false
    r.v[i] = m > hi.v[i] ? hi.v[i] : m;
  }
  return r;
}
template <typename T>
inline Vec<T> min_with(T c, Vec<T> v) {
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) r.v[i] = v.v[i] > c ? c : v.v[i];  // NaN kept
  return r;
}
template <typename T>
inline Vec<T> where_between(Vec<T> a, T lo, T hi, Vec<T> v) {
  Vec<T> r;
  for (int i = 0; i < Vec<T>::lanes; ++i) r.v[i] = a.v[i] > lo && a.v[i] < hi ? v.v[i] : T(0);
  return r;
}
template <typename T>
inline Vec<T> even_lanes(Vec<T> a, Vec<T> b) {
  constexpr int h = Vec<T>::lanes / 2;
  Vec<T> r;
  for (int i = 0; i < h; ++i) r.v[i] = a.v[2 * i], r.v[h + i] = b.v[2 * i];
  return r;
}
template <typename T>
inline Vec<T> odd_lanes(Vec<T> a, Vec<T> b) {
  constexpr int h = Vec<T>::lanes / 2;
  Vec<T> r;
  for (int i = 0; i < h; ++i) r.v[i] = a.v[2 * i + 1], r.v[h + i] = b.v[2 * i + 1];
  return r;
}
template <typename T>
inline Vec<T> zip_low(Vec<T> e, Vec<T> o) {
  constexpr int h = Vec<T>::lanes / 2;
  Vec<T> r;
  for (int i = 0; i < h; ++i) r.v[2 * i] = e.v[i], r.v[2 * i + 1] = o.v[i];
  return r;
}
template <typename T>
inline Vec<T> zip_high(Vec<T> e, Vec<T> o) {
  constexpr int h = Vec<T>::lanes / 2;
  Vec<T> r;
  for (int i = 0; i < h; ++i) r.v[2 * i] = e.v[h + i], r.v[2 * i + 1] = o.v[h + i];
  return r;
}

#endif

constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Below this much work (FLOPs, or ~4x bytes moved) a parallel region costs more than it saves.
constexpr int64_t kSerialWork = int64_t(1) << 18;
inline int threads_for(int64_t work, int nthreads) {
  return work < kSerialWork ? 1 : (nthreads < 1 ? 1 : nthreads);
}

// Static split of [0, n) over `parts` workers: worker i gets [begin, end).
inline void split_range(int64_t n, int parts, int i, int64_t* begin, int64_t* end) {
  int64_t base = n / parts, extra = n % parts;
  *begin = i * base + min64(i, extra);
  *end = *begin + base + (i < extra ? 1 : 0);
}

// dst[0, n) = src[0, n) and dst[0, n) = 0 for short runs of unknown length (a few dozen
// values): masked vector moves on AVX-512 instead of a scalar loop with a remainder.
template <typename T>
inline void copy_n(T* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
template <typename T>
inline void zero_n(T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T(0);
}
// dst[i] = src[i * stride] for i < n (src[(n-1) * stride] is the last value read).
template <typename T>
inline void copy_strided_n(T* dst, const T* src, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
}
// dst[i * stride] = src[i] for i < n.
template <typename T>
inline void store_strided_n(T* dst, const T* src, int64_t n, int64_t stride) {
  for (int64_t i = 0; i < n; ++i) dst[i * stride] = src[i];
}
#if defined(FASTCONV_ISA_AVX512)
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}
template <>
inline void copy_strided_n<float>(float* dst, const float* src, int64_t n, int64_t stride) {
  if (stride != 2) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
    return;
  }
  // Stride 2: two masked loads and one permute of the even lanes per 16 outputs.
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t r = n - i < 16 ? n - i : 16, span = 2 * (r - 1) + 1;
    const __m512 a = _mm512_maskz_loadu_ps(first_lanes(span), src + 2 * i);
    const __m512 b = _mm512_maskz_loadu_ps(first_lanes(span - 16), src + 2 * i + 16);
    _mm512_mask_storeu_ps(dst + i, first_lanes(r), _mm512_permutex2var_ps(a, even, b));
  }
}
template <>
inline void copy_n<float>(float* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_maskz_loadu_ps(m, src + i));
  }
}
template <>
inline void zero_n<float>(float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_setzero_ps());
  }
}
template <>
inline void store_strided_n<float>(float* dst, const float* src, int64_t n, int64_t stride) {
  if (stride == 1) return copy_n(dst, src, n);
  if (stride != 2) {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = src[i];
    return;
  }
  // Stride 2: each 16 values spread over the even lanes of two vectors, stored masked (the
  // odd lanes belong to the other stride phase).
  const __m512i lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i hi = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t r = n - i < 16 ? n - i : 16, span = 2 * (r - 1) + 1;
    const __m512 v = _mm512_maskz_loadu_ps(first_lanes(r), src + i);
    const __mmask16 even = 0x5555;
    _mm512_mask_storeu_ps(dst + 2 * i, even & first_lanes(span), _mm512_permutexvar_ps(lo, v));
    _mm512_mask_storeu_ps(dst + 2 * i + 16, even & first_lanes(span - 16),
                          _mm512_permutexvar_ps(hi, v));
  }
}
#endif

// The first `valid` values at p as a vector, zeros in the other lanes (`buf`: L values).
template <typename T>
inline Vec<T> load_first(const T* p, int64_t valid, T* buf) {
  if (valid == Vec<T>::lanes) return Vec<T>::load(p);
  zero_n(buf, Vec<T>::lanes);
  copy_n(buf, p, valid);
  return Vec<T>::load(buf);
}
#if defined(FASTCONV_ISA_AVX512)
// A masked load (no store to `buf` and reload: that stalls store forwarding on every call).
template <>
inline Vec<float> load_first<float>(const float* p, int64_t valid, float*) {
  return {_mm512_maskz_loadu_ps(first_lanes(valid), p)};
}
template <>
inline Vec<double> load_first<double>(const double* p, int64_t valid, double*) {
  return {_mm512_maskz_loadu_pd(__mmask8(first_lanes(valid)), p)};
}
#endif

// Asks for [p, p + bytes) to be brought into the cache ahead of use. A thread that computes
// on one block and then reads the next from memory leaves memory idle while it computes
// (one core's demand misses reach a fraction of the copy bandwidth here); prefetching the
// next block in slices while computing on this one overlaps the two.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

// *p where `valid`, else a zero vector, without a branch: a masked load on AVX-512 and AVX2
// (masked-off lanes never fault, so p may point outside the tensor when !valid).
template <typename T>
inline Vec<T> load_or_zero(const T* p, bool valid);
#if defined(FASTCONV_ISA_AVX512)
template <>
inline Vec<float> load_or_zero<float>(const float* p, bool valid) {
  return {_mm512_maskz_loadu_ps(__mmask16(0u - unsigned(valid)), p)};
}
template <>
inline Vec<double> load_or_zero<double>(const double* p, bool valid) {
  return {_mm512_maskz_loadu_pd(__mmask8(0u - unsigned(valid)), p)};
}
#elif defined(FASTCONV_ISA_AVX2)
template <>
inline Vec<float> load_or_zero<float>(const float* p, bool valid) {
  return {_mm256_maskload_ps(p, _mm256_set1_epi32(-int(valid)))};
}
template <>
inline Vec<double> load_or_zero<double>(const double* p, bool valid) {
  return {_mm256_maskload_pd(p, _mm256_set1_epi64x(-int64_t(valid)))};
}
#else
template <typename T>
inline Vec<T> load_or_zero(const T* p, bool valid) {
  return valid ? Vec<T>::load(p) : Vec<T>::zero();
}
#endif

// A set of lanes, lanes [lo, hi) by lane_mask<T>(lo, hi). load_masked: the vector at p with
// only those lanes read (the others zero and not read: p may point partly outside the
// tensor); store_masked writes only those lanes; masked(v, m) zeros the others. Masked moves
// on AVX-512 and AVX2; build the mask once for many of them.
template <typename T>
struct LaneMask;
#if defined(FASTCONV_ISA_AVX512)
template <typename T>
struct LaneMask {
  __mmask16 m;
};
template <typename T>
inline LaneMask<T> lane_mask(int64_t lo, int64_t hi) {
  return {__mmask16(first_lanes(hi) & ~first_lanes(lo))};
}
inline Vec<float> load_masked(const float* p, LaneMask<float> m) {
  return {_mm512_maskz_loadu_ps(m.m, p)};
}
inline Vec<double> load_masked(const double* p, LaneMask<double> m) {
  return {_mm512_maskz_loadu_pd(__mmask8(m.m), p)};
}
inline void store_masked(float* p, Vec<float> v, LaneMask<float> m) {
  _mm512_mask_storeu_ps(p, m.m, v.v);
}
inline void store_masked(double* p, Vec<double> v, LaneMask<double> m) {
  _mm512_mask_storeu_pd(p, __mmask8(m.m), v.v);
}
inline Vec<float> masked(Vec<float> v, LaneMask<float> m) { return {_mm512_maskz_mov_ps(m.m, v.v)}; }
inline Vec<double> masked(Vec<double> v, LaneMask<double> m) {
  return {_mm512_maskz_mov_pd(__mmask8(m.m), v.v)};
}
#elif defined(FASTCONV_ISA_AVX2)
template <typename T>
struct LaneMask {
  __m256i m;
};
template <typename T>
inline LaneMask<T> lane_mask(int64_t lo, int64_t hi) {
  if constexpr (sizeof(T) == 4) {
    const __m256i i = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    lo = max64(lo, 0), hi = min64(hi, 8);
    return {_mm256_and_si256(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(int(lo) - 1)),
                             _mm256_cmpgt_epi32(_mm256_set1_epi32(int(hi)), i))};
  } else {
    const __m256i i = _mm256_setr_epi64x(0, 1, 2, 3);
    return {_mm256_and_si256(_mm256_cmpgt_epi64(i, _mm256_set1_epi64x(lo - 1)),
                             _mm256_cmpgt_epi64(_mm256_set1_epi64x(hi), i))};
  }
}
inline Vec<float> load_masked(const float* p, LaneMask<float> m) {
  return {_mm256_maskload_ps(p, m.m)};
}
inline Vec<double> load_masked(const double* p, LaneMask<double> m) {
  return {_mm256_maskload_pd(p, m.m)};
}
inline void store_masked(float* p, Vec<float> v, LaneMask<float> m) {
  _mm256_maskstore_ps(p, m.m, v.v);
}
inline void store_masked(double* p, Vec<double> v, LaneMask<double> m) {
  _mm256_maskstore_pd(p, m.m, v.v);
}
inline Vec<float> masked(Vec<float> v, LaneMask<float> m) {
  return {_mm256_and_ps(_mm256_castsi256_ps(m.m), v.v)};
}
inline Vec<double> masked(Vec<double> v, LaneMask<double> m) {
  return {_mm256_and_pd(_mm256_castsi256_pd(m.m), v.v)};
}
#else
template <typename T>
struct LaneMask {
  int64_t lo, hi;
};
template <typename T>
inline LaneMask<T> lane_mask(int64_t lo, int64_t hi) {
  return {max64(lo, 0), min64(hi, Vec<T>::lanes)};
}
template <typename T>
inline Vec<T> load_masked(const T* p, LaneMask<T> m) {
  Vec<T> r = Vec<T>::zero();
  for (int64_t i = m.lo; i < m.hi; ++i) r.v[i] = p[i];
  return r;
}
template <typename T>
inline void store_masked(T* p, Vec<T> v, LaneMask<T> m) {
  for (int64_t i = m.lo; i < m.hi; ++i) p[i] = v.v[i];
}
template <typename T>
inline Vec<T> masked(Vec<T> v, LaneMask<T> m) {
  Vec<T> r = Vec<T>::zero();
  for (int64_t i = m.lo; i < m.hi; ++i) r.v[i] = v.v[i];
  return r;
}
#endif

// Pins a loaded vector to a register. A vector that feeds several FMAs is otherwise often
// reloaded by each of them (GCC folds the load into every FMA as a memory operand): in a
// depthwise tile where each input vector feeds 3 FMAs, 2.6 G FMA/s with the folded loads,
// 3.5 with the vector pinned (zmm, Zen 4; peak 3.6).
template <typename T>
inline void keep_in_register(Vec<T>& v) {
#if defined(FASTCONV_ISA_AVX512) || defined(FASTCONV_ISA_AVX2)
  __asm__("" : "+v"(v.v));
#else
  (void)v;
#endif
}

// Forces inlining of register-tile bodies (static_for and the lambdas that touch the
// accumulators). Not in sanitized builds, which check correctness, not speed: forced
// inlining of the instrumented bodies took the depthwise file's sanitized compile from ~2
// minutes to over 13.
#if defined(__SANITIZE_ADDRESS__)
#define FASTCONV_ALWAYS_INLINE
#else
#define FASTCONV_ALWAYS_INLINE __attribute__((always_inline))
#endif

// Calls f(std::integral_constant<int, I>{}) for I = 0 .. N - 1, unrolled by the front end.
// Register tiles index their accumulator arrays with these constants: GCC turns an array
// into registers (scalar replacement) before it unrolls loops, so an array indexed in a
// `#pragma GCC unroll` loop stays in memory, and a loop around it stores every accumulator
// on each trip (the depthwise channels_last tile: 14 stack stores per input row).
template <typename F, int... I>
FASTCONV_ALWAYS_INLINE inline void static_for_each(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
FASTCONV_ALWAYS_INLINE inline void static_for(F&& f) {
  static_for_each(f, std::make_integer_sequence<int, N>{});
}

// Orders the stream() stores before what follows (they are weakly ordered).
inline void stream_fence() {
#if defined(FASTCONV_ISA_AVX512) || defined(FASTCONV_ISA_AVX2)
  _mm_sfence();
#endif
}

// Runs body(thread_index, thread_count) on nthreads OpenMP threads, or inline when one is
// enough: an OpenMP region costs ~0.4 us even with one thread, a third of a tiny conv.
template <typename F>
inline void parallel(int nthreads, F&& body) {
  if (nthreads <= 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(nthreads)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// body(i) for i in [0, n), split statically into contiguous ranges over nthreads threads.
template <typename F>
inline void parallel_for(int64_t n, int nthreads, F&& body) {
  parallel(nthreads, [&](int tid, int nth) {
    int64_t begin, end;
    split_range(n, nth, tid, &begin, &end);
    for (int64_t i = begin; i < end; ++i) body(i);
  });
}

}  // namespace FASTCONV_ISA
}  // namespace fastconv
