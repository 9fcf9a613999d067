#include "matrix_methods.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "../core/error.hpp"
#include "../linalg/spectral.hpp"

namespace isofast {
namespace {

template <class T>
Matrix<T> sum_of(const MatrixProblem<T>& p) {
  Matrix<T> s(p.rows, p.cols);
  const size_t n = s.data.size();
  for (const T* d : p.deltas)
    for (size_t i = 0; i < n; ++i) s.data[i] += d[i];
  return s;
}

// Directions gathered from several SVDs: left vectors as columns, right vectors as rows.
template <class T>
struct DirectionSet {
  int rows, cols;
  std::vector<T> sigma;
  std::vector<T> left;   // column-major rows x count
  std::vector<T> right;  // column-major count x cols, stored transposed as cols x count

  DirectionSet(int r, int c) : rows(r), cols(c) {}
  int count() const { return static_cast<int>(sigma.size()); }

  // Append the first `take` triplets of an SVD.
  void append(const ThinSvd<T>& f, int take) {
    for (int j = 0; j < take; ++j) {
      sigma.push_back(f.s[j]);
      left.insert(left.end(), f.u.col(j), f.u.col(j) + rows);
      for (int c = 0; c < cols; ++c) right.push_back(f.vt.data[j + static_cast<size_t>(c) * f.vt.rows]);
    }
  }
  Matrix<T> left_matrix() const {
    Matrix<T> m(rows, count());
    m.data = left;
    return m;
  }
  Matrix<T> right_matrix() const {  // cols x count (the V factor, not V^T)
    Matrix<T> m(cols, count());
    m.data = right;
    return m;
  }
};

// out = polar(L) * diag(w) * polar(R)^T, or sigma_bar * polar(L) polar(R)^T when w is empty.
template <class T>
void orthogonalized_product(Backend<T>& be, const DirectionSet<T>& d, const std::vector<T>* w,
                            T scale, T* out) {
  const int r = d.count();
  Matrix<T> pl = polar(be, d.left_matrix());
  Matrix<T> pr = polar(be, d.right_matrix());
  if (w) {
    for (int j = 0; j < r; ++j)
      for (int i = 0; i < pl.rows; ++i) pl.col(j)[i] *= (*w)[j];
  }
  be.gemm(false, true, d.rows, d.cols, r, scale, pl.ptr(), pl.ld(), pr.ptr(), pr.ld(), T(0), out,
          d.rows);
}

template <class T>
void zero(const MatrixProblem<T>& p, T* out) {
  std::fill(out, out + static_cast<size_t>(p.rows) * p.cols, T(0));
}

}  // namespace

std::pair<int, int> iso_cts_sizes(int r, int tasks, double fraction) {
  ISOFAST_CHECK(tasks > 0, "iso_cts needs at least one task");
  ISOFAST_CHECK(fraction >= 0.0 && fraction <= 1.0,
                "common_space_fraction must be in [0, 1], got ", fraction);
  const int k0 = static_cast<int>(std::floor(fraction * r));
  // Python's round(): halves go to the even neighbour, which nearbyint does by default.
  int total = static_cast<int>(std::nearbyint(static_cast<double>(r - k0) / tasks)) * tasks;
  if (total > r) total = (r / tasks) * tasks;
  return {r - total, total / tasks};
}

template <class T>
void iso_c(Backend<T>& be, const MatrixProblem<T>& p, double rank_tol, T* out) {
  Matrix<T> sum = sum_of(p);
  ThinSvd<T> f = thin_svd(be, p.rows, p.cols, sum.ptr(), sum.ld());
  const T smax = f.s.empty() ? T(0) : f.s[0];
  const int q = count_above(f.s, static_cast<int>(f.s.size()),
                            smax * rank_cut_factor<T>(rank_tol, p.rows, p.cols));
  if (q == 0) return zero(p, out);
  const T sigma_bar = std::accumulate(f.s.begin(), f.s.begin() + q, T(0)) / T(q);
  be.gemm(false, false, p.rows, p.cols, q, sigma_bar, f.u.ptr(), f.u.ld(), f.vt.ptr(), f.vt.ld(),
          T(0), out, p.rows);
}

template <class T>
void iso_cts(Backend<T>& be, const MatrixProblem<T>& p, double fraction, double rank_tol, T* out) {
  const int r = std::min(p.rows, p.cols);
  const int tasks = static_cast<int>(p.deltas.size());
  const auto [k, s] = iso_cts_sizes(r, tasks, fraction);

  Matrix<T> sum = sum_of(p);
  ThinSvd<T> common = thin_svd(be, p.rows, p.cols, sum.ptr(), sum.ld());
  const T smax = common.s.empty() ? T(0) : common.s[0];
  const T cut = smax * rank_cut_factor<T>(rank_tol, p.rows, p.cols);
  const int kk = count_above(common.s, k, cut);

  DirectionSet<T> dirs(p.rows, p.cols);
  dirs.append(common, kk);

  // Common right subspace of X (= D's left one): the first kk rows of common.vt.
  Matrix<T> coeff(p.rows, kk), residual(p.rows, p.cols);
  for (const T* d : p.deltas) {
    if (s == 0 || smax == T(0)) break;
    std::memcpy(residual.ptr(), d, sizeof(T) * residual.data.size());
    if (kk > 0) {
      // residual = X_t - (X_t Vk) Vk^T with Vk^T = common.vt[:kk, :]
      be.gemm(false, true, p.rows, kk, p.cols, T(1), d, p.rows, common.vt.ptr(), common.vt.ld(),
              T(0), coeff.ptr(), coeff.ld());
      be.gemm(false, false, p.rows, p.cols, kk, T(-1), coeff.ptr(), coeff.ld(), common.vt.ptr(),
              common.vt.ld(), T(1), residual.ptr(), residual.ld());
    }
    ThinSvd<T> task = thin_svd(be, p.rows, p.cols, residual.ptr(), residual.ld());
    dirs.append(task, count_above(task.s, s, cut));
  }
  if (dirs.count() == 0) return zero(p, out);
  const T sigma_bar =
      std::accumulate(dirs.sigma.begin(), dirs.sigma.end(), T(0)) / T(dirs.count());
  orthogonalized_product<T>(be, dirs, nullptr, sigma_bar, out);
}

template <class T>
void tsv_m(Backend<T>& be, const MatrixProblem<T>& p, double rank_tol, T* out) {
  const int r = std::min(p.rows, p.cols);
  const int tasks = static_cast<int>(p.deltas.size());
  const int d = r / tasks;
  DirectionSet<T> dirs(p.rows, p.cols);
  for (const T* delta : p.deltas) {
    if (d == 0) break;
    ThinSvd<T> task = thin_svd(be, p.rows, p.cols, delta, p.rows);
    const T smax = task.s.empty() ? T(0) : task.s[0];
    dirs.append(task, count_above(task.s, d, smax * rank_cut_factor<T>(rank_tol, p.rows, p.cols)));
  }
  if (dirs.count() == 0) return zero(p, out);
  orthogonalized_product<T>(be, dirs, &dirs.sigma, T(1), out);
}

template void iso_c<float>(Backend<float>&, const MatrixProblem<float>&, double, float*);
template void iso_c<double>(Backend<double>&, const MatrixProblem<double>&, double, double*);
template void iso_cts<float>(Backend<float>&, const MatrixProblem<float>&, double, double, float*);
template void iso_cts<double>(Backend<double>&, const MatrixProblem<double>&, double, double,
                              double*);
template void tsv_m<float>(Backend<float>&, const MatrixProblem<float>&, double, float*);
template void tsv_m<double>(Backend<double>&, const MatrixProblem<double>&, double, double*);

}  // namespace isofast
