// Iso-CTS: the top-k common subspace of the task sum plus, per task, the top-s directions of
// the task matrix with the common left subspace projected out; all singular values flattened
// to their mean and the concatenated factors orthogonalised (docs/ALGORITHMS.md). Routes:
//   direct  one SVD of the sum, one SVD per task residual, polar factors by SVD (float64);
//   gram    float64 Gram eigenpairs of the short sides; for a wide D the complement
//           U_perp = U[:, k:] and a small polar on the U side (float32).
#include <algorithm>
#include <cmath>

#include "../core/error.hpp"
#include "../core/route_log.hpp"
#include "../linalg/gram.hpp"
#include "method_kit.hpp"

namespace isofast {

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

namespace {

// Block sizes from the numerical rank q of the sum (docs/CONTRACT.md): for a full-rank sum
// q = r = min(m, n) and these are the paper's sizes; for a rank-deficient one (a sum of LoRA
// updates) the common fraction applies to the q directions the sum has.
template <class T>
std::pair<int, int> sizes_for(const std::vector<T>& sigma, T cut, int tasks, double fraction) {
  const int q = count_above(sigma, static_cast<int>(sigma.size()), cut);
  return iso_cts_sizes(q, tasks, fraction);
}

template <class T>
void iso_cts_direct(Backend<T>& be, const MatrixProblem<T>& p, double fraction, T cut_factor,
                    T* out) {
  Matrix<T> sum = sum_of(be, p);
  ThinSvd<T> common = thin_svd(be, p.rows, p.cols, sum.ptr(), sum.ld());
  sum.release();
  const T smax = common.s.empty() ? T(0) : common.s[0];
  const T cut = smax * cut_factor;
  const auto [k, s] = sizes_for(common.s, cut, static_cast<int>(p.deltas.size()), fraction);
  const int kk = count_above(common.s, k, cut);
  DirectionSet<T> dirs(p.rows, p.cols);
  dirs.add_svd(be, common, kk);

  // Common right subspace of X (= D's left one): the first kk rows of common.vt.
  Matrix<T> coeff = be.matrix(p.rows, kk), residual = be.matrix(p.rows, p.cols);
  for (const T* d : p.deltas) {
    if (s == 0 || smax == T(0)) break;
    be.copy(p.rows, p.cols, d, p.rows, residual.ptr(), residual.ld());
    if (kk > 0) {  // residual = X_t - (X_t Vk) Vk^T with Vk^T = common.vt[:kk, :]
      be.gemm(false, true, p.rows, kk, p.cols, T(1), d, p.rows, common.vt.ptr(), common.vt.ld(),
              T(0), coeff.ptr(), coeff.ld());
      be.gemm(false, false, p.rows, p.cols, kk, T(-1), coeff.ptr(), coeff.ld(), common.vt.ptr(),
              common.vt.ld(), T(1), residual.ptr(), residual.ld());
    }
    ThinSvd<T> task = thin_svd(be, p.rows, p.cols, residual.ptr(), residual.ld());
    dirs.add_svd(be, task, count_above(task.s, s, cut));
  }
  p.done_with_deltas();
  if (dirs.count() == 0) return write_zero(be, p, out);
  Matrix<T> pl = polar(be, dirs.left_matrix(be));
  Matrix<T> pr = polar(be, dirs.right_matrix(be));
  write_product(be, pl, pr, mean_of(dirs.sigma), out);
}

template <class T>
void iso_cts_gram(Backend<T>& be, const MatrixProblem<T>& p, double fraction, T cut_factor,
                  T* out) {
  Backend<double>& be64 = be.f64();
  const int n = p.rows, m = p.cols, r = std::min(m, n);
  Matrix<T> sum = sum_of(be, p);
  const bool wide = m <= n;  // D wide: its left basis U is square and U_perp exists

  // Common subspace from the float64 Gram of the sum's short side.
  const TopSingular common = top_singular(be64, gram64(be, sum.ptr(), n, m, n, wide), r);
  const std::vector<T> sigma_common = rounded<T>(common.sigma, common.count());
  const T smax = sigma_common.empty() ? T(0) : sigma_common[0];
  const T cut = smax * cut_factor;
  const auto [k, s] = sizes_for(sigma_common, cut, static_cast<int>(p.deltas.size()), fraction);
  const int kk = count_above(sigma_common, k, cut);
  const std::vector<double> s64(common.sigma.begin(), common.sigma.begin() + kk);
  const Matrix<T> vectors = rounded(be, common.vectors);
  Matrix<T> uk, vk;     // m x kk, n x kk
  Matrix<double> uk64;  // tall D: U_k before rounding
  if (wide) {
    uk = vectors.columns(0, kk);  // V_k = D^T U_k / S_k = X U_k / S_k
    vk = vectors_f64<T>(be, be, sum.ptr(), n, m, n, false, common.vectors.columns(0, kk), s64);
  } else {
    vk = vectors.columns(0, kk);  // U_k = D V_k / S_k = X^T V_k / S_k
    uk64 = vectors_f64<double>(be, be64, sum.ptr(), n, m, n, true, common.vectors.columns(0, kk),
                               s64);
    uk = rounded(be, uk64);
  }
  sum.release();  // not needed past the common subspace

  DirectionSet<T> dirs(m, n);  // of D: left = U side (m rows), right = V side (n rows)
  dirs.add(std::vector<T>(sigma_common.begin(), sigma_common.begin() + kk), uk, vk);
  if (s > 0 && smax > T(0)) {
    if (wide) {
      // R_t = U_perp U_perp^T D_t; its top-s left vectors are U_perp w with w the top
      // eigenvectors of Y Y^T, Y = U_perp^T D_t, whose transpose Z = X_t U_perp is n x q.
      const int q = m - kk;
      const Matrix<T> uperp = vectors.columns(kk, q);
      Matrix<T> z = be.matrix(n, q);
      std::vector<Matrix<T>> task_w;
      for (const T* x : p.deltas) {
        be.gemm(false, false, n, q, m, T(1), x, n, uperp.ptr(), uperp.ld(), T(0), z.ptr(),
                z.ld());
        const TopSingular t = top_singular(be64, gram64(be, z.ptr(), n, q, n, true), s);
        const std::vector<T> sig = rounded<T>(t.sigma, t.count());
        const int keep = count_above(sig, s, cut);
        const std::vector<double> sig64(t.sigma.begin(), t.sigma.begin() + keep);
        // right vectors: Z w / sigma
        Matrix<T> v = vectors_f64<T>(be, be, z.ptr(), n, q, z.ld(), false,
                                     t.vectors.columns(0, keep), sig64);
        task_w.push_back(rounded(be, t.vectors.columns(0, keep)));
        dirs.add(std::vector<T>(sig.begin(), sig.begin() + keep), Matrix<T>(), v);
      }
      // polar([U_k, U_perp W]) = [U_k, U_perp polar(W)] because U_perp is orthogonal to U_k.
      Matrix<T> pw = polar_of_factor(be, hconcat(be, q, task_w));
      Matrix<T> u_tasks = be.matrix(m, pw.cols());
      be.gemm(false, false, m, pw.cols(), q, T(1), uperp.ptr(), uperp.ld(), pw.ptr(), pw.ld(),
              T(0), u_tasks.ptr(), u_tasks.ld());
      dirs.left.assign({uk, u_tasks});
    } else {
      // Tall D: R_t explicitly (X layout: X_t - (X_t U_k) U_k^T), top-s right vectors from the
      // float64 Gram of its rows, left vectors R_t v / sigma.
      // When the sum's spectrum falls far below sigma_max by the k-th direction, the task
      // residuals are far smaller than the task matrices and forming them in float32 cancels
      // away their accuracy (Iso-CTS, 240 x 96 key of cond 3e5: 7.6e-3 from float64 against
      // 3.5e-3 for the float32 reference loop): form them in float64 there. Spectra of real
      // task sums stay above that line and keep the float32 speed.
      const bool precise = kk > 0 && !(sigma_common[kk - 1] > T(1e-3) * smax);
      Matrix<T> coeff = be.matrix(n, kk), residual = be.matrix(n, m);
      Matrix<double> coeff64, residual64;
      if (precise) {
        coeff64 = be64.matrix(n, kk);
        residual64 = be64.matrix(n, m);
      }
      for (const T* x : p.deltas) {
        if (precise) {
          be.to_f64(n, m, x, n, residual64.ptr(), residual64.ld());
          be64.gemm(false, false, n, kk, m, 1.0, residual64.ptr(), n, uk64.ptr(), uk64.ld(), 0.0,
                    coeff64.ptr(), coeff64.ld());
          be64.gemm(false, true, n, m, kk, -1.0, coeff64.ptr(), coeff64.ld(), uk64.ptr(),
                    uk64.ld(), 1.0, residual64.ptr(), residual64.ld());
        } else {
          be.copy(n, m, x, n, residual.ptr(), residual.ld());
          if (kk > 0) {
            be.gemm(false, false, n, kk, m, T(1), x, n, uk.ptr(), uk.ld(), T(0), coeff.ptr(),
                    coeff.ld());
            be.gemm(false, true, n, m, kk, T(-1), coeff.ptr(), coeff.ld(), uk.ptr(), uk.ld(),
                    T(1), residual.ptr(), residual.ld());
          }
        }
        const TopSingular t =
            top_singular(be64,
                         precise ? gram64(be64, residual64.ptr(), n, m, n, false)
                                 : gram64(be, residual.ptr(), n, m, n, false),
                         s);
        const std::vector<T> sig = rounded<T>(t.sigma, t.count());
        const int keep = count_above(sig, s, cut);
        const std::vector<double> sig64(t.sigma.begin(), t.sigma.begin() + keep);
        const Matrix<double> w = t.vectors.columns(0, keep);
        Matrix<T> u = precise ? vectors_f64<T>(be64, be, residual64.ptr(), n, m, n, true, w, sig64)
                              : vectors_f64<T>(be, be, residual.ptr(), n, m, n, true, w, sig64);
        dirs.add(std::vector<T>(sig.begin(), sig.begin() + keep), u,
                 rounded(be, t.vectors.columns(0, keep)));
      }
    }
  }
  p.done_with_deltas();
  if (dirs.count() == 0) return write_zero(be, p, out);
  Matrix<T> pv = polar_of_factor(be, dirs.right_matrix(be));
  // Wide: [U_k, U_perp polar(W)] is orthonormal already.
  Matrix<T> pu = wide ? dirs.left_matrix(be) : polar_of_factor(be, dirs.left_matrix(be));
  write_product(be, pv, pu, mean_of(dirs.sigma), out);
}

}  // namespace

template <class T>
void iso_cts(Backend<T>& be, const MatrixProblem<T>& p, const MatrixOptions& opt, T* out) {
  // Checked before any work (the sizes themselves come from the sum's spectrum).
  iso_cts_sizes(std::min(p.rows, p.cols), static_cast<int>(p.deltas.size()),
                opt.common_space_fraction);
  const T cut_factor = rank_cut_factor<T>(opt.rank_tol);
  if (gram_route<T>(opt.route)) {
    note_route("iso_cts: Gram route");
    return iso_cts_gram(be, p, opt.common_space_fraction, cut_factor, out);
  }
  note_route("iso_cts: SVD route");
  iso_cts_direct(be, p, opt.common_space_fraction, cut_factor, out);
}

template void iso_cts<float>(Backend<float>&, const MatrixProblem<float>&, const MatrixOptions&,
                             float*);
template void iso_cts<double>(Backend<double>&, const MatrixProblem<double>&,
                              const MatrixOptions&, double*);

}  // namespace isofast
