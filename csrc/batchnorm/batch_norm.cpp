// Batch normalisation of a convolution's output z (N x K x OH x OW, NCHW or NHWC) with batch
// statistics, and the activation after it: the two light passes of the fused
// Conv-BN-activation op in training (fastconv.ops.conv2d_bn). The statistics themselves come
// from the convolution's output epilogue (csrc/common/epilogue.h), so the forward reads z
// once. Compiled once per ISA; shared by every algorithm (kernel_table.h: SharedKernels).
//
//   forward:   y = act(zhat * gamma[k] + beta[k]),   zhat = (z - mean[k]) * invstd[k]
//   backward:  g = grad_y * act'(y)                   (relu: y > 0; relu6: 0 < y < 6)
//              grad_beta[k] = sum g,  grad_gamma[k] = sum g * zhat      (float64 sums)
//              grad_z = gamma[k] * invstd[k] * (g - grad_beta[k] / M - zhat * grad_gamma[k] / M)
//
// with M = N * OH * OW, gamma / beta null meaning 1 / 0 (affine=False).
#include <limits>
#include <vector>

#include "../common/epilogue.h"
#include "../common/problem.h"
#include "../common/simd.h"
#include "../common/workspace.h"

namespace fastconv {
namespace FASTCONV_ISA {

namespace {

// g = gy * act'(y), as a vector.
template <typename T>
inline Vec<T> activation_grad(Vec<T> gy, Vec<T> y, int act) {
  if (act == kActNone) return gy;
  const T hi = act == kActRelu6 ? T(6) : std::numeric_limits<T>::infinity();
  return where_between(y, T(0), hi, gy);
}
template <typename T>
inline T activation_grad(T gy, T y, int act) {
  if (act == kActNone) return gy;
  const T hi = act == kActRelu6 ? T(6) : std::numeric_limits<T>::infinity();
  return y > T(0) && y < hi ? gy : T(0);
}

// The two sums of the backward over n values of one channel run: s += g, q += g * (z - mean).
template <typename T>
void backward_sums(const T* gy, const T* y, const T* z, int64_t n, T mean, int act, double* s,
                   double* q) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  const V vm = V::broadcast(&mean);
  // Vector partial sums over blocks of 1024 values, each block folded into the doubles.
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    const int64_t i1 = min64(n, i0 + 1024);
    V vs = V::zero(), vq = V::zero();
    int64_t i = i0;
    for (; i + L <= i1; i += L) {
      const V g = activation_grad(V::load(gy + i), V::load(y + i), act);
      vs = add(vs, g);
      vq = fmadd(g, sub(V::load(z + i), vm), vq);
    }
    *s += hsum(vs);
    *q += hsum(vq);
    for (; i < i1; ++i) {
      const T g = activation_grad(gy[i], y[i], act);
      *s += g;
      *q += double(g) * (z[i] - mean);
    }
  }
}

}  // namespace

template <typename T>
void bn_act_forward(const ConvGeom& g, int layout, const T* z, const T* mean, const T* invstd,
                    const T* gamma, const T* beta, int act, T* y, int nthreads) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  const int64_t K = g.K, OHW = g.OH * g.OW, P = g.N * OHW;
  std::vector<T> a(K), b(K);
  for (int64_t k = 0; k < K; ++k) {
    a[k] = invstd[k] * (gamma ? gamma[k] : T(1));
    b[k] = (beta ? beta[k] : T(0)) - mean[k] * a[k];
  }
  const int nt = threads_for(P * K * 4, nthreads);
  if (layout == kNCHW) {
    parallel_for(g.N * K, nt, [&](int64_t plane) {
      const int64_t k = plane % K;
      const T* zp = z + plane * OHW;
      T* yp = y + plane * OHW;
      const V va = V::broadcast(&a[k]), vb = V::broadcast(&b[k]);
      int64_t i = 0;
      for (; i + L <= OHW; i += L) activate(fmadd(V::load(zp + i), va, vb), act).store(yp + i);
      for (; i < OHW; ++i) yp[i] = activate(zp[i] * a[k] + b[k], act);
    });
    return;
  }
  parallel_for(P, nt, [&](int64_t p) {
    const T* zp = z + p * K;
    T* yp = y + p * K;
    int64_t k = 0;
    for (; k + L <= K; k += L)
      activate(fmadd(V::load(zp + k), V::load(&a[k]), V::load(&b[k])), act).store(yp + k);
    for (; k < K; ++k) yp[k] = activate(zp[k] * a[k] + b[k], act);
  });
}

template <typename T>
void bn_act_backward(const ConvGeom& g, int layout, const T* gy, const T* y, const T* z,
                     const T* mean, const T* invstd, const T* gamma, int act, T* gz,
                     T* grad_gamma, T* grad_beta, int nthreads) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  const int64_t K = g.K, OHW = g.OH * g.OW, P = g.N * OHW;
  const int nt = threads_for(P * K * 8, nthreads);
  // Pass 1: sum g and sum g * (z - mean) per channel.
  std::vector<double> sg(K, 0.0), sgz(K, 0.0);
  if (layout == kNCHW) {
    parallel_for(K, nt, [&](int64_t k) {
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t off = (n * K + k) * OHW;
        backward_sums(gy + off, y + off, z + off, OHW, mean[k], act, &sg[k], &sgz[k]);
      }
    });
  } else {
    // Each thread sums a range of pixels into its own rows, which are added afterwards.
    std::vector<double> part(int64_t(nt) * 2 * K, 0.0);
    parallel(nt, [&](int tid, int nth) {
      int64_t p0, p1;
      split_range(P, nth, tid, &p0, &p1);
      double* ps = part.data() + int64_t(tid) * 2 * K;
      double* pq = ps + K;
      for (int64_t p = p0; p < p1; ++p) {
        const T *gp = gy + p * K, *yp = y + p * K, *zp = z + p * K;
        for (int64_t k = 0; k < K; ++k) {
          const T gv = activation_grad(gp[k], yp[k], act);
          ps[k] += gv;
          pq[k] += double(gv) * (zp[k] - mean[k]);
        }
      }
    });
    for (int t = 0; t < nt; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        sg[k] += part[t * 2 * K + k];
        sgz[k] += part[t * 2 * K + K + k];
      }
    }
  }
  // g_z = c1 * g + c2 * (z - mean) + c3 per channel.
  std::vector<T> c1(K), c2(K), c3(K), mk(mean, mean + K);
  for (int64_t k = 0; k < K; ++k) {
    const double is = invstd[k], gm = gamma ? gamma[k] : T(1);
    if (grad_beta) grad_beta[k] = T(sg[k]);
    if (grad_gamma) grad_gamma[k] = T(sgz[k] * is);
    c1[k] = T(gm * is);
    c2[k] = T(-gm * is * is * is * sgz[k] / double(P));
    c3[k] = T(-gm * is * sg[k] / double(P));
  }
  // Pass 2.
  if (layout == kNCHW) {
    parallel_for(g.N * K, nt, [&](int64_t plane) {
      const int64_t k = plane % K, off = plane * OHW;
      const V v1 = V::broadcast(&c1[k]), v2 = V::broadcast(&c2[k]), v3 = V::broadcast(&c3[k]);
      const V vm = V::broadcast(&mk[k]);
      int64_t i = 0;
      for (; i + L <= OHW; i += L) {
        const V gv = activation_grad(V::load(gy + off + i), V::load(y + off + i), act);
        fmadd(v1, gv, fmadd(v2, sub(V::load(z + off + i), vm), v3)).store(gz + off + i);
      }
      for (; i < OHW; ++i)
        gz[off + i] = c1[k] * activation_grad(gy[off + i], y[off + i], act) +
                      c2[k] * (z[off + i] - mk[k]) + c3[k];
    });
    return;
  }
  parallel_for(P, nt, [&](int64_t p) {
    const int64_t off = p * K;
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      const V gv = activation_grad(V::load(gy + off + k), V::load(y + off + k), act);
      const V zc = sub(V::load(z + off + k), V::load(&mk[k]));
      fmadd(V::load(&c1[k]), gv, fmadd(V::load(&c2[k]), zc, V::load(&c3[k])))
          .store(gz + off + k);
    }
    for (; k < K; ++k)
      gz[off + k] = c1[k] * activation_grad(gy[off + k], y[off + k], act) +
                    c2[k] * (z[off + k] - mk[k]) + c3[k];
  });
}

#define FASTCONV_INSTANTIATE(T)                                                             \
  template void bn_act_forward<T>(const ConvGeom&, int, const T*, const T*, const T*,      \
                                  const T*, const T*, int, T*, int);                       \
  template void bn_act_backward<T>(const ConvGeom&, int, const T*, const T*, const T*,     \
                                   const T*, const T*, const T*, int, T*, T*, T*, int);
FASTCONV_INSTANTIATE(float)
FASTCONV_INSTANTIATE(double)
#undef FASTCONV_INSTANTIATE

}  // namespace FASTCONV_ISA
}  // namespace fastconv
