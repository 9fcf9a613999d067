// Matrix merging methods (TSV-M, Iso-C, Iso-CTS) on one 2-D key, written once against
// Backend<T> (csrc/linalg/backend.hpp): the CPU and the CUDA backend run the same code.
// One file per method (iso_c.cpp, iso_cts.cpp, tsv_m.cpp), each holding its routes.
//
// Layout: a row-major m x n task matrix D is, in memory, the column-major n x m matrix
// X = D^T. The methods work on X directly (rows = n, cols = m, leading dimension rows), so no
// transposition is ever copied. TSV-M and Iso-C are transpose-equivariant; Iso-CTS projects
// out D's *left* common subspace, which is X's *right* one (rows of X's V^T).
#pragma once
#include <functional>
#include <utility>
#include <vector>

#include "../linalg/backend.hpp"

namespace isofast {

// "gram": float64 Gram matrices of the short side + a subset eigensolver instead of full
// SVDs (docs/ALGORITHMS.md), float32's accurate and fast route. "direct": one SVD per step,
// as the method's definition states it (float64's route: a float64 Gram cannot match a
// float64 SVD). "auto": gram for float32, direct for float64.
enum class MatrixRoute { Auto, Gram, Direct };

struct MatrixOptions {
  double rank_tol = -1.0;  // < 0: the default 16 * eps of the compute dtype
  double common_space_fraction = 0.8;  // Iso-CTS
  MatrixRoute route = MatrixRoute::Auto;
};

template <class T>
struct MatrixProblem {
  int rows = 0, cols = 0;        // of X = D^T
  std::vector<const T*> deltas;  // T task matrices in the backend's memory, ld = rows
  // Called once a method no longer reads `deltas` (they may be freed then): frees T copies
  // before the factor and polar stages, which sets the peak memory of big matrices.
  std::function<void()> release_deltas;
  void done_with_deltas() const {
    if (release_deltas) release_deltas();
  }
};

// Iso-CTS sizes (docs/CONTRACT.md): returns (k, s) for r = min(m, n), T tasks, fraction f.
std::pair<int, int> iso_cts_sizes(int r, int tasks, double fraction);

// Each writes the merged update M (X layout, column-major rows x cols, leading dimension
// rows) into `out`, in the backend's memory.
template <class T>
void iso_c(Backend<T>& be, const MatrixProblem<T>& p, const MatrixOptions& opt, T* out);
template <class T>
void iso_cts(Backend<T>& be, const MatrixProblem<T>& p, const MatrixOptions& opt, T* out);
template <class T>
void tsv_m(Backend<T>& be, const MatrixProblem<T>& p, const MatrixOptions& opt, T* out);

// The route a method takes for compute type T (logged by the methods).
template <class T>
bool gram_route(MatrixRoute route) {
  return route == MatrixRoute::Gram || (route == MatrixRoute::Auto && sizeof(T) == 4);
}

}  // namespace isofast
