// The linear-algebra interface every matrix method is written against, once for all devices.
// A Backend<T> owns the memory it hands out (host memory for the CPU backend, device memory
// for CUDA) and offers every primitive the methods need, so method code never loops over
// matrix data itself and never names a device. Matrices are column-major with a leading
// dimension, as BLAS/LAPACK want them.
#pragma once
#include <cstddef>
#include <memory>
#include <vector>

namespace isofast {

// A rows x cols column-major matrix in some backend's memory, or a view of some of its
// columns. Copies share the memory (shared ownership): take views, never deep copies.
template <class T>
class Matrix {
 public:
  Matrix() = default;
  Matrix(std::shared_ptr<T> memory, int rows, int cols)
      : memory_(std::move(memory)), data_(memory_.get()), rows_(rows), cols_(cols), ld_(rows) {}

  int rows() const { return rows_; }
  int cols() const { return cols_; }
  int ld() const { return ld_ > 0 ? ld_ : 1; }
  size_t size() const { return static_cast<size_t>(rows_) * static_cast<size_t>(cols_); }
  bool empty() const { return rows_ == 0 || cols_ == 0; }
  T* ptr() const { return data_; }
  T* col(int j) const { return data_ + static_cast<size_t>(j) * ld(); }
  // Columns [from, from + count) as a view of the same memory.
  Matrix columns(int from, int count) const {
    Matrix v = *this;
    v.data_ = col(from);
    v.cols_ = count;
    return v;
  }
  // Give the memory back now (the matrix becomes empty).
  void release() { *this = Matrix(); }

 private:
  std::shared_ptr<T> memory_;
  T* data_ = nullptr;
  int rows_ = 0, cols_ = 0, ld_ = 0;
};

template <class T>
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // The float64 backend on the same device: float64 Grams and fallbacks of float32 methods.
  virtual Backend<double>& f64() = 0;

  // ---- memory (uninitialised; `zeros` fills) ----
  virtual std::shared_ptr<T> allocate(size_t count) = 0;
  Matrix<T> matrix(int rows, int cols) {
    return Matrix<T>(allocate(static_cast<size_t>(rows) * static_cast<size_t>(cols)), rows, cols);
  }
  Matrix<T> zeros(int rows, int cols) {
    Matrix<T> m = matrix(rows, cols);
    fill(rows, cols, T(0), m.ptr(), m.ld());
    return m;
  }

  // ---- data movement and element-wise work ----
  // B = A (rows x cols), or B = A^T (B is cols x rows) when transpose.
  virtual void copy(int rows, int cols, const T* a, int lda, T* b, int ldb,
                    bool transpose = false) = 0;
  // B (float64, this device) = A, and back (rounded to nearest).
  virtual void to_f64(int rows, int cols, const T* a, int lda, double* b, int ldb) = 0;
  virtual void from_f64(int rows, int cols, const double* a, int lda, T* b, int ldb) = 0;
  virtual void fill(int rows, int cols, T value, T* a, int lda) = 0;
  // y += x over n contiguous elements.
  virtual void add(size_t n, const T* x, T* y) = 0;
  // Column j of A times f[j] (or divided by it, 0 where f[j] is not > 0); f is host memory.
  virtual void scale_columns(int rows, int cols, T* a, int lda, const std::vector<double>& f,
                             bool divide) = 0;
  // n elements to the host (small vectors: singular values, eigenvalues).
  virtual std::vector<T> to_host(const T* a, size_t n) = 0;

  // ---- BLAS / LAPACK ----
  // C = alpha * op(A) * op(B) + beta * C, op(X) = X or X^T; C is m x n, inner size k.
  virtual void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a,
                    int lda, const T* b, int ldb, T beta, T* c, int ldc) = 0;
  // Lower triangle of C = alpha * A A^T + beta * C (trans = false, A is n x k) or
  // C = alpha * A^T A + beta * C (trans = true, A is k x n).
  virtual void syrk(bool trans, int n, int k, T alpha, const T* a, int lda, T beta, T* c,
                    int ldc) = 0;
  // Thin SVD (never the QR-iteration gesvd). A (m x n) is destroyed. s gets r = min(m, n)
  // values in descending order (this device's memory), u is m x r, vt is r x n.
  virtual void svd(int m, int n, T* a, int lda, T* s, T* u, int ldu, T* vt, int ldvt) = 0;
  // Leading `count` eigenpairs (largest first) of the symmetric n x n A (lower triangle read,
  // destroyed); w (this device's memory) gets the eigenvalues, z the vectors.
  virtual void eigh_top(int n, T* a, int lda, int count, T* w, T* z, int ldz) = 0;
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
