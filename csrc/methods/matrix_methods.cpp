#include "matrix_methods.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "../core/route_log.hpp"

#include "../core/error.hpp"
#include "../linalg/gram.hpp"
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

// Iso-C of the task sum (shared by the direct route and the Gram route's fallback).
template <class T>
void iso_c_of_sum(Backend<T>& be, const MatrixProblem<T>& p, const Matrix<T>& sum,
                  double rank_tol, T* out) {
  ThinSvd<T> f = thin_svd(be, p.rows, p.cols, sum.ptr(), sum.ld());
  const T smax = f.s.empty() ? T(0) : f.s[0];
  const int q = count_above(f.s, static_cast<int>(f.s.size()),
                            smax * rank_cut_factor<T>(rank_tol, p.rows, p.cols));
  if (q == 0) return zero(p, out);
  const T sigma_bar = std::accumulate(f.s.begin(), f.s.begin() + q, T(0)) / T(q);
  be.gemm(false, false, p.rows, p.cols, q, sigma_bar, f.u.ptr(), f.u.ld(), f.vt.ptr(), f.vt.ld(),
          T(0), out, p.rows);
}

// Iso-C of a sum too ill-conditioned for its float64 Gram (cond > 1e6): the SVD in float64,
// whatever T is. A float32 SVD there loses about cond * eps32 (a square sum of cond 3e5:
// 2.4e-2 from float64, against 8e-3 for the float32 torch.linalg.svd loop); in float64 only
// the rounding of the float32 sum itself remains.
template <class T>
void iso_c_of_sum_float64(const MatrixProblem<T>& p, const Matrix<T>& sum, double rank_tol,
                          T* out) {
  Matrix<double> work(sum.rows, sum.cols);
  std::transform(sum.data.begin(), sum.data.end(), work.data.begin(),
                 [](T v) { return static_cast<double>(v); });
  Backend<double>& be = cpu_backend<double>();
  ThinSvd<double> f = thin_svd(be, p.rows, p.cols, work.ptr(), work.ld());
  const double smax = f.s.empty() ? 0.0 : f.s[0];
  const double cut = smax * static_cast<double>(rank_cut_factor<T>(rank_tol, p.rows, p.cols));
  const int q = count_above(f.s, static_cast<int>(f.s.size()), cut);
  if (q == 0) return zero(p, out);
  const double sigma_bar = std::accumulate(f.s.begin(), f.s.begin() + q, 0.0) / q;
  be.gemm(false, false, p.rows, p.cols, q, sigma_bar, f.u.ptr(), f.u.ld(), f.vt.ptr(),
          f.vt.ld(), 0.0, work.ptr(), work.ld());  // the input is spent: reuse it for M
  std::transform(work.data.begin(), work.data.end(), out,
                 [](double v) { return static_cast<T>(v); });
}

template <class T>
void iso_c(Backend<T>& be, const MatrixProblem<T>& p, double rank_tol, T* out) {
  Matrix<T> sum = sum_of(p);
  p.done_with_deltas();
  iso_c_of_sum(be, p, sum, rank_tol, out);
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
  p.done_with_deltas();
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
  p.done_with_deltas();
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

// ---------------------------------------------------------------------------------------
// Gram routes. Notation of docs/ALGORITHMS.md: D is m x n (row-major), r = min(m, n). In memory
// each task matrix is X = D^T, column-major n x m (p.rows = n, p.cols = m), so
//   D B   = X^T B  -> gemm(trans_a)          D^T B = X B  -> gemm(no trans)
// and D D^T = X^T X is the Gram of X's columns, D^T D = X X^T the Gram of its rows.
// The result M^T = sigma_bar * polar(V_cat) polar(U_cat)^T is written as X-layout n x m.

namespace {

template <class T>
void scale_columns(Matrix<T>& a, const std::vector<T>& by, bool divide) {
  for (int j = 0; j < a.cols; ++j) {
    const T f = divide ? (by[j] > T(0) ? T(1) / by[j] : T(0)) : by[j];
    for (int i = 0; i < a.rows; ++i) a.col(j)[i] *= f;
  }
}

template <class T>
Matrix<T> first_columns(const Matrix<T>& a, int from, int count) {
  Matrix<T> out(a.rows, count);
  std::copy(a.col(from), a.col(from) + static_cast<size_t>(a.rows) * count, out.ptr());
  return out;
}

// Columns of several matrices side by side.
template <class T>
Matrix<T> hconcat(const std::vector<const Matrix<T>*>& parts) {
  int rows = 0, cols = 0;
  for (auto* m : parts) {
    rows = m->rows;
    cols += m->cols;
  }
  Matrix<T> out(rows, cols);
  size_t at = 0;
  for (auto* m : parts) {
    std::copy(m->data.begin(), m->data.end(), out.data.begin() + at);
    at += m->data.size();
  }
  return out;
}

// out (n x m) = scale * L R^T with L n x c, R m x c.
template <class T>
void write_product(Backend<T>& be, const Matrix<T>& l, const Matrix<T>& r, T scale, T* out) {
  be.gemm(false, true, l.rows, r.rows, l.cols, scale, l.ptr(), l.ld(), r.ptr(), r.ld(), T(0), out,
          l.rows);
}

// op(X) W S^-1, with X (n x m, leading dimension ldx) float32/64 and W, S from the float64
// eigensolver (unrounded), computed in float64 blocks and rounded once: op(X) = X^T gives
// m x k (transposed), X gives n x k. Singular vectors formed this way divide by small singular
// values; in float32 that costs eps32 * sigma_max / sigma_j in column j, and a basis that far
// from orthonormal leaks the common subspace into every task block (Iso-CTS on a 512 x 192
// key of cond 1e5: 0.26 from float64, against 1.4e-3 for the float32 reference loop).
template <class Out, class T>
Matrix<Out> vectors_float64(const T* x, int n, int m, int ldx, bool transposed,
                            const Matrix<double>& w, const std::vector<double>& sigma) {
  Backend<double>& be = cpu_backend<double>();
  constexpr int kBlock = 256;
  const int k = w.cols;
  Matrix<double> in(n, std::min(kBlock, m));
  Matrix<double> res(transposed ? std::min(kBlock, m) : n, k);
  Matrix<Out> out(transposed ? m : n, k);
  for (int j0 = 0; j0 < m; j0 += kBlock) {  // column blocks of X are contiguous
    const int b = std::min(kBlock, m - j0);
    for (int j = 0; j < b; ++j)
      std::transform(x + static_cast<size_t>(j0 + j) * ldx, x + static_cast<size_t>(j0 + j) * ldx + n,
                     in.col(j), [](T a) { return static_cast<double>(a); });
    if (transposed) {  // rows j0.. of X^T W
      be.gemm(true, false, b, k, n, 1.0, in.ptr(), in.ld(), w.ptr(), w.ld(), 0.0, res.ptr(),
              res.ld());
      for (int c = 0; c < k; ++c)
        for (int i = 0; i < b; ++i) out.col(c)[j0 + i] = static_cast<Out>(res.col(c)[i] / sigma[c]);
    } else {  // X W accumulated over the blocks of X's columns and W's rows
      be.gemm(false, false, n, k, b, 1.0, in.ptr(), in.ld(), w.ptr() + j0, w.ld(),
              j0 == 0 ? 0.0 : 1.0, res.ptr(), res.ld());
    }
  }
  if (!transposed)
    for (int c = 0; c < k; ++c)
      for (int i = 0; i < n; ++i) out.col(c)[i] = static_cast<Out>(res.col(c)[i] / sigma[c]);
  return out;
}

template <class T>
Matrix<T> rounded(const Matrix<double>& a) {
  Matrix<T> out(a.rows, a.cols);
  std::transform(a.data.begin(), a.data.end(), out.data.begin(),
                 [](double v) { return static_cast<T>(v); });
  return out;
}

template <class T>
TopSingular<T> rounded(const TopSingular<double>& t) {
  TopSingular<T> out{std::vector<T>(t.sigma.begin(), t.sigma.end()),
                     Matrix<T>(t.vectors.rows, t.vectors.cols)};
  std::transform(t.vectors.data.begin(), t.vectors.data.end(), out.vectors.data.begin(),
                 [](double a) { return static_cast<T>(a); });
  return out;
}

}  // namespace

template <class T>
void iso_cts_gram(Backend<T>& be, const MatrixProblem<T>& p, double fraction, double rank_tol,
                  T* out) {
  const int n = p.rows, m = p.cols, r = std::min(m, n);
  const auto [k, s] = iso_cts_sizes(r, static_cast<int>(p.deltas.size()), fraction);
  const T tol = rank_cut_factor<T>(rank_tol, m, n);
  Matrix<T> sum = sum_of(p);
  const bool wide = m <= n;  // D wide: its left basis U is square and U_perp exists

  // Common subspace from the float64 Gram of the sum's short side.
  const TopSingular<double> common64 =
      top_singular_from_gram<double>(gram64(sum.ptr(), n, m, n, wide), r);
  const TopSingular<T> common = rounded<T>(common64);
  const T smax = common.sigma.empty() ? T(0) : common.sigma[0];
  const T cut = smax * tol;
  const int kk = count_above(common.sigma, k, cut);
  std::vector<T> s_common(common.sigma.begin(), common.sigma.begin() + kk);
  const std::vector<double> s64(common64.sigma.begin(), common64.sigma.begin() + kk);
  Matrix<T> uk, vk;  // m x kk, n x kk
  Matrix<double> uk64;  // tall D: U_k before rounding
  if (wide) {
    uk = first_columns(common.vectors, 0, kk);  // V_k = D^T U_k / S_k = X U_k / S_k
    vk = vectors_float64<T>(sum.ptr(), n, m, n, false, first_columns(common64.vectors, 0, kk), s64);
  } else {
    vk = first_columns(common.vectors, 0, kk);  // U_k = D V_k / S_k = X^T V_k / S_k
    uk64 = vectors_float64<double>(sum.ptr(), n, m, n, true,
                                   first_columns(common64.vectors, 0, kk), s64);
    uk = rounded<T>(uk64);
  }
  std::vector<T>().swap(sum.data);  // the sum is not needed past the common subspace

  std::vector<T> sigmas = s_common;
  std::vector<Matrix<T>> task_left, task_right;  // per task: coefficients / vectors
  if (s > 0 && smax > T(0)) {
    if (wide) {
      // R_t = U_perp U_perp^T D_t; its top-s left vectors are U_perp w with w the top
      // eigenvectors of Y Y^T, Y = U_perp^T D_t, whose transpose Z = X_t U_perp is n x q.
      const int q = m - kk;
      Matrix<T> uperp = first_columns(common.vectors, kk, q);
      Matrix<T> z(n, q);
      for (const T* x : p.deltas) {
        be.gemm(false, false, n, q, m, T(1), x, n, uperp.ptr(), uperp.ld(), T(0), z.ptr(), z.ld());
        const TopSingular<double> t64 =
            top_singular_from_gram<double>(gram64(z.ptr(), n, q, n, true), s);
        const TopSingular<T> t = rounded<T>(t64);
        const int keep = count_above(t.sigma, s, cut);
        Matrix<T> w = first_columns(t.vectors, 0, keep);
        const std::vector<double> sig64(t64.sigma.begin(), t64.sigma.begin() + keep);
        // right vectors: Z w / sigma
        Matrix<T> v = vectors_float64<T>(z.ptr(), n, q, z.ld(), false,
                                         first_columns(t64.vectors, 0, keep), sig64);
        std::vector<T> sig(t.sigma.begin(), t.sigma.begin() + keep);
        sigmas.insert(sigmas.end(), sig.begin(), sig.end());
        task_left.push_back(std::move(w));
        task_right.push_back(std::move(v));
      }
      // polar([U_k, U_perp W]) = [U_k, U_perp polar(W)] because U_perp is orthogonal to U_k.
      std::vector<const Matrix<T>*> ws;
      for (auto& w : task_left) ws.push_back(&w);
      Matrix<T> pw = polar_of_factor(be, hconcat(ws));
      Matrix<T> u_tasks(m, pw.cols);
      be.gemm(false, false, m, pw.cols, q, T(1), uperp.ptr(), uperp.ld(), pw.ptr(), pw.ld(), T(0),
              u_tasks.ptr(), u_tasks.ld());
      task_left.assign(1, std::move(u_tasks));
    } else {
      // Tall D: R_t explicitly (X layout: X_t - (X_t U_k) U_k^T), top-s right vectors from the
      // float64 Gram of its rows, left vectors R_t v / sigma.
      // When the sum's spectrum falls far below sigma_max by the k-th direction, the task
      // residuals are far smaller than the task matrices and forming them in float32 cancels
      // away their accuracy (Iso-CTS, 240 x 96 key of cond 3e5: 7.6e-3 from float64 against
      // 3.5e-3 for the float32 reference loop): form them in float64 there. Spectra of real
      // task sums stay above that line and keep the float32 speed.
      const bool precise = kk > 0 && !(s_common[kk - 1] > T(1e-3) * smax);
      Matrix<T> coeff(n, kk), residual(n, m);
      Matrix<double> coeff64(precise ? n : 0, kk), residual64(precise ? n : 0, m);
      for (const T* x : p.deltas) {
        if (precise) {
          Backend<double>& be64 = cpu_backend<double>();
          std::transform(x, x + residual64.data.size(), residual64.data.begin(),
                         [](T a) { return static_cast<double>(a); });
          be64.gemm(false, false, n, kk, m, 1.0, residual64.ptr(), n, uk64.ptr(), uk64.ld(), 0.0,
                    coeff64.ptr(), coeff64.ld());
          be64.gemm(false, true, n, m, kk, -1.0, coeff64.ptr(), coeff64.ld(), uk64.ptr(),
                    uk64.ld(), 1.0, residual64.ptr(), residual64.ld());
        } else {
          std::copy(x, x + residual.data.size(), residual.data.begin());
          if (kk > 0) {
            be.gemm(false, false, n, kk, m, T(1), x, n, uk.ptr(), uk.ld(), T(0), coeff.ptr(),
                    coeff.ld());
            be.gemm(false, true, n, m, kk, T(-1), coeff.ptr(), coeff.ld(), uk.ptr(), uk.ld(),
                    T(1), residual.ptr(), residual.ld());
          }
        }
        const TopSingular<double> t64 = top_singular_from_gram<double>(
            precise ? gram64(residual64.ptr(), n, m, n, false)
                    : gram64(residual.ptr(), n, m, n, false),
            s);
        const TopSingular<T> t = rounded<T>(t64);
        const int keep = count_above(t.sigma, s, cut);
        Matrix<T> v = first_columns(t.vectors, 0, keep);
        const std::vector<double> sig64(t64.sigma.begin(), t64.sigma.begin() + keep);
        const Matrix<double> w = first_columns(t64.vectors, 0, keep);
        Matrix<T> u = precise ? vectors_float64<T>(residual64.ptr(), n, m, n, true, w, sig64)
                              : vectors_float64<T>(residual.ptr(), n, m, n, true, w, sig64);
        std::vector<T> sig(t.sigma.begin(), t.sigma.begin() + keep);
        sigmas.insert(sigmas.end(), sig.begin(), sig.end());
        task_left.push_back(std::move(u));
        task_right.push_back(std::move(v));
      }
    }
  }
  p.done_with_deltas();
  if (sigmas.empty()) return zero(p, out);
  const T sigma_bar = std::accumulate(sigmas.begin(), sigmas.end(), T(0)) / T(sigmas.size());

  std::vector<const Matrix<T>*> right{&vk};
  for (auto& v : task_right) right.push_back(&v);
  Matrix<T> pv = polar_of_factor(be, hconcat(right));
  Matrix<T> pu;
  if (wide) {
    std::vector<const Matrix<T>*> left{&uk};
    for (auto& u : task_left) left.push_back(&u);
    pu = hconcat(left);  // already orthonormal
  } else {
    std::vector<const Matrix<T>*> left{&uk};
    for (auto& u : task_left) left.push_back(&u);
    pu = polar_of_factor(be, hconcat(left));
  }
  write_product(be, pv, pu, sigma_bar, out);
}

template <class T>
void tsv_m_gram(Backend<T>& be, const MatrixProblem<T>& p, double rank_tol, T* out) {
  const int n = p.rows, m = p.cols, r = std::min(m, n);
  const int d = r / static_cast<int>(p.deltas.size());
  const bool wide = m <= n;
  std::vector<T> sigmas;
  std::vector<Matrix<T>> lefts, rights;
  for (const T* x : p.deltas) {
    if (d == 0) break;
    TopSingular<T> t = top_singular_from_gram<T>(gram64(x, n, m, n, wide), d);
    const T smax = t.sigma.empty() ? T(0) : t.sigma[0];
    const int keep = count_above(t.sigma, d, smax * rank_cut_factor<T>(rank_tol, m, n));
    std::vector<T> sig(t.sigma.begin(), t.sigma.begin() + keep);
    Matrix<T> known = first_columns(t.vectors, 0, keep);
    Matrix<T> other(wide ? n : m, keep);
    // wide: u known, v = D^T u / s = X u / s; tall: v known, u = D v / s = X^T v / s.
    be.gemm(!wide, false, other.rows, keep, wide ? m : n, T(1), x, n, known.ptr(), known.ld(), T(0),
            other.ptr(), other.ld());
    scale_columns(other, sig, true);
    sigmas.insert(sigmas.end(), sig.begin(), sig.end());
    lefts.push_back(wide ? std::move(known) : std::move(other));
    rights.push_back(wide ? std::move(other) : std::move(known));
  }
  p.done_with_deltas();
  if (sigmas.empty()) return zero(p, out);
  std::vector<const Matrix<T>*> l, rr;
  for (auto& u : lefts) l.push_back(&u);
  for (auto& v : rights) rr.push_back(&v);
  Matrix<T> pu = polar_of_factor(be, hconcat(l));
  Matrix<T> pv = polar_of_factor(be, hconcat(rr));
  scale_columns(pv, sigmas, false);
  write_product(be, pv, pu, T(1), out);
}

template void iso_cts_gram<float>(Backend<float>&, const MatrixProblem<float>&, double, double,
                                  float*);
template void iso_cts_gram<double>(Backend<double>&, const MatrixProblem<double>&, double, double,
                                   double*);
template void tsv_m_gram<float>(Backend<float>&, const MatrixProblem<float>&, double, float*);
template void tsv_m_gram<double>(Backend<double>&, const MatrixProblem<double>&, double, double*);

namespace {

// out = scale * X W (right = true: W is cols x cols) or scale * W X (W is rows x rows), with X
// the rows x cols float32/64 matrix and W float64, computed in float64 blocks. Keeping W in
// float64 matters: it holds 1/sigma_min, so rounding it to float32 would cost cond * eps32.
template <class T>
void apply_in_float64(const Matrix<T>& x, const Matrix<double>& w, bool left, double scale,
                      T* out) {
  Backend<double>& be = cpu_backend<double>();
  constexpr int kBlock = 256;
  const int rows = x.rows, cols = x.cols;
  if (left) {  // column blocks of X are contiguous
    Matrix<double> in(rows, std::min(kBlock, cols)), res(rows, std::min(kBlock, cols));
    for (int j0 = 0; j0 < cols; j0 += kBlock) {
      const int b = std::min(kBlock, cols - j0);
      std::copy(x.col(j0), x.col(j0) + static_cast<size_t>(rows) * b, in.data.begin());
      be.gemm(false, false, rows, b, rows, scale, w.ptr(), w.ld(), in.ptr(), rows, 0.0,
              res.ptr(), rows);
      std::transform(res.data.begin(), res.data.begin() + static_cast<size_t>(rows) * b,
                     out + static_cast<size_t>(j0) * rows, [](double v) { return T(v); });
    }
    return;
  }
  Matrix<double> in(std::min(kBlock, rows), cols), res(std::min(kBlock, rows), cols);
  for (int i0 = 0; i0 < rows; i0 += kBlock) {  // row blocks, gathered
    const int b = std::min(kBlock, rows - i0);
    for (int j = 0; j < cols; ++j)
      for (int i = 0; i < b; ++i) in.data[i + static_cast<size_t>(j) * in.rows] = x.col(j)[i0 + i];
    be.gemm(false, false, b, cols, cols, scale, in.ptr(), in.ld(), w.ptr(), w.ld(), 0.0,
            res.ptr(), res.ld());
    for (int j = 0; j < cols; ++j)
      for (int i = 0; i < b; ++i)
        out[i0 + i + static_cast<size_t>(j) * rows] = T(res.data[i + static_cast<size_t>(j) * res.rows]);
  }
}

}  // namespace

template <class T>
void iso_c_gram(Backend<T>& be, const MatrixProblem<T>& p, double rank_tol, T* out) {
  const int n = p.rows, m = p.cols, r = std::min(m, n);
  const bool wide = m <= n;
  Matrix<T> sum = sum_of(p);
  p.done_with_deltas();
  // Eigenpairs of the short-side Gram: D D^T = U S^2 U^T (wide) or D^T D = V S^2 V^T (tall).
  Matrix<double> g = gram64(sum.ptr(), n, m, n, wide);
  Matrix<double> z(r, r);
  std::vector<double> w(static_cast<size_t>(r));
  cpu_backend<double>().eigh_top(r, g.ptr(), g.ld(), r, w.data(), z.ptr(), z.ld());
  // Beyond cond 1e6 a float64 Gram no longer resolves the small directions to fp32 accuracy.
  if (!(w[0] > 0) || !(w[r - 1] > 1e-12 * w[0])) {
    note_route("iso_c: sum too ill-conditioned for its Gram (cond > 1e6): float64 SVD");
    return iso_c_of_sum_float64(p, sum, rank_tol, out);
  }
  std::vector<T> sigma(static_cast<size_t>(r));
  for (int j = 0; j < r; ++j) sigma[j] = static_cast<T>(std::sqrt(std::max(w[j], 0.0)));
  const int q = count_above(sigma, r, sigma[0] * rank_cut_factor<T>(rank_tol, m, n));
  if (q == 0) return zero(p, out);
  const T sigma_bar = std::accumulate(sigma.begin(), sigma.begin() + q, T(0)) / T(q);
  // W = Z_q S_q^{-1} Z_q^T; polar(D) = W D (wide) or D W (tall); in X layout M^T = X W or W X.
  Matrix<double> zs(r, q);
  for (int j = 0; j < q; ++j)
    for (int i = 0; i < r; ++i) zs.col(j)[i] = z.col(j)[i] / std::sqrt(w[j]);
  Matrix<double> w64(r, r);
  cpu_backend<double>().gemm(false, true, r, r, q, 1.0, zs.ptr(), r, z.ptr(), r, 0.0, w64.ptr(), r);
  apply_in_float64(sum, w64, !wide, static_cast<double>(sigma_bar), out);
}

template void iso_c_gram<float>(Backend<float>&, const MatrixProblem<float>&, double, float*);
template void iso_c_gram<double>(Backend<double>&, const MatrixProblem<double>&, double, double*);

}  // namespace isofast
