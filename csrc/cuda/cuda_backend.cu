#include "cuda_backend.cuh"

#include <algorithm>
#include <type_traits>

#include "../linalg/check.hpp"
#include "kernels.cuh"

namespace isofast {

// ------------------------------------------------------------------------------ context

CudaContext::CudaContext(cudaStream_t stream) : stream_(stream) {
  // Every per-call buffer comes from cudaMallocAsync's default pool. With its default release
  // threshold (0) the pool hands its memory back at each synchronisation and the next call
  // maps it again; keep up to kPoolKeepBytes between calls (release() trims it to zero).
  {
    int device = 0;
    cudaMemPool_t pool = nullptr;
    ISOFAST_CUDA_CHECK(cudaGetDevice(&device));
    ISOFAST_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
    uint64_t keep = kPoolKeepBytes, current = 0;
    ISOFAST_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &current));
    if (current < keep)
      ISOFAST_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  }
  // Create in order; on failure the destructor is not run, so undo by hand.
  ISOFAST_CUBLAS_CHECK(cublasCreate(&blas_));
  try {
    ISOFAST_CUBLAS_CHECK(cublasSetStream(blas_, stream_));
    ISOFAST_CUBLAS_CHECK(cublasSetPointerMode(blas_, CUBLAS_POINTER_MODE_HOST));
    ISOFAST_CUSOLVER_CHECK(cusolverDnCreate(&solver_));
    ISOFAST_CUSOLVER_CHECK(cusolverDnSetStream(solver_, stream_));
    ISOFAST_CUSOLVER_CHECK(cusolverDnCreateParams(&params_));
  } catch (...) {
    if (params_) cusolverDnDestroyParams(params_);
    if (solver_) cusolverDnDestroy(solver_);
    cublasDestroy(blas_);
    throw;
  }
}

CudaContext::~CudaContext() {
  // Buffers free themselves (stream-ordered); handles last. Errors cannot be thrown here.
  if (params_) cusolverDnDestroyParams(params_);
  if (solver_) cusolverDnDestroy(solver_);
  if (blas_) cublasDestroy(blas_);
}

int CudaContext::read_info() {
  int host = 0;
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(&host, device_info(), sizeof(int), cudaMemcpyDeviceToHost, stream_));
  ISOFAST_CUDA_CHECK(cudaStreamSynchronize(stream_));
  return host;
}

void CudaContext::synchronize() { ISOFAST_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

std::string cuda_device_name(int device) {
  cudaDeviceProp prop{};
  ISOFAST_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

bool cuda_available() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of a failed query
    return false;
  }
  return count > 0;
}

// ------------------------------------------------------------------------------ backend

namespace {

inline cublasOperation_t op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

template <class T>
constexpr cudaDataType_t data_type() {
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_64F;
}

}  // namespace

template <class T>
void CudaBackend<T>::gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a,
                          int lda, const T* b, int ldb, T beta, T* c, int ldc) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>)
    ISOFAST_CUBLAS_CHECK(cublasSgemm(ctx_.blas(), op(trans_a), op(trans_b), m, n, k, &alpha, a,
                                     lda, b, ldb, &beta, c, ldc));
  else
    ISOFAST_CUBLAS_CHECK(cublasDgemm(ctx_.blas(), op(trans_a), op(trans_b), m, n, k, &alpha, a,
                                     lda, b, ldb, &beta, c, ldc));
}

template <class T>
void CudaBackend<T>::syrk(bool trans, int n, int k, T alpha, const T* a, int lda, T beta, T* c,
                          int ldc) {
  if (n == 0) return;
  if constexpr (std::is_same_v<T, float>)
    ISOFAST_CUBLAS_CHECK(cublasSsyrk(ctx_.blas(), CUBLAS_FILL_MODE_LOWER, op(trans), n, k, &alpha,
                                     a, lda, &beta, c, ldc));
  else
    ISOFAST_CUBLAS_CHECK(cublasDsyrk(ctx_.blas(), CUBLAS_FILL_MODE_LOWER, op(trans), n, k, &alpha,
                                     a, lda, &beta, c, ldc));
}

template <class T>
void CudaBackend<T>::geam(bool trans_a, bool trans_b, int m, int n, T alpha, const T* a, int lda,
                          T beta, const T* b, int ldb, T* c, int ldc) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float>)
    ISOFAST_CUBLAS_CHECK(cublasSgeam(ctx_.blas(), op(trans_a), op(trans_b), m, n, &alpha, a, lda,
                                     &beta, b, ldb, c, ldc));
  else
    ISOFAST_CUBLAS_CHECK(cublasDgeam(ctx_.blas(), op(trans_a), op(trans_b), m, n, &alpha, a, lda,
                                     &beta, b, ldb, c, ldc));
}

template <class T>
Backend<double>& CudaBackend<T>::f64() {
  if constexpr (std::is_same_v<T, double>) {
    return *this;
  } else {
    if (!twin_) twin_ = std::make_unique<CudaBackend<double>>(ctx_);
    return *twin_;
  }
}

template <class T>
std::shared_ptr<T> CudaBackend<T>::allocate(size_t count) {
  cudaStream_t st = ctx_.stream();
  void* p = nullptr;
  ISOFAST_CUDA_CHECK(cudaMallocAsync(&p, sizeof(T) * std::max<size_t>(count, 1), st));
  // Stream-ordered free: the memory may go while kernels that read it are still queued.
  return std::shared_ptr<T>(static_cast<T*>(p), [st](T* q) { cudaFreeAsync(q, st); });
}

template <class T>
void CudaBackend<T>::copy(int rows, int cols, const T* a, int lda, T* b, int ldb, bool transpose) {
  if (rows == 0 || cols == 0) return;
  if (transpose) {  // B (cols x rows) = A^T, cuBLAS's in-place form (B = C, beta = 0)
    fill(cols, rows, T(0), b, ldb);  // fresh pool memory: no stale NaN may meet beta = 0
    geam(true, false, cols, rows, T(1), a, lda, T(0), b, ldb, b, ldb);
    return;
  }
  ISOFAST_CUDA_CHECK(cudaMemcpy2DAsync(b, sizeof(T) * ldb, a, sizeof(T) * lda, sizeof(T) * rows,
                                       cols, cudaMemcpyDeviceToDevice, ctx_.stream()));
}

template <class T>
void CudaBackend<T>::to_f64(int rows, int cols, const T* a, int lda, double* b, int ldb) {
  cuda::convert_2d<T, double>(rows, cols, a, lda, b, ldb, ctx_.stream());
}

template <class T>
void CudaBackend<T>::from_f64(int rows, int cols, const double* a, int lda, T* b, int ldb) {
  cuda::convert_2d<double, T>(rows, cols, a, lda, b, ldb, ctx_.stream());
}

template <class T>
void CudaBackend<T>::fill(int rows, int cols, T value, T* a, int lda) {
  cuda::fill_2d<T>(rows, cols, value, a, lda, ctx_.stream());
}

template <class T>
void CudaBackend<T>::add(size_t n, const T* x, T* y) {
  cuda::add<T>(n, x, y, ctx_.stream());
}

template <class T>
void CudaBackend<T>::scale_columns(int rows, int cols, T* a, int lda, const std::vector<double>& f,
                                   bool divide) {
  if (rows == 0 || cols == 0) return;
  cudaStream_t st = ctx_.stream();
  DeviceBuffer<double> factors(static_cast<size_t>(cols), st);
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(factors.get(), f.data(), sizeof(double) * cols,
                                     cudaMemcpyHostToDevice, st));
  cuda::scale_columns<T>(rows, cols, a, lda, factors.get(), divide, st);
  // The host vector may go once the copy is done: wait for it (a small synchronisation).
  ISOFAST_CUDA_CHECK(cudaStreamSynchronize(st));
}

template <class T>
std::vector<T> CudaBackend<T>::to_host(const T* a, size_t n) {
  std::vector<T> out(n);
  if (n == 0) return out;
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(out.data(), a, sizeof(T) * n, cudaMemcpyDeviceToHost,
                                     ctx_.stream()));
  ISOFAST_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream()));
  return out;
}

// Thin SVD by cusolverDnXgesvdp. It returns V (not V^T); for m < n it runs on A^T, whose
// SVD A^T = U' S V'^T gives U = V', V^T = U'^T.
template <class T>
void CudaBackend<T>::svd(int m, int n, T* a, int lda, T* s, T* u, int ldu, T* vt, int ldvt) {
  const int r = std::min(m, n);
  if (r == 0) return;
  cudaStream_t st = ctx_.stream();
  if (cuda::has_nonfinite(a, m, n, lda, st))
    throw LinAlgError(concat("cusolverDnXgesvdp on a ", m, " x ", n,
                             " matrix: the input holds NaN or Inf"));
  const bool wide = m < n;
  const int mm = wide ? n : m, nn = wide ? m : n;  // the tall problem: mm x nn, mm >= nn = r
  DeviceBuffer<T> at;                                // A^T when wide
  T* work_a = a;
  int ld_a = lda;
  if (wide) {
    at.reserve(static_cast<size_t>(mm) * nn, st);
    // beta = 0 with B = C (cuBLAS's in-place form); zeroed first so no stale NaN can leak.
    ISOFAST_CUDA_CHECK(cudaMemsetAsync(at.get(), 0, sizeof(T) * at.size(), st));
    geam(true, false, mm, nn, T(1), a, lda, T(0), at.get(), mm, at.get(), mm);
    work_a = at.get();
    ld_a = mm;
  }
  // Left vectors of the tall problem (mm x r) and its V (nn x r).
  DeviceBuffer<T> left_tmp, right_tmp;
  T* left = u;
  int ld_left = ldu;
  if (wide) {
    left_tmp.reserve(static_cast<size_t>(mm) * r, st);
    left = left_tmp.get();
    ld_left = mm;
  }
  T* right;
  int ld_right;
  if (wide) {  // V of A^T is U of A: write it straight into u (m x r = nn x r)
    right = u;
    ld_right = ldu;
  } else {
    right_tmp.reserve(static_cast<size_t>(nn) * r, st);
    right = right_tmp.get();
    ld_right = nn;
  }
  const cudaDataType_t dt = data_type<T>();
  size_t dev_bytes = 0, host_bytes = 0;
  ISOFAST_CUSOLVER_CHECK(cusolverDnXgesvdp_bufferSize(
      ctx_.solver(), ctx_.params(), CUSOLVER_EIG_MODE_VECTOR, 1, mm, nn, dt, work_a, ld_a, dt, s,
      dt, left, ld_left, dt, right, ld_right, dt, &dev_bytes, &host_bytes));
  void* dev_ws = ctx_.device_workspace(std::max<size_t>(dev_bytes, 1));
  void* host_ws = ctx_.host_workspace(std::max<size_t>(host_bytes, 1));
  double err_sigma = 0;
  ISOFAST_CUSOLVER_CHECK(cusolverDnXgesvdp(ctx_.solver(), ctx_.params(), CUSOLVER_EIG_MODE_VECTOR, 1,
                                           mm, nn, dt, work_a, ld_a, dt, s, dt, left, ld_left, dt,
                                           right, ld_right, dt, dev_ws, dev_bytes, host_ws,
                                           host_bytes, ctx_.device_info(), &err_sigma));
  check_solver_info("cusolverDnXgesvdp", ctx_.read_info(), m, n);
  err_sigma_ = err_sigma;
  // vt (r x n) = (V of the tall problem)^T when tall, (U' of A^T)^T when wide.
  // Zero vt first (beta = 0 with B = C, as above).
  ISOFAST_CUDA_CHECK(cudaMemset2DAsync(vt, sizeof(T) * static_cast<size_t>(ldvt), 0, sizeof(T) * r,
                                       static_cast<size_t>(n), st));
  if (wide)
    geam(true, false, r, n, T(1), left, ld_left, T(0), vt, ldvt, vt, ldvt);
  else
    geam(true, false, r, n, T(1), right, ld_right, T(0), vt, ldvt, vt, ldvt);
}

template <class T>
void CudaBackend<T>::eigh_top(int n, T* a, int lda, int count, T* w, T* z, int ldz) {
  if (count <= 0 || n == 0) return;
  ISOFAST_CHECK(count <= n, "eigh_top: count ", count, " > n ", n);
  cudaStream_t st = ctx_.stream();
  if (cuda::has_nonfinite(a, n, n, lda, st))
    throw LinAlgError(concat("cusolverDnXsyevd on a ", n, " x ", n,
                             " matrix: the input holds NaN or Inf"));
  const cudaDataType_t dt = data_type<T>();
  DeviceBuffer<T> wall(static_cast<size_t>(n), st);
  size_t dev_bytes = 0, host_bytes = 0;
  ISOFAST_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(ctx_.solver(), ctx_.params(),
                                                     CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER,
                                                     n, dt, a, lda, dt, wall.get(), dt, &dev_bytes,
                                                     &host_bytes));
  void* dev_ws = ctx_.device_workspace(std::max<size_t>(dev_bytes, 1));
  void* host_ws = ctx_.host_workspace(std::max<size_t>(host_bytes, 1));
  ISOFAST_CUSOLVER_CHECK(cusolverDnXsyevd(ctx_.solver(), ctx_.params(), CUSOLVER_EIG_MODE_VECTOR,
                                          CUBLAS_FILL_MODE_LOWER, n, dt, a, lda, dt, wall.get(), dt,
                                          dev_ws, dev_bytes, host_ws, host_bytes,
                                          ctx_.device_info()));
  check_solver_info("cusolverDnXsyevd", ctx_.read_info(), n, n);
  // Ascending from syevd; callers want the largest `count`, descending.
  cuda::take_last_reversed(a, lda, n, n, count, z, ldz, wall.get(), w, st);
}

template class CudaBackend<float>;
template class CudaBackend<double>;

}  // namespace isofast
