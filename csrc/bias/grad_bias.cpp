// Grad-bias: per-channel sums of grad_y, accumulated in double. The same for every
// algorithm (kernel_table.h: SharedKernels::grad_bias); compiled once per ISA.
#include "../common/problem.h"
#include "../common/simd.h"
#include "../common/workspace.h"

namespace fastconv {
namespace FASTCONV_ISA {

namespace {
template <typename T>
double sum_contiguous(const T* p, int64_t n) {
  using V = Vec<T>;
  constexpr int L = V::lanes;
  double total = 0;
  // Vector partial sums over blocks of 1024 values, each block folded into the double total.
  for (int64_t i0 = 0; i0 < n; i0 += 1024) {
    const int64_t i1 = min64(n, i0 + 1024);
    V acc = V::zero();
    int64_t i = i0;
    for (; i + L <= i1; i += L) acc = add(acc, V::load(p + i));
    alignas(64) T lanes[L];
    acc.store(lanes);
    for (int l = 0; l < L; ++l) total += lanes[l];
    for (; i < i1; ++i) total += p[i];
  }
  return total;
}
}  // namespace

template <typename T>
void grad_bias(const ConvGeom& g, const T* gy, int gy_layout, T* gb, int nthreads) {
  const int64_t OHW = g.OH * g.OW, K = g.K, P = g.N * OHW;
  const int nt = threads_for(P * K * 64, nthreads);
  if (gy_layout == kNCHW) {
    parallel_for(K, nt, [&](int64_t k) {
      double s = 0;
      for (int64_t n = 0; n < g.N; ++n) s += sum_contiguous(gy + (n * K + k) * OHW, OHW);
      gb[k] = T(s);
    });
    return;
  }
  // NHWC: each thread sums a range of pixels into its own row of doubles, then rows are added.
  double* part = workspace_as<double>(kWsAccumulators, int64_t(nt) * K);
  for (int64_t i = 0; i < int64_t(nt) * K; ++i) part[i] = 0;
  parallel(nt, [&](int tid, int nth) {
    int64_t p0, p1;
    split_range(P, nth, tid, &p0, &p1);
    double* acc = part + tid * K;
    for (int64_t p = p0; p < p1; ++p) {
      const T* row = gy + p * K;
      for (int64_t k = 0; k < K; ++k) acc[k] += row[k];
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    double s = 0;
    for (int i = 0; i < nt; ++i) s += part[i * K + k];
    gb[k] = T(s);
  }
}

template void grad_bias<float>(const ConvGeom&, const float*, int, float*, int);
template void grad_bias<double>(const ConvGeom&, const double*, int, double*, int);

}  // namespace FASTCONV_ISA
}  // namespace fastconv
