// Float64 Gram matrices of float32/float64 matrices and their leading eigenpairs: the exact
// "short side" route to top singular triplets. Float64 matters: a float32 Gram squares the
// condition number into float32 precision (measured: polar error ~5e-2 on real spectra;
// docs/ALGORITHMS.md section 10).
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/route_log.hpp"
#include "backend.hpp"
#include "spectral.hpp"

namespace isofast {

// A^T A (cols x cols) when of_columns, else A A^T (rows x rows); A is column-major with
// leading dimension lda. Converted to float64 in blocks so the extra memory stays small.
template <class T>
Matrix<double> gram64(const T* a, int rows, int cols, int lda, bool of_columns) {
  Backend<double>& be = cpu_backend<double>();
  constexpr int kBlock = 256;
  const int n = of_columns ? cols : rows;
  Matrix<double> g(n, n);
  if (of_columns) {
    Matrix<double> block(std::min(kBlock, std::max(rows, 1)), cols);
    for (int i0 = 0; i0 < rows; i0 += kBlock) {
      const int b = std::min(kBlock, rows - i0);
      for (int j = 0; j < cols; ++j)
        for (int i = 0; i < b; ++i)
          block.data[i + static_cast<size_t>(j) * block.rows] =
              a[i0 + i + static_cast<size_t>(j) * lda];
      be.syrk(true, n, b, 1.0, block.ptr(), block.ld(), i0 == 0 ? 0.0 : 1.0, g.ptr(), g.ld());
    }
  } else {
    Matrix<double> block(rows, std::min(kBlock, std::max(cols, 1)));
    for (int j0 = 0; j0 < cols; j0 += kBlock) {
      const int b = std::min(kBlock, cols - j0);
      for (int j = 0; j < b; ++j)
        for (int i = 0; i < rows; ++i)
          block.data[i + static_cast<size_t>(j) * rows] = a[i + static_cast<size_t>(j0 + j) * lda];
      be.syrk(false, n, b, 1.0, block.ptr(), block.ld(), j0 == 0 ? 0.0 : 1.0, g.ptr(), g.ld());
    }
  }
  return g;
}

// Leading `count` eigenpairs of a symmetric float64 matrix, as singular values
// (sqrt of the clamped eigenvalues, descending) and vectors cast to T.
template <class T>
struct TopSingular {
  std::vector<T> sigma;
  Matrix<T> vectors;  // n x count
};

template <class T>
TopSingular<T> top_singular_from_gram(Matrix<double> g, int count) {
  const int n = g.rows;
  count = std::min(count, n);
  TopSingular<T> out{std::vector<T>(static_cast<size_t>(count)), Matrix<T>(n, count)};
  if (count <= 0) return out;
  Matrix<double> z(n, count);
  std::vector<double> w(static_cast<size_t>(count));
  cpu_backend<double>().eigh_top(n, g.ptr(), g.ld(), count, w.data(), z.ptr(), z.ld());
  for (int j = 0; j < count; ++j) out.sigma[j] = static_cast<T>(std::sqrt(std::max(w[j], 0.0)));
  std::transform(z.data.begin(), z.data.end(), out.vectors.data.begin(),
                 [](double v) { return static_cast<T>(v); });
  return out;
}

}  // namespace isofast

namespace isofast {

// Polar factor of a matrix whose columns are nearly orthonormal (concatenated singular-vector
// factors): A (A^T A)^{-1/2} with the inverse square root from a float64 Gram. Exact up to
// cond(A)^2 * 1e-16; when the columns are close to collinear (cond(A) > 1e3) or A is wide,
// it falls back to the SVD route, which is well defined there too.
// polar(a) by a float64 SVD whatever T is: the fallback for ill-conditioned factors, where a
// float32 SVD loses about cond * eps32 (measured: Iso-CTS on ViT-B/32 qkv keys at T = 20,
// V_cat with cond 8e5, 7e-2 from the float64 result against 1e-3 through float64).
template <class T>
Matrix<T> polar_float64(const Matrix<T>& a) {
  Matrix<double> a64(a.rows, a.cols);
  std::transform(a.data.begin(), a.data.end(), a64.data.begin(),
                 [](T v) { return static_cast<double>(v); });
  Matrix<double> p64 = polar(cpu_backend<double>(), a64);
  Matrix<T> out(a.rows, a.cols);
  std::transform(p64.data.begin(), p64.data.end(), out.data.begin(),
                 [](double v) { return static_cast<T>(v); });
  return out;
}

template <class T>
Matrix<T> polar_of_factor(Backend<T>& be, const Matrix<T>& a) {
  const int r = a.cols;
  if (r == 0) return polar(be, a);
  if (r > a.rows) {
    note_route("polar of a wide factor: float64 SVD");
    return polar_float64(a);
  }
  Matrix<double> g = gram64(a.ptr(), a.rows, r, a.ld(), true);
  Matrix<double> z(r, r);
  std::vector<double> w(static_cast<size_t>(r));
  cpu_backend<double>().eigh_top(r, g.ptr(), g.ld(), r, w.data(), z.ptr(), z.ld());
  if (!(w[r - 1] > 1e-6 * w[0])) {
    note_route("polar of an ill-conditioned factor (cond > 1e3): float64 SVD");
    return polar_float64(a);
  }
  Matrix<double> scaled = z;
  for (int j = 0; j < r; ++j) {
    const double f = 1.0 / std::sqrt(w[j]);
    for (int i = 0; i < r; ++i) scaled.col(j)[i] *= f;
  }
  Matrix<double> inv_sqrt(r, r);  // Z diag(w^-1/2) Z^T
  cpu_backend<double>().gemm(false, true, r, r, r, 1.0, scaled.ptr(), r, z.ptr(), r, 0.0,
                             inv_sqrt.ptr(), r);
  Matrix<T> factor(r, r);
  std::transform(inv_sqrt.data.begin(), inv_sqrt.data.end(), factor.data.begin(),
                 [](double v) { return static_cast<T>(v); });
  Matrix<T> out(a.rows, r);
  be.gemm(false, false, a.rows, r, r, T(1), a.ptr(), a.ld(), factor.ptr(), r, T(0), out.ptr(),
          out.ld());
  return out;
}

}  // namespace isofast
