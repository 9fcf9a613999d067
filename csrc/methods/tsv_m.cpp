// TSV-M: per task the top d = floor(r / T) singular triplets, concatenated; both factors
// orthogonalised and the task singular values kept: M = polar(U_cat) S_cat polar(V_cat)^T
// (docs/ALGORITHMS.md). Routes:
//   direct  one SVD per task, polar factors by SVD (float64);
//   gram    top-d eigenpairs of each task's float64 short-side Gram, the other side by one
//           product, polar factors from float64 Grams (float32).
#include <algorithm>

#include "../core/route_log.hpp"
#include "../linalg/gram.hpp"
#include "method_kit.hpp"

namespace isofast {
namespace {

template <class T>
void tsv_m_direct(Backend<T>& be, const MatrixProblem<T>& p, int d, T cut_factor, T* out) {
  DirectionSet<T> dirs(p.rows, p.cols);
  for (const T* delta : p.deltas) {
    if (d == 0) break;
    ThinSvd<T> task = thin_svd(be, p.rows, p.cols, delta, p.rows);
    const T smax = task.s.empty() ? T(0) : task.s[0];
    dirs.add_svd(be, task, count_above(task.s, d, smax * cut_factor));
  }
  p.done_with_deltas();
  if (dirs.count() == 0) return write_zero(be, p, out);
  Matrix<T> pl = polar(be, dirs.left_matrix(be));
  Matrix<T> pr = polar(be, dirs.right_matrix(be));
  be.scale_columns(pl.rows(), pl.cols(), pl.ptr(), pl.ld(),
                   std::vector<double>(dirs.sigma.begin(), dirs.sigma.end()), false);
  write_product(be, pl, pr, T(1), out);
}

template <class T>
void tsv_m_gram(Backend<T>& be, const MatrixProblem<T>& p, int d, T cut_factor, T* out) {
  const int n = p.rows, m = p.cols;
  const bool wide = m <= n;
  DirectionSet<T> dirs(m, n);  // of D: left = U (m rows), right = V (n rows)
  for (const T* x : p.deltas) {
    if (d == 0) break;
    const TopSingular t = top_singular(be.f64(), gram64(be, x, n, m, n, wide), d);
    const std::vector<T> sig = rounded<T>(t.sigma, t.count());
    const int keep = count_above(sig, d, (sig.empty() ? T(0) : sig[0]) * cut_factor);
    std::vector<T> kept(sig.begin(), sig.begin() + keep);
    Matrix<T> known = rounded(be, t.vectors.columns(0, keep));
    // wide: u known, v = D^T u / s = X u / s; tall: v known, u = D v / s = X^T v / s.
    Matrix<T> other = be.matrix(wide ? n : m, keep);
    be.gemm(!wide, false, other.rows(), keep, wide ? m : n, T(1), x, n, known.ptr(), known.ld(),
            T(0), other.ptr(), other.ld());
    be.scale_columns(other.rows(), keep, other.ptr(), other.ld(),
                     std::vector<double>(kept.begin(), kept.end()), true);
    if (wide)
      dirs.add(kept, known, other);
    else
      dirs.add(kept, other, known);
  }
  p.done_with_deltas();
  if (dirs.count() == 0) return write_zero(be, p, out);
  Matrix<T> pu = polar_of_factor(be, dirs.left_matrix(be));
  Matrix<T> pv = polar_of_factor(be, dirs.right_matrix(be));
  be.scale_columns(pv.rows(), pv.cols(), pv.ptr(), pv.ld(),
                   std::vector<double>(dirs.sigma.begin(), dirs.sigma.end()), false);
  write_product(be, pv, pu, T(1), out);
}

}  // namespace

template <class T>
void tsv_m(Backend<T>& be, const MatrixProblem<T>& p, const MatrixOptions& opt, T* out) {
  const int d = std::min(p.rows, p.cols) / static_cast<int>(p.deltas.size());
  const T cut_factor = rank_cut_factor<T>(opt.rank_tol);
  if (gram_route<T>(opt.route)) {
    note_route("tsv_m: Gram route");
    return tsv_m_gram(be, p, d, cut_factor, out);
  }
  note_route("tsv_m: SVD route");
  tsv_m_direct(be, p, d, cut_factor, out);
}

template void tsv_m<float>(Backend<float>&, const MatrixProblem<float>&, const MatrixOptions&,
                           float*);
template void tsv_m<double>(Backend<double>&, const MatrixProblem<double>&, const MatrixOptions&,
                            double*);

}  // namespace isofast
