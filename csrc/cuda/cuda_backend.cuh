// Backend<T> (csrc/linalg/backend.hpp) on cuBLAS + cuSOLVER. Every pointer passed to it is a
// DEVICE pointer (matrices, singular values, eigenvalues); it runs on the caller's stream.
//   gemm       cublas<t>gemm           (math mode: see set_tf32)
//   syrk       cublas<t>syrk, lower triangle
//   svd        cusolverDnXgesvdp (polar decomposition + syevd; never the QR-based gesvd), thin
//   eigh_top   cusolverDnXsyevd on the whole matrix, then the top `count` pairs, descending
// Handles and a device/host workspace are owned by a CudaContext (RAII) and cached across calls.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../linalg/backend.hpp"
#include "cuda_check.cuh"
#include "device_buffer.cuh"

namespace isofast {

class CudaContext {
 public:
  static constexpr uint64_t kPoolKeepBytes = uint64_t{4} << 30;  // 4 GiB
  explicit CudaContext(cudaStream_t stream);
  ~CudaContext();
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t blas() const { return blas_; }
  cusolverDnHandle_t solver() const { return solver_; }
  cusolverDnParams_t params() const { return params_; }

  // Cached workspaces (grow only).
  void* device_workspace(size_t bytes) { return work_.reserve(bytes, stream_); }
  void* host_workspace(size_t bytes) {
    if (host_work_.size() < bytes) host_work_.resize(bytes);
    return host_work_.data();
  }
  int* device_info() { return info_.reserve(1, stream_); }
  // cuSOLVER's info, copied back (synchronises the stream).
  int read_info();
  void synchronize();

 private:
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  cusolverDnHandle_t solver_ = nullptr;
  cusolverDnParams_t params_ = nullptr;
  DeviceBuffer<char> work_;
  std::vector<char> host_work_;
  DeviceBuffer<int> info_;
};

template <class T>
class CudaBackend final : public Backend<T> {
 public:
  explicit CudaBackend(CudaContext& ctx) : ctx_(ctx) {}
  const char* name() const override { return "cuda"; }
  Backend<double>& f64() override;

  // Stream-ordered device memory from the pool (cudaMallocAsync / cudaFreeAsync).
  std::shared_ptr<T> allocate(size_t count) override;
  void copy(int rows, int cols, const T* a, int lda, T* b, int ldb, bool transpose) override;
  void to_f64(int rows, int cols, const T* a, int lda, double* b, int ldb) override;
  void from_f64(int rows, int cols, const double* a, int lda, T* b, int ldb) override;
  void fill(int rows, int cols, T value, T* a, int lda) override;
  void add(size_t n, const T* x, T* y) override;
  void scale_columns(int rows, int cols, T* a, int lda, const std::vector<double>& f,
                     bool divide) override;
  std::vector<T> to_host(const T* a, size_t n) override;

  void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda,
            const T* b, int ldb, T beta, T* c, int ldc) override;
  void syrk(bool trans, int n, int k, T alpha, const T* a, int lda, T beta, T* c,
            int ldc) override;
  void svd(int m, int n, T* a, int lda, T* s, T* u, int ldu, T* vt, int ldvt) override;
  void eigh_top(int n, T* a, int lda, int count, T* w, T* z, int ldz) override;

  // C = alpha op(A) + beta op(B) (cublas<t>geam): transposes and scaled copies.
  void geam(bool trans_a, bool trans_b, int m, int n, T alpha, const T* a, int lda, T beta,
            const T* b, int ldb, T* c, int ldc);

  CudaContext& context() { return ctx_; }
  // cusolverDnXgesvdp's h_err_sigma of the last svd() ("magnitude of the perturbation").
  double last_svd_err_sigma() const { return err_sigma_; }

 private:
  CudaContext& ctx_;
  double err_sigma_ = 0;
  std::unique_ptr<CudaBackend<double>> twin_;  // f64() of a float backend
};

// Name of the current device and whether any CUDA device is usable (never throws).
std::string cuda_device_name(int device);
bool cuda_available();

}  // namespace isofast
