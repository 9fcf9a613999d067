// SVD-based building blocks of TSV-M, Iso-C and Iso-CTS: thin SVD of a copy, the rank cut,
// the polar factor. Written against Backend<T> only (any device).
#pragma once
#include <algorithm>
#include <limits>
#include <vector>

#include "backend.hpp"

namespace isofast {

template <class T>
struct ThinSvd {
  Matrix<T> u;       // rows x r
  std::vector<T> s;  // r, descending (host)
  Matrix<T> vt;      // r x cols
};

// SVD of a rows x cols matrix (leading dimension lda); the input is not changed.
template <class T>
ThinSvd<T> thin_svd(Backend<T>& be, int rows, int cols, const T* a, int lda) {
  const int r = std::min(rows, cols);
  Matrix<T> work = be.matrix(rows, cols);
  be.copy(rows, cols, a, lda, work.ptr(), work.ld());
  ThinSvd<T> out{be.matrix(rows, r), {}, be.matrix(r, cols)};
  Matrix<T> s = be.matrix(r, 1);
  be.svd(rows, cols, work.ptr(), work.ld(), s.ptr(), out.u.ptr(), out.u.ld(), out.vt.ptr(),
         out.vt.ld());
  out.s = be.to_host(s.ptr(), static_cast<size_t>(r));
  return out;
}

// Number of leading singular values strictly above `cut` (values are descending).
template <class T, class C>
int count_above(const std::vector<T>& s, int limit, C cut) {
  int q = 0;
  while (q < limit && q < static_cast<int>(s.size()) && s[q] > cut) ++q;
  return q;
}

// Polar factor P Q^T of A = P Sigma Q^T by an SVD, as a new matrix.
template <class T>
Matrix<T> polar(Backend<T>& be, const Matrix<T>& a) {
  if (a.empty()) return be.zeros(a.rows(), a.cols());
  Matrix<T> out = be.matrix(a.rows(), a.cols());
  ThinSvd<T> f = thin_svd(be, a.rows(), a.cols(), a.ptr(), a.ld());
  const int r = static_cast<int>(f.s.size());
  be.gemm(false, false, a.rows(), a.cols(), r, T(1), f.u.ptr(), f.u.ld(), f.vt.ptr(), f.vt.ld(),
          T(0), out.ptr(), out.ld());
  return out;
}

// Rank tolerance (docs/CONTRACT.md): rank_tol if given (>= 0), else c * eps(T) relative to
// sigma_max, c = 4 for float32 and 16 for float64: just above the noise that leaves exactly
// low-rank inputs with non-zero "null" singular values. In float32 that noise is the rounding
// of the inputs (at most ~2 eps32 sigma_max; the factorisations run in float64), so 4 eps32
// (4.8e-7) keeps every direction of a sum with cond up to 1e6 (16 eps32 dropped real ones
// there: Iso-C 0.22 from float64 on a square 768 key of cond 1e6). In float64 it is the SVD's
// own backward error, a few eps64. Not max(m, n) * eps (an earlier design's cut): real task
// sums are full rank with condition numbers 1e4..1e5, and a 3072-row cut of 3.7e-4 dropped
// 17-25 real directions per matrix (a 1.7e-1 change against the reference).
template <class T>
T rank_cut_factor(double rank_tol) {
  if (rank_tol >= 0) return static_cast<T>(rank_tol);
  return T(sizeof(T) == 4 ? 4 : 16) * std::numeric_limits<T>::epsilon();
}

}  // namespace isofast
