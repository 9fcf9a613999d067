// Float64 Gram matrices of float32/float64 matrices and their leading eigenpairs: the exact
// "short side" route to top singular triplets, and the float64 steps around it. Float64
// matters: a float32 Gram squares the condition number into float32 precision (measured:
// polar error ~5e-2 on real spectra; docs/ALGORITHMS.md). Every function runs on the float64
// twin of the caller's backend (be.f64()), on the caller's device.
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/route_log.hpp"
#include "backend.hpp"
#include "spectral.hpp"

namespace isofast {

// Blocks of this many rows or columns are converted to float64 at a time, so the extra memory
// of a float64 step stays small next to the matrix itself.
constexpr int kFloat64Block = 256;

// A^T A (cols x cols) when of_columns, else A A^T (rows x rows), in float64.
template <class T>
Matrix<double> gram64(Backend<T>& be, const T* a, int rows, int cols, int lda, bool of_columns) {
  Backend<double>& be64 = be.f64();
  const int n = of_columns ? cols : rows;
  Matrix<double> g = be64.zeros(n, n);
  if (of_columns) {  // row blocks: gather b x cols
    Matrix<double> block = be64.matrix(std::min(kFloat64Block, std::max(rows, 1)), cols);
    for (int i0 = 0; i0 < rows; i0 += kFloat64Block) {
      const int b = std::min(kFloat64Block, rows - i0);
      be.to_f64(b, cols, a + i0, lda, block.ptr(), block.ld());
      be64.syrk(true, n, b, 1.0, block.ptr(), block.ld(), 1.0, g.ptr(), g.ld());
    }
  } else {  // column blocks: contiguous
    Matrix<double> block = be64.matrix(rows, std::min(kFloat64Block, std::max(cols, 1)));
    for (int j0 = 0; j0 < cols; j0 += kFloat64Block) {
      const int b = std::min(kFloat64Block, cols - j0);
      be.to_f64(rows, b, a + static_cast<size_t>(j0) * lda, lda, block.ptr(), block.ld());
      be64.syrk(false, n, b, 1.0, block.ptr(), block.ld(), 1.0, g.ptr(), g.ld());
    }
  }
  return g;
}

// Leading `count` eigenpairs of a symmetric float64 matrix (destroyed), as singular values
// (sqrt of the clamped eigenvalues, descending, host) and their float64 vectors.
struct TopSingular {
  std::vector<double> eig;    // eigenvalues
  std::vector<double> sigma;  // sqrt(max(eig, 0))
  Matrix<double> vectors;     // n x count
  int count() const { return static_cast<int>(sigma.size()); }
};

inline TopSingular top_singular(Backend<double>& be64, Matrix<double> g, int count) {
  const int n = g.rows();
  count = std::max(0, std::min(count, n));
  TopSingular out;
  out.vectors = be64.matrix(n, count);
  if (count == 0) return out;
  Matrix<double> w = be64.matrix(count, 1);
  be64.eigh_top(n, g.ptr(), g.ld(), count, w.ptr(), out.vectors.ptr(), out.vectors.ld());
  out.eig = be64.to_host(w.ptr(), static_cast<size_t>(count));
  for (double e : out.eig) out.sigma.push_back(std::sqrt(std::max(e, 0.0)));
  return out;
}

// A float64 matrix rounded to T (a copy; for T = double the same values).
template <class T>
Matrix<T> rounded(Backend<T>& be, const Matrix<double>& a) {
  Matrix<T> out = be.matrix(a.rows(), a.cols());
  be.from_f64(a.rows(), a.cols(), a.ptr(), a.ld(), out.ptr(), out.ld());
  return out;
}

template <class T>
Matrix<double> widened(Backend<T>& be, const Matrix<T>& a) {
  Matrix<double> out = be.f64().matrix(a.rows(), a.cols());
  be.to_f64(a.rows(), a.cols(), a.ptr(), a.ld(), out.ptr(), out.ld());
  return out;
}

template <class T>
std::vector<T> rounded(const std::vector<double>& v, int count) {
  return std::vector<T>(v.begin(), v.begin() + count);
}

// op(X) W S^-1 for the n x m X (leading dimension ldx; op(X) = X^T when transposed: m x k,
// else X: n x k) and W, S from the float64 eigensolver (unrounded), in float64 blocks, rounded
// once to Out. Singular vectors formed this way divide by small singular values; in float32
// that costs eps32 * sigma_max / sigma_j in column j, and a basis that far from orthonormal
// leaks the common subspace into every task block (Iso-CTS on a 512 x 192 key of cond 1e5:
// 0.26 from float64, against 1.4e-3 for the float32 reference loop).
template <class Out, class T>
Matrix<Out> vectors_f64(Backend<T>& be, Backend<Out>& out_be, const T* x, int n, int m, int ldx,
                        bool transposed, const Matrix<double>& w,
                        const std::vector<double>& sigma) {
  Backend<double>& be64 = be.f64();
  const int k = w.cols();
  Matrix<double> in = be64.matrix(n, std::min(kFloat64Block, std::max(m, 1)));
  Matrix<double> res = be64.matrix(transposed ? m : n, k);
  for (int j0 = 0; j0 < m; j0 += kFloat64Block) {  // column blocks of X are contiguous
    const int b = std::min(kFloat64Block, m - j0);
    be.to_f64(n, b, x + static_cast<size_t>(j0) * ldx, ldx, in.ptr(), in.ld());
    if (transposed)  // rows j0.. of X^T W
      be64.gemm(true, false, b, k, n, 1.0, in.ptr(), in.ld(), w.ptr(), w.ld(), 0.0,
                res.ptr() + j0, res.ld());
    else  // X W accumulated over the blocks of X's columns and W's rows
      be64.gemm(false, false, n, k, b, 1.0, in.ptr(), in.ld(), w.ptr() + j0, w.ld(),
                j0 == 0 ? 0.0 : 1.0, res.ptr(), res.ld());
  }
  be64.scale_columns(res.rows(), k, res.ptr(), res.ld(), sigma, true);
  return rounded(out_be, res);
}

// out = scale * X W (left = false: W is cols x cols) or scale * W X (left: W is rows x rows),
// X rows x cols in T, W float64, computed in float64 blocks. Keeping W in float64 matters: it
// holds 1/sigma_min, so rounding it to float32 would cost cond * eps32.
template <class T>
void apply_f64(Backend<T>& be, const Matrix<T>& x, const Matrix<double>& w, bool left,
               double scale, T* out, int ldo) {
  Backend<double>& be64 = be.f64();
  const int rows = x.rows(), cols = x.cols();
  if (left) {  // column blocks of X
    Matrix<double> in = be64.matrix(rows, std::min(kFloat64Block, std::max(cols, 1)));
    Matrix<double> res = be64.matrix(rows, in.cols());
    for (int j0 = 0; j0 < cols; j0 += kFloat64Block) {
      const int b = std::min(kFloat64Block, cols - j0);
      be.to_f64(rows, b, x.col(j0), x.ld(), in.ptr(), in.ld());
      be64.gemm(false, false, rows, b, rows, scale, w.ptr(), w.ld(), in.ptr(), in.ld(), 0.0,
                res.ptr(), res.ld());
      be.from_f64(rows, b, res.ptr(), res.ld(), out + static_cast<size_t>(j0) * ldo, ldo);
    }
    return;
  }
  Matrix<double> in = be64.matrix(std::min(kFloat64Block, std::max(rows, 1)), cols);
  Matrix<double> res = be64.matrix(in.rows(), cols);
  for (int i0 = 0; i0 < rows; i0 += kFloat64Block) {  // row blocks, gathered
    const int b = std::min(kFloat64Block, rows - i0);
    be.to_f64(b, cols, x.ptr() + i0, x.ld(), in.ptr(), in.ld());
    be64.gemm(false, false, b, cols, cols, scale, in.ptr(), in.ld(), w.ptr(), w.ld(), 0.0,
              res.ptr(), res.ld());
    be.from_f64(b, cols, res.ptr(), res.ld(), out + i0, ldo);
  }
}

// polar(A) by a float64 SVD whatever T is: the fallback for ill-conditioned factors, where a
// float32 SVD loses about cond * eps32 (measured: Iso-CTS on ViT-B/32 qkv keys at T = 20,
// V_cat with cond 8e5, 7e-2 from the float64 result against 1e-3 through float64).
template <class T>
Matrix<T> polar_f64(Backend<T>& be, const Matrix<T>& a) {
  return rounded(be, polar(be.f64(), widened(be, a)));
}

// Polar factor of a matrix whose columns are nearly orthonormal (concatenated singular-vector
// factors): A (A^T A)^{-1/2} with the inverse square root from a float64 Gram. Exact up to
// cond(A)^2 * 1e-16; when the columns are close to collinear (cond(A) > 1e3) or A is wide,
// it falls back to a float64 SVD, which is well defined there too.
template <class T>
Matrix<T> polar_of_factor(Backend<T>& be, const Matrix<T>& a) {
  const int r = a.cols();
  if (r == 0) return polar(be, a);
  if (r > a.rows()) {
    note_route("polar of a wide factor: float64 SVD");
    return polar_f64(be, a);
  }
  Backend<double>& be64 = be.f64();
  TopSingular t = top_singular(be64, gram64(be, a.ptr(), a.rows(), r, a.ld(), true), r);
  if (!(t.eig[r - 1] > 1e-6 * t.eig[0])) {
    note_route("polar of an ill-conditioned factor (cond > 1e3): float64 SVD");
    return polar_f64(be, a);
  }
  // (A^T A)^{-1/2} = Z diag(sigma^-1) Z^T
  Matrix<double> scaled = be64.matrix(r, r);
  be64.copy(r, r, t.vectors.ptr(), t.vectors.ld(), scaled.ptr(), scaled.ld());
  be64.scale_columns(r, r, scaled.ptr(), scaled.ld(), t.sigma, true);
  Matrix<double> inv_sqrt = be64.matrix(r, r);
  be64.gemm(false, true, r, r, r, 1.0, scaled.ptr(), scaled.ld(), t.vectors.ptr(),
            t.vectors.ld(), 0.0, inv_sqrt.ptr(), inv_sqrt.ld());
  Matrix<T> factor = rounded(be, inv_sqrt);
  Matrix<T> out = be.matrix(a.rows(), r);
  be.gemm(false, false, a.rows(), r, r, T(1), a.ptr(), a.ld(), factor.ptr(), factor.ld(), T(0),
          out.ptr(), out.ld());
  return out;
}

}  // namespace isofast
