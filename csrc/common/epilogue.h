// A forward's output epilogue: what every algorithm applies to each output value while it
// is still in registers (or in the cache block just written), so fused layers cost no extra
// pass over the output. For output value v of channel k:
//
//   z = v * scale[k] + shift[k]          (null scale / shift: 1 / 0; shift is the bias)
//   stats: sum[k] += z, sumsq[k] += z^2  (optional; batch-norm's batch statistics)
//   y = act(z)                           (none, relu = max(0, z), relu6 = min(6, max(0, z)))
//
// The activations keep NaN, as torch's do. Statistics are accumulated in float64, per
// thread (ChannelStats), and summed over the threads by the caller once the kernel is done.
#pragma once
#include <cstdint>

#if defined(FASTCONV_ISA_AVX512) || defined(FASTCONV_ISA_AVX2) || defined(FASTCONV_ISA_SCALAR)
#include "simd.h"  // an ISA translation unit: FASTCONV_ISA names its namespace
#endif

namespace fastconv {

enum Activation : int { kActNone = 0, kActRelu = 1, kActRelu6 = 2 };

// Per-thread float64 sums of z and z^2 per channel: thread t's sums of channel k at
// sum[t * thread_stride + k], its sums of squares at sum[t * thread_stride + sq_offset + k].
// `threads` slabs: kernels number their threads below that; a kernel run inline inside
// someone else's parallel region (its one thread numbered by that region) uses slab 0.
struct ChannelStats {
  double* sum = nullptr;
  int64_t sq_offset = 0;
  int64_t thread_stride = 0;
  int threads = 1;
};

template <typename T>
struct Epilogue {
  const T* scale = nullptr;
  const T* shift = nullptr;
  bool per_row = true;  // GEMM only: a channel is a row of C (else a column)
  int act = kActNone;
  ChannelStats stats;   // stats.sum null: none
  bool active() const { return scale || shift || act != kActNone || stats.sum; }
  // The same epilogue for channels numbered from `first` on (a group's channels).
  Epilogue from_channel(int64_t first) const {
    Epilogue e = *this;
    if (e.scale) e.scale += first;
    if (e.shift) e.shift += first;
    if (e.stats.sum) e.stats.sum += first;
    return e;
  }
};

template <typename T>
inline T activate(T v, int act) {
  if (act == kActNone) return v;
  v = v < T(0) ? T(0) : v;  // NaN kept: the comparison is false
  return act == kActRelu6 && v > T(6) ? T(6) : v;
}

#if defined(FASTCONV_ISA)  // vector helpers, for the ISA translation units (simd.h)
namespace FASTCONV_ISA {

using fastconv::activate;

template <typename T>
inline Vec<T> activate(Vec<T> v, int act) {
  if (act == kActNone) return v;
  v = relu(v);
  if (act == kActRelu6) v = min_with(T(6), v);
  return v;
}

// An activation as the bounds of a clamp, for register tiles too large to branch per vector
// (a switch per accumulator made GCC keep a 13-vector tile on the stack).
template <typename T>
struct ActivationBounds {
  Vec<T> lo, hi;
  explicit ActivationBounds(int act) {
    const T inf = T(__builtin_inf()), minus_inf = -inf, zero = T(0), six = T(6);
    lo = Vec<T>::broadcast(act == kActNone ? &minus_inf : &zero);
    hi = Vec<T>::broadcast(act == kActRelu6 ? &six : &inf);
  }  // activate(v, act) == clamp(lo, hi, v)
};

template <typename T>
inline T hsum(Vec<T> v) {
  alignas(64) T buf[Vec<T>::lanes];
  v.store(buf);
  T s = T(0);
  for (int l = 0; l < Vec<T>::lanes; ++l) s += buf[l];
  return s;
}

// The calling thread's slab.
inline double* thread_stats(const ChannelStats& st) {
  const int tid = omp_get_thread_num();
  return st.sum + int64_t(tid < st.threads ? tid : 0) * st.thread_stride;
}

// Adds partial sums (s, q) of z and z^2 to channel k of the calling thread's statistics.
inline void add_stats(const ChannelStats& st, int64_t k, double s, double q) {
  double* mine = thread_stats(st);
  mine[k] += s;
  mine[st.sq_offset + k] += q;
}

// Channels [k, k + n) of the calling thread's statistics += the lanes of (s, q).
template <typename T>
inline void add_stats(const ChannelStats& st, int64_t k, Vec<T> s, Vec<T> q, int64_t n) {
  alignas(64) T bs[Vec<T>::lanes], bq[Vec<T>::lanes];
  s.store(bs);
  q.store(bq);
  double* mine = thread_stats(st);
  for (int64_t l = 0; l < n; ++l) {
    mine[k + l] += bs[l];
    mine[st.sq_offset + k + l] += bq[l];
  }
}

// The epilogue of `n` contiguous output values of one channel k, in place (y = act(v + shift),
// statistics of v + shift). Kernels whose stores are scalar anyway call this on what they just
// wrote; the values are in L1.
template <typename T>
inline void finish_channel_run(const Epilogue<T>& epi, int64_t k, T* y, int64_t n) {
  const T shift = epi.shift ? epi.shift[k] : T(0), scale = epi.scale ? epi.scale[k] : T(1);
  double s = 0, q = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T z = y[i] * scale + shift;
    s += z;
    q += double(z) * z;
    y[i] = activate(z, epi.act);
  }
  if (epi.stats.sum) add_stats(epi.stats, k, s, q);
}

// The epilogue of channels [k0, k0 + n) of one output pixel, in place.
template <typename T>
inline void finish_pixel_run(const Epilogue<T>& epi, int64_t k0, T* y, int64_t n) {
  double* mine = epi.stats.sum ? thread_stats(epi.stats) : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = k0 + i;
    const T z = y[i] * (epi.scale ? epi.scale[k] : T(1)) + (epi.shift ? epi.shift[k] : T(0));
    if (mine) {
      mine[k] += z;
      mine[epi.stats.sq_offset + k] += double(z) * z;
    }
    y[i] = activate(z, epi.act);
  }
}

}  // namespace FASTCONV_ISA
#endif

}  // namespace fastconv
