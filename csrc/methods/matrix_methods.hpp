// Matrix merging methods (TSV-M, Iso-C, Iso-CTS) on one 2-D key.
//
// Layout: a row-major m x n task matrix D is, in memory, the column-major n x m matrix
// X = D^T. The kernels work on X directly (rows = n, cols = m, leading dimension rows), so no
// transposition is ever copied. TSV-M and Iso-C are transpose-equivariant; Iso-CTS projects
// out D's *left* common subspace, which is X's *right* one (rows of X's V^T).
#pragma once
#include <functional>
#include <utility>
#include <vector>

#include "../linalg/backend.hpp"

namespace isofast {

template <class T>
struct MatrixProblem {
  int rows = 0, cols = 0;           // of X = D^T
  std::vector<const T*> deltas;     // T task matrices, column-major, ld = rows
  // Called once a method no longer reads `deltas` (they may be freed then): frees T copies
  // before the factor and polar stages, which sets the peak memory of big matrices.
  std::function<void()> release_deltas;
  void done_with_deltas() const {
    if (release_deltas) release_deltas();
  }
};

// Iso-CTS sizes (docs/CONTRACT.md): returns (k, s) for r = min(m, n), T tasks, fraction f.
std::pair<int, int> iso_cts_sizes(int r, int tasks, double fraction);

// Exact restructured routes (docs/ALGORITHMS.md section 10) for compute type float: float64
// Gram matrices of the short side + subset eigensolver instead of full SVDs, and for Iso-CTS
// with m <= n the complement U_perp = U[:, k:] with a small U-side polar. Same math, fewer
// flops; "direct" routes (one gesdd per step, as docs/ALGORITHMS.md section 8 states it)
// remain for float64.
template <class T>
void iso_cts_gram(Backend<T>& be, const MatrixProblem<T>& p, double fraction, double rank_tol,
                  T* out);
template <class T>
void iso_c_gram(Backend<T>& be, const MatrixProblem<T>& p, double rank_tol, T* out);
template <class T>
void tsv_m_gram(Backend<T>& be, const MatrixProblem<T>& p, double rank_tol, T* out);

// Each writes the merged update M (as X-layout, column-major rows x cols) into `out`.
template <class T>
void iso_c(Backend<T>& be, const MatrixProblem<T>& p, double rank_tol, T* out);
template <class T>
void iso_cts(Backend<T>& be, const MatrixProblem<T>& p, double fraction, double rank_tol, T* out);
template <class T>
void tsv_m(Backend<T>& be, const MatrixProblem<T>& p, double rank_tol, T* out);

}  // namespace isofast
