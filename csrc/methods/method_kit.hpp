// Pieces the matrix methods share: the task sum, side-by-side columns, direction sets and
// the final low-rank product. Backend primitives only: no loop over matrix data here.
#pragma once
#include <numeric>
#include <vector>

#include "../linalg/backend.hpp"
#include "../linalg/spectral.hpp"
#include "matrix_methods.hpp"

namespace isofast {

template <class T>
Matrix<T> sum_of(Backend<T>& be, const MatrixProblem<T>& p) {
  Matrix<T> s = be.zeros(p.rows, p.cols);
  for (const T* d : p.deltas) be.add(s.size(), d, s.ptr());
  return s;
}

template <class T>
void write_zero(Backend<T>& be, const MatrixProblem<T>& p, T* out) {
  be.fill(p.rows, p.cols, T(0), out, p.rows);
}

// Columns of several matrices (same row count) side by side, in a new matrix.
template <class T>
Matrix<T> hconcat(Backend<T>& be, int rows, const std::vector<Matrix<T>>& parts) {
  int cols = 0;
  for (const Matrix<T>& m : parts) cols += m.cols();
  Matrix<T> out = be.matrix(rows, cols);
  int at = 0;
  for (const Matrix<T>& m : parts) {
    be.copy(rows, m.cols(), m.ptr(), m.ld(), out.col(at), out.ld());
    at += m.cols();
  }
  return out;
}

// out (rows x cols, ld rows) = scale * L R^T with L rows x c, R cols x c.
template <class T>
void write_product(Backend<T>& be, const Matrix<T>& l, const Matrix<T>& r, T scale, T* out) {
  be.gemm(false, true, l.rows(), r.rows(), l.cols(), scale, l.ptr(), l.ld(), r.ptr(), r.ld(),
          T(0), out, l.rows());
}

template <class T>
T mean_of(const std::vector<T>& v) {
  return std::accumulate(v.begin(), v.end(), T(0)) / T(v.size());
}

// Singular triplets gathered from several decompositions of rows x cols matrices: left
// vectors (rows x c) and right vectors (cols x c, the V factor, not V^T).
template <class T>
struct DirectionSet {
  int rows, cols;
  std::vector<T> sigma;
  std::vector<Matrix<T>> left, right;

  DirectionSet(int r, int c) : rows(r), cols(c) {}
  int count() const { return static_cast<int>(sigma.size()); }

  void add(std::vector<T> s, Matrix<T> u, Matrix<T> v) {
    sigma.insert(sigma.end(), s.begin(), s.end());
    left.push_back(std::move(u));
    right.push_back(std::move(v));
  }
  // The first `take` triplets of an SVD.
  void add_svd(Backend<T>& be, const ThinSvd<T>& f, int take) {
    Matrix<T> v = be.matrix(cols, take);
    be.copy(take, cols, f.vt.ptr(), f.vt.ld(), v.ptr(), v.ld(), true);
    add(std::vector<T>(f.s.begin(), f.s.begin() + take), f.u.columns(0, take), v);
  }
  Matrix<T> left_matrix(Backend<T>& be) const { return hconcat(be, rows, left); }
  Matrix<T> right_matrix(Backend<T>& be) const { return hconcat(be, cols, right); }
};

}  // namespace isofast
