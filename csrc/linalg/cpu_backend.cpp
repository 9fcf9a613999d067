// Backend on OpenBLAS + LAPACK from the scipy-openblas32 wheel (symbols carry a scipy_ prefix).
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include <cblas.h>
#include <lapacke.h>

#include "backend.hpp"
#include "check.hpp"

namespace isofast {
namespace {

// Non-finite input makes gesdd loop or return garbage on some builds: refuse it first.
template <class T>
void require_finite(const char* routine, int m, int n, const T* a, int lda) {
  for (int j = 0; j < n; ++j) {
    const T* c = a + static_cast<size_t>(j) * lda;
    T acc = 0;
    for (int i = 0; i < m; ++i) acc += c[i] - c[i];
    if (!(acc == 0)) check_solver_info(routine, -4, m, n);
  }
}

template <class T>
struct Lapack;

template <>
struct Lapack<float> {
  static constexpr const char* gesdd_name = "sgesdd";
  static constexpr const char* syevr_name = "ssyevr";
  static void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, float alpha,
                   const float* a, int lda, const float* b, int ldb, float beta, float* c,
                   int ldc) {
    scipy_cblas_sgemm(CblasColMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  static void syrk(CBLAS_TRANSPOSE t, int n, int k, float alpha, const float* a, int lda,
                   float beta, float* c, int ldc) {
    scipy_cblas_ssyrk(CblasColMajor, CblasLower, t, n, k, alpha, a, lda, beta, c, ldc);
  }
  static int gesdd(int m, int n, float* a, int lda, float* s, float* u, int ldu, float* vt,
                   int ldvt, float* work, int lwork, int* iwork) {
    return scipy_LAPACKE_sgesdd_work(LAPACK_COL_MAJOR, 'S', m, n, a, lda, s, u, ldu, vt, ldvt,
                                     work, lwork, iwork);
  }
  static int syevr(char range, int n, float* a, int lda, int il, int iu, int* found, float* w,
                   float* z, int ldz, int* isuppz, float* work, int lwork, int* iwork, int liwork) {
    return scipy_LAPACKE_ssyevr_work(LAPACK_COL_MAJOR, 'V', range, 'L', n, a, lda, 0.f, 0.f, il,
                                     iu, 0.f, found, w, z, ldz, isuppz, work, lwork, iwork,
                                     liwork);
  }
};

template <>
struct Lapack<double> {
  static constexpr const char* gesdd_name = "dgesdd";
  static constexpr const char* syevr_name = "dsyevr";
  static void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, double alpha,
                   const double* a, int lda, const double* b, int ldb, double beta, double* c,
                   int ldc) {
    scipy_cblas_dgemm(CblasColMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  static void syrk(CBLAS_TRANSPOSE t, int n, int k, double alpha, const double* a, int lda,
                   double beta, double* c, int ldc) {
    scipy_cblas_dsyrk(CblasColMajor, CblasLower, t, n, k, alpha, a, lda, beta, c, ldc);
  }
  static int gesdd(int m, int n, double* a, int lda, double* s, double* u, int ldu, double* vt,
                   int ldvt, double* work, int lwork, int* iwork) {
    return scipy_LAPACKE_dgesdd_work(LAPACK_COL_MAJOR, 'S', m, n, a, lda, s, u, ldu, vt, ldvt,
                                     work, lwork, iwork);
  }
  static int syevr(char range, int n, double* a, int lda, int il, int iu, int* found, double* w,
                   double* z, int ldz, int* isuppz, double* work, int lwork, int* iwork, int liwork) {
    return scipy_LAPACKE_dsyevr_work(LAPACK_COL_MAJOR, 'V', range, 'L', n, a, lda, 0.0, 0.0, il,
                                     iu, 0.0, found, w, z, ldz, isuppz, work, lwork, iwork,
                                     liwork);
  }
};

template <class T>
class CpuBackend final : public Backend<T> {
 public:
  const char* name() const override { return "cpu"; }
  Backend<double>& f64() override { return cpu_backend_f64(); }

  std::shared_ptr<T> allocate(size_t count) override {
    // Value-initialised like the std::vector scratch it replaces: a fresh page is zeroed by
    // the kernel anyway, and callers that need zeros rely on nothing else.
    return std::shared_ptr<T>(new T[count > 0 ? count : 1](), std::default_delete<T[]>());
  }

  void copy(int rows, int cols, const T* a, int lda, T* b, int ldb, bool transpose) override {
    if (!transpose) {
      for (int j = 0; j < cols; ++j)
        std::copy(a + static_cast<size_t>(j) * lda, a + static_cast<size_t>(j) * lda + rows,
                  b + static_cast<size_t>(j) * ldb);
      return;
    }
    constexpr int kTile = 32;  // tiles keep both sides in cache
    for (int j0 = 0; j0 < cols; j0 += kTile)
      for (int i0 = 0; i0 < rows; i0 += kTile)
        for (int j = j0; j < std::min(cols, j0 + kTile); ++j)
          for (int i = i0; i < std::min(rows, i0 + kTile); ++i)
            b[j + static_cast<size_t>(i) * ldb] = a[i + static_cast<size_t>(j) * lda];
  }

  void to_f64(int rows, int cols, const T* a, int lda, double* b, int ldb) override {
    for (int j = 0; j < cols; ++j)
      std::transform(a + static_cast<size_t>(j) * lda, a + static_cast<size_t>(j) * lda + rows,
                     b + static_cast<size_t>(j) * ldb, [](T v) { return static_cast<double>(v); });
  }

  void from_f64(int rows, int cols, const double* a, int lda, T* b, int ldb) override {
    for (int j = 0; j < cols; ++j)
      std::transform(a + static_cast<size_t>(j) * lda, a + static_cast<size_t>(j) * lda + rows,
                     b + static_cast<size_t>(j) * ldb, [](double v) { return static_cast<T>(v); });
  }

  void fill(int rows, int cols, T value, T* a, int lda) override {
    for (int j = 0; j < cols; ++j)
      std::fill(a + static_cast<size_t>(j) * lda, a + static_cast<size_t>(j) * lda + rows, value);
  }

  void add(size_t n, const T* x, T* y) override {
    for (size_t i = 0; i < n; ++i) y[i] += x[i];
  }

  void scale_columns(int rows, int cols, T* a, int lda, const std::vector<double>& f,
                     bool divide) override {
    for (int j = 0; j < cols; ++j) {
      const double fj = divide ? (f[j] > 0 ? 1.0 / f[j] : 0.0) : f[j];
      T* c = a + static_cast<size_t>(j) * lda;
      if (std::is_same_v<T, double>)
        for (int i = 0; i < rows; ++i) c[i] = static_cast<T>(c[i] * fj);
      else  // one rounding of the float32 factor, as the float32 loops always did
        for (int i = 0; i < rows; ++i) c[i] *= static_cast<T>(fj);
    }
  }

  std::vector<T> to_host(const T* a, size_t n) override { return std::vector<T>(a, a + n); }

  void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda,
            const T* b, int ldb, T beta, T* c, int ldc) override {
    if (m == 0 || n == 0) return;
    Lapack<T>::gemm(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m,
                    n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  void syrk(bool trans, int n, int k, T alpha, const T* a, int lda, T beta, T* c,
            int ldc) override {
    if (n == 0) return;
    Lapack<T>::syrk(trans ? CblasTrans : CblasNoTrans, n, k, alpha, a, lda, beta, c, ldc);
  }

  void svd(int m, int n, T* a, int lda, T* s, T* u, int ldu, T* vt, int ldvt) override {
    const int r = std::min(m, n);
    if (r == 0) return;
    require_finite(Lapack<T>::gesdd_name, m, n, a, lda);
    std::vector<int> iwork(8 * static_cast<size_t>(r));
    T query = 0;
    int info = Lapack<T>::gesdd(m, n, a, lda, s, u, ldu, vt, ldvt, &query, -1, iwork.data());
    check_solver_info(Lapack<T>::gesdd_name, info, m, n);
    std::vector<T> work(static_cast<size_t>(query) + 1);
    info = Lapack<T>::gesdd(m, n, a, lda, s, u, ldu, vt, ldvt, work.data(),
                            static_cast<int>(work.size()), iwork.data());
    check_solver_info(Lapack<T>::gesdd_name, info, m, n);
  }

  void eigh_top(int n, T* a, int lda, int count, T* w, T* z, int ldz) override {
    if (count <= 0) return;
    require_finite(Lapack<T>::syevr_name, n, n, a, lda);
    // Past half the spectrum, a subset costs more than everything: syevr then takes the
    // bisection + inverse-iteration path (measured 2-3x slower for the top 80% at n = 768..2048,
    // OpenBLAS 0.3.x), while range 'A' runs MRRR.
    const bool all = 2 * count > n;
    const char range = all ? 'A' : 'I';
    const int il = n - count + 1, iu = n, cols = all ? n : count;
    std::vector<T> zall(all ? static_cast<size_t>(n) * n : 0);
    T* zout = all ? zall.data() : z;
    const int ldzout = all ? n : ldz;
    int found = 0;
    std::vector<int> isuppz(2 * static_cast<size_t>(cols));
    std::vector<T> wall(static_cast<size_t>(n));
    T wquery = 0;
    int iquery = 0;
    int info = Lapack<T>::syevr(range, n, a, lda, il, iu, &found, wall.data(), zout, ldzout,
                                isuppz.data(), &wquery, -1, &iquery, -1);
    check_solver_info(Lapack<T>::syevr_name, info, n, n);
    std::vector<T> work(static_cast<size_t>(wquery) + 1);
    std::vector<int> iwork(static_cast<size_t>(iquery) + 1);
    info = Lapack<T>::syevr(range, n, a, lda, il, iu, &found, wall.data(), zout, ldzout,
                            isuppz.data(), work.data(), static_cast<int>(work.size()),
                            iwork.data(), static_cast<int>(iwork.size()));
    check_solver_info(Lapack<T>::syevr_name, info, n, n);
    if (found != cols) check_solver_info(Lapack<T>::syevr_name, n + 1, n, n);
    // syevr returns ascending order; callers want the top `count`, descending.
    for (int j = 0; j < count; ++j) {
      const T* src = zout + static_cast<size_t>(cols - 1 - j) * ldzout;
      w[j] = wall[cols - 1 - j];
      if (all) std::copy(src, src + n, z + static_cast<size_t>(j) * ldz);
    }
    if (!all)
      for (int j = 0; j < count / 2; ++j)
        std::swap_ranges(z + static_cast<size_t>(j) * ldz, z + static_cast<size_t>(j) * ldz + n,
                         z + static_cast<size_t>(count - 1 - j) * ldz);
  }
};

}  // namespace

Backend<float>& cpu_backend_f32() {
  static CpuBackend<float> backend;
  return backend;
}
Backend<double>& cpu_backend_f64() {
  static CpuBackend<double> backend;
  return backend;
}

void set_blas_threads(int threads) { scipy_openblas_set_num_threads(std::max(1, threads)); }
int get_blas_threads() { return scipy_openblas_get_num_threads(); }
const char* blas_config() { return scipy_openblas_get_config(); }

}  // namespace isofast
