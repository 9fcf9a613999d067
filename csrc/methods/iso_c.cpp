// Iso-C: M = sigma_bar * polar(D) for the task sum D = sum_t D_t, sigma_bar the mean of its
// singular values above the rank cut (docs/ALGORITHMS.md). Two routes:
//   direct  thin SVD of the sum (float64 compute);
//   gram    eigenpairs of the float64 Gram of the sum's short side; polar(D) = W D (or D W)
//           with W = Z S^-1 Z^T kept in float64 (float32 compute). Beyond cond 1e6 the Gram no
//           longer resolves the small directions: the direct route in float64 takes over.
#include <algorithm>
#include <cmath>

#include "../core/route_log.hpp"
#include "../linalg/gram.hpp"
#include "method_kit.hpp"

namespace isofast {
namespace {

// Iso-C of the sum by an SVD on backend `be` (T or its float64 twin); the sum is spent.
template <class C>
void iso_c_by_svd(Backend<C>& be, Matrix<C>& sum, double cut_factor, C* out) {
  const int rows = sum.rows(), cols = sum.cols();
  ThinSvd<C> f = thin_svd(be, rows, cols, sum.ptr(), sum.ld());
  const C smax = f.s.empty() ? C(0) : f.s[0];
  const int q = count_above(f.s, static_cast<int>(f.s.size()), smax * static_cast<C>(cut_factor));
  if (q == 0) {
    be.fill(rows, cols, C(0), out, rows);
    return;
  }
  f.s.resize(static_cast<size_t>(q));
  be.gemm(false, false, rows, cols, q, mean_of(f.s), f.u.ptr(), f.u.ld(), f.vt.ptr(), f.vt.ld(),
          C(0), out, rows);
}

// Iso-C of a sum too ill-conditioned for its float64 Gram (cond > 1e6): the SVD in float64,
// whatever T is. A float32 SVD there loses about cond * eps32 (a square sum of cond 3e5:
// 2.4e-2 from float64, against 8e-3 for the float32 torch.linalg.svd loop); in float64 only
// the rounding of the float32 sum itself remains.
template <class T>
void iso_c_by_svd_f64(Backend<T>& be, Matrix<T>& sum, double cut_factor, T* out) {
  Matrix<double> sum64 = widened(be, sum);
  sum.release();
  Matrix<double> m64 = be.f64().matrix(sum64.rows(), sum64.cols());
  iso_c_by_svd<double>(be.f64(), sum64, cut_factor, m64.ptr());
  be.from_f64(m64.rows(), m64.cols(), m64.ptr(), m64.ld(), out, m64.rows());
}

template <class T>
void iso_c_gram(Backend<T>& be, const MatrixProblem<T>& p, Matrix<T>& sum, double cut_factor,
                T* out) {
  const int n = p.rows, m = p.cols, r = std::min(m, n);
  const bool wide = m <= n;
  // Eigenpairs of the short-side Gram: D D^T = U S^2 U^T (wide) or D^T D = V S^2 V^T (tall).
  TopSingular t = top_singular(be.f64(), gram64(be, sum.ptr(), n, m, n, wide), r);
  if (!(t.eig[0] > 0) || !(t.eig[r - 1] > 1e-12 * t.eig[0])) {
    note_route("iso_c: sum too ill-conditioned for its Gram (cond > 1e6): float64 SVD");
    return iso_c_by_svd_f64(be, sum, cut_factor, out);
  }
  const std::vector<T> sigma = rounded<T>(t.sigma, r);
  const int q = count_above(sigma, r, sigma[0] * static_cast<T>(cut_factor));
  if (q == 0) return write_zero(be, p, out);
  const T sigma_bar = mean_of(std::vector<T>(sigma.begin(), sigma.begin() + q));
  // W = Z_q S_q^{-1} Z_q^T; polar(D) = W D (wide) or D W (tall); in X layout M^T = X W or W X.
  Backend<double>& be64 = be.f64();
  Matrix<double> zs = be64.matrix(r, q);
  be64.copy(r, q, t.vectors.ptr(), t.vectors.ld(), zs.ptr(), zs.ld());
  be64.scale_columns(r, q, zs.ptr(), zs.ld(), t.sigma, true);
  Matrix<double> w = be64.matrix(r, r);
  be64.gemm(false, true, r, r, q, 1.0, zs.ptr(), zs.ld(), t.vectors.ptr(), t.vectors.ld(), 0.0,
            w.ptr(), w.ld());
  apply_f64(be, sum, w, !wide, static_cast<double>(sigma_bar), out, n);
}

}  // namespace

template <class T>
void iso_c(Backend<T>& be, const MatrixProblem<T>& p, const MatrixOptions& opt, T* out) {
  Matrix<T> sum = sum_of(be, p);
  p.done_with_deltas();
  const double cut = static_cast<double>(rank_cut_factor<T>(opt.rank_tol));
  if (gram_route<T>(opt.route)) {
    note_route("iso_c: Gram route");
    return iso_c_gram(be, p, sum, cut, out);
  }
  note_route("iso_c: SVD route");
  iso_c_by_svd<T>(be, sum, cut, out);
}

template void iso_c<float>(Backend<float>&, const MatrixProblem<float>&, const MatrixOptions&,
                           float*);
template void iso_c<double>(Backend<double>&, const MatrixProblem<double>&, const MatrixOptions&,
                            double*);

}  // namespace isofast
