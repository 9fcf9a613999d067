// The one place where CUDA runtime, cuBLAS and cuSOLVER status codes (and cuSOLVER `info`)
// become isofast exceptions: the stringified call, the decoded status, where it happened.
//   ISOFAST_CUDA_CHECK(cudaMallocAsync(&p, bytes, stream));
//   ISOFAST_CUBLAS_CHECK(cublasSgemm(...));
//   ISOFAST_CUSOLVER_CHECK(cusolverDnXsyevd(...));
// cuSOLVER `info` codes go through check_solver_info (linalg/check.hpp), LAPACK's checker.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <string>

#include "../core/error.hpp"

namespace isofast {

inline const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS: return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED (out of GPU memory)";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_MAPPING_ERROR: return "CUSOLVER_STATUS_MAPPING_ERROR";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED: return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    case CUSOLVER_STATUS_ZERO_PIVOT: return "CUSOLVER_STATUS_ZERO_PIVOT";
    case CUSOLVER_STATUS_INVALID_LICENSE: return "CUSOLVER_STATUS_INVALID_LICENSE";
    default: return "unknown cuSOLVER status";
  }
}

namespace detail {

[[noreturn]] inline void throw_cuda(const char* expr, cudaError_t e, const char* file, int line) {
  std::string hint;
  if (e == cudaErrorMemoryAllocation) hint = " (out of GPU memory: merge fewer or smaller tensors at once)";
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
    hint = " (no usable NVIDIA GPU / driver: use the CPU backend)";
  throw CudaError(concat(expr, " failed: ", cudaGetErrorName(e), ": ", cudaGetErrorString(e), hint,
                         " [", file, ":", line, "]"));
}

[[noreturn]] inline void throw_cublas(const char* expr, cublasStatus_t s, const char* file, int line) {
  throw CudaError(concat(expr, " failed: ", cublasGetStatusName(s), ": ", cublasGetStatusString(s),
                         " [", file, ":", line, "]"));
}

[[noreturn]] inline void throw_cusolver(const char* expr, cusolverStatus_t s, const char* file,
                                        int line) {
  throw CudaError(concat(expr, " failed: ", cusolver_status_name(s), " [", file, ":", line, "]"));
}

}  // namespace detail

}  // namespace isofast

#define ISOFAST_CUDA_CHECK(expr)                                                   \
  do {                                                                             \
    const cudaError_t isofast_status_ = (expr);                                    \
    if (isofast_status_ != cudaSuccess)                                            \
      ::isofast::detail::throw_cuda(#expr, isofast_status_, __FILE__, __LINE__);   \
  } while (0)

#define ISOFAST_CUBLAS_CHECK(expr)                                                 \
  do {                                                                             \
    const cublasStatus_t isofast_status_ = (expr);                                 \
    if (isofast_status_ != CUBLAS_STATUS_SUCCESS)                                  \
      ::isofast::detail::throw_cublas(#expr, isofast_status_, __FILE__, __LINE__); \
  } while (0)

#define ISOFAST_CUSOLVER_CHECK(expr)                                                 \
  do {                                                                               \
    const cusolverStatus_t isofast_status_ = (expr);                                 \
    if (isofast_status_ != CUSOLVER_STATUS_SUCCESS)                                  \
      ::isofast::detail::throw_cusolver(#expr, isofast_status_, __FILE__, __LINE__); \
  } while (0)

// Kernel launches: the launch error, right after the <<<...>>>.
#define ISOFAST_CUDA_CHECK_LAUNCH() ISOFAST_CUDA_CHECK(cudaGetLastError())
