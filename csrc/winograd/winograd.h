// Winograd F(m, 3) transform matrices (Lavin & Gray 2015; ../shared/notes §3): input BT
// (a x a), filter G (a x 3), output AT (m x a), a = m + 2. F(6, 3) uses the well-conditioned
// points 0, +-1, +-2, +-1/2, inf in NNPACK's scaling. Plain constexpr data, shared by the
// kernels (which expand them at compile time) and the bindings (which hand them to tests).
#pragma once

namespace fastconv {

template <int R, int C>
struct ConstMatrix {
  static constexpr int rows = R, cols = C;
  double v[R][C];
  // The first column of row i that is not zero (C if none).
  constexpr int first_nonzero(int i) const {
    for (int j = 0; j < C; ++j)
      if (v[i][j] != 0) return j;
    return C;
  }
};

template <int R, int C>
constexpr ConstMatrix<C, R> transposed(const ConstMatrix<R, C>& m) {
  ConstMatrix<C, R> t{};
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) t.v[j][i] = m.v[i][j];
  return t;
}

template <int M>
struct WinogradMatrices;

template <>
struct WinogradMatrices<2> {  // points 0, 1, -1, inf
  static constexpr ConstMatrix<4, 4> BT{{{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, -1, 0, 1}}};
  static constexpr ConstMatrix<4, 3> G{{{1, 0, 0}, {.5, .5, .5}, {.5, -.5, .5}, {0, 0, 1}}};
  static constexpr ConstMatrix<2, 4> AT{{{1, 1, 1, 0}, {0, 1, -1, 1}}};
};

template <>
struct WinogradMatrices<4> {  // points 0, +-1, +-2, inf
  static constexpr ConstMatrix<6, 6> BT{{{4, 0, -5, 0, 1, 0},
                                         {0, -4, -4, 1, 1, 0},
                                         {0, 4, -4, -1, 1, 0},
                                         {0, -2, -1, 2, 1, 0},
                                         {0, 2, -1, -2, 1, 0},
                                         {0, 4, 0, -5, 0, 1}}};
  static constexpr ConstMatrix<6, 3> G{{{1. / 4, 0, 0},
                                        {-1. / 6, -1. / 6, -1. / 6},
                                        {-1. / 6, 1. / 6, -1. / 6},
                                        {1. / 24, 1. / 12, 1. / 6},
                                        {1. / 24, -1. / 12, 1. / 6},
                                        {0, 0, 1}}};
  static constexpr ConstMatrix<4, 6> AT{{{1, 1, 1, 1, 1, 0},
                                         {0, 1, -1, 2, -2, 0},
                                         {0, 1, 1, 4, 4, 0},
                                         {0, 1, -1, 8, -8, 1}}};
};

template <>
struct WinogradMatrices<6> {  // points 0, +-1, +-2, +-1/2, inf (NNPACK's scaling)
  static constexpr ConstMatrix<8, 8> BT{{{1, 0, -5.25, 0, 5.25, 0, -1, 0},
                                         {0, 1, 1, -4.25, -4.25, 1, 1, 0},
                                         {0, -1, 1, 4.25, -4.25, -1, 1, 0},
                                         {0, .5, .25, -2.5, -1.25, 2, 1, 0},
                                         {0, -.5, .25, 2.5, -1.25, -2, 1, 0},
                                         {0, 2, 4, -2.5, -5, .5, 1, 0},
                                         {0, -2, 4, 2.5, -5, -.5, 1, 0},
                                         {0, -1, 0, 5.25, 0, -5.25, 0, 1}}};
  static constexpr ConstMatrix<8, 3> G{{{1, 0, 0},
                                        {-2. / 9, -2. / 9, -2. / 9},
                                        {-2. / 9, 2. / 9, -2. / 9},
                                        {1. / 90, 1. / 45, 2. / 45},
                                        {1. / 90, -1. / 45, 2. / 45},
                                        {1. / 45, 1. / 90, 1. / 180},
                                        {1. / 45, -1. / 90, 1. / 180},
                                        {0, 0, 1}}};
  static constexpr ConstMatrix<6, 8> AT{{{1, 1, 1, 1, 1, 32, 32, 0},
                                         {0, 1, -1, 2, -2, 16, -16, 0},
                                         {0, 1, 1, 4, 4, 8, 8, 0},
                                         {0, 1, -1, 8, -8, 4, -4, 0},
                                         {0, 1, 1, 16, 16, 2, 2, 0},
                                         {0, 1, -1, 32, -32, 1, -1, 1}}};
};

// The same algorithm run backwards for the weight gradient. Y = AT [(G g GT) . (BT d B)] A
// is bilinear, so for one tile dL/dg = GT [(A dY AT) . (BT d B)] G: grad_y tiles are
// transformed by A = AT^T (m x m -> a x a), inputs by BT as in the forward, and the
// products summed over tiles go back to 3 x 3 through GT = G^T (a x a -> 3 x 3).
template <int M>
struct WinogradGradMatrices {
  static constexpr auto A = transposed(WinogradMatrices<M>::AT);
  static constexpr auto GT = transposed(WinogradMatrices<M>::G);
};

}  // namespace fastconv
