// The small linear-algebra interface every matrix method is written against. Matrices are
// column-major with a leading dimension, as BLAS/LAPACK want them. The CPU backend wraps
// OpenBLAS/LAPACK; a CUDA backend implements the same interface on cuBLAS/cuSOLVER.
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

namespace isofast {

template <class T>
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;

  // C = alpha * op(A) * op(B) + beta * C, op(X) = X or X^T; C is m x n, inner size k.
  virtual void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a,
                    int lda, const T* b, int ldb, T beta, T* c, int ldc) = 0;

  // Lower triangle of C = alpha * A A^T + beta * C (trans = false, A is n x k) or
  // C = alpha * A^T A + beta * C (trans = true, A is k x n).
  virtual void syrk(bool trans, int n, int k, T alpha, const T* a, int lda, T beta, T* c,
                    int ldc) = 0;

  // Thin SVD by divide and conquer (gesdd; never gesvd). A (m x n) is destroyed.
  // s gets r = min(m, n) values in descending order, u is m x r, vt is r x n.
  virtual void svd(int m, int n, T* a, int lda, T* s, T* u, int ldu, T* vt, int ldvt) = 0;

  // Leading `count` eigenpairs (largest eigenvalues, returned in descending order) of the
  // symmetric n x n matrix A (lower triangle read, destroyed). Used on float64 Gram matrices.
  virtual void eigh_top(int n, T* a, int lda, int count, T* w, T* z, int ldz) = 0;
};

// Column-major scratch matrix owned by the caller (host memory for the CPU backend).
template <class T>
struct Matrix {
  int rows = 0, cols = 0;
  std::vector<T> data;
  Matrix() = default;
  Matrix(int r, int c) : rows(r), cols(c), data(static_cast<size_t>(r) * c) {}
  T* ptr() { return data.data(); }
  const T* ptr() const { return data.data(); }
  T* col(int j) { return data.data() + static_cast<size_t>(j) * rows; }
  const T* col(int j) const { return data.data() + static_cast<size_t>(j) * rows; }
  int ld() const { return rows > 0 ? rows : 1; }
};

Backend<float>& cpu_backend_f32();
Backend<double>& cpu_backend_f64();

template <class T>
Backend<T>& cpu_backend();
template <>
inline Backend<float>& cpu_backend<float>() { return cpu_backend_f32(); }
template <>
inline Backend<double>& cpu_backend<double>() { return cpu_backend_f64(); }

// Threads OpenBLAS uses inside one call.
void set_blas_threads(int threads);
int get_blas_threads();
const char* blas_config();

}  // namespace isofast
