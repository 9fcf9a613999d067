#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "../core/error.hpp"
#include "cuda_check.cuh"
#include "device_buffer.cuh"
#include "kernels.cuh"

namespace isofast {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned grid_for(size_t n) {
  const size_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::min<size_t>(std::max<size_t>(blocks, 1), 65535u * 8u));
}

// Device-side dtype codes (DType is a host enum class; pass its integer value).
enum : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

int device_code(DType d, const char* what) {
  switch (d) {
    case DType::F32: return kF32;
    case DType::F64: return kF64;
    case DType::F16: return kF16;
    case DType::BF16: return kBF16;
    default: break;
  }
  throw ValueError(concat(what, ": the CUDA backend reads float32/float64/float16/bfloat16, got ",
                          dtype_name(d)));
}

__device__ __forceinline__ double load_any(const void* p, int code, size_t i) {
  switch (code) {
    case kF32: return static_cast<double>(static_cast<const float*>(p)[i]);
    case kF64: return static_cast<const double*>(p)[i];
    case kF16: {
      __half_raw r;
      r.x = static_cast<const unsigned short*>(p)[i];
      return static_cast<double>(__half2float(__half(r)));
    }
    default: {
      __nv_bfloat16_raw r;
      r.x = static_cast<const unsigned short*>(p)[i];
      return static_cast<double>(__bfloat162float(__nv_bfloat16(r)));
    }
  }
}

__device__ __forceinline__ void store_any(void* p, int code, size_t i, double v) {
  switch (code) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case kF64: static_cast<double*>(p)[i] = v; break;
    case kF16: {
      __half_raw r = __half(__float2half_rn(static_cast<float>(v)));
      static_cast<unsigned short*>(p)[i] = r.x;
      break;
    }
    default: {
      __nv_bfloat16_raw r = __nv_bfloat16(__float2bfloat16_rn(static_cast<float>(v)));
      static_cast<unsigned short*>(p)[i] = r.x;
      break;
    }
  }
}

template <class T>
__global__ void accumulate_kernel(const void* ft, int ftc, const void* base, int bc, T* acc,
                                  size_t n, bool first, int* flags) {
  int bad = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    // Subtract in the compute type, as the CPU core does (load_as then d -= base).
    const T f = static_cast<T>(load_any(ft, ftc, i));
    T b = 0;
    if (base != nullptr) b = static_cast<T>(load_any(base, bc, i));
    if (!isfinite(f)) bad |= 1;
    if (!isfinite(b)) bad |= 2;
    const T d = f - b;
    acc[i] = first ? d : acc[i] + d;
  }
  if (bad) atomicOr(flags, bad);
}

template <class T>
__global__ void write_kernel(const T* m, double s, const void* base, int bc, void* out, int oc,
                             size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const T v = static_cast<T>(s) * m[i];
    const double b = base != nullptr ? static_cast<double>(static_cast<T>(load_any(base, bc, i))) : 0.0;
    store_any(out, oc, i, static_cast<double>(static_cast<T>(b) + v));
  }
}

template <class T>
__global__ void nonfinite_kernel(const T* a, int rows, int cols, int lda, int* flag) {
  const size_t total = static_cast<size_t>(rows) * cols;
  int bad = 0;
  for (size_t k = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t i = k % rows, j = k / rows;
    if (!isfinite(a[i + j * lda])) bad = 1;
  }
  if (bad) atomicOr(flag, 1);
}

template <class T>
__global__ void reverse_kernel(const T* src, int ld_src, int rows, int total, int count, T* dst,
                               int ld_dst, const T* w_src, T* w_dst) {
  const size_t all = static_cast<size_t>(rows) * count;
  for (size_t k = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; k < all;
       k += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(k % rows), j = static_cast<int>(k / rows);
    dst[i + static_cast<size_t>(j) * ld_dst] = src[i + static_cast<size_t>(total - 1 - j) * ld_src];
    if (i == 0) w_dst[j] = w_src[total - 1 - j];
  }
}

// Grid-stride loop over the rows x cols elements of a column-major matrix.
#define ISOFAST_FOR_2D(rows, cols, i, j)                                                     \
  for (size_t k_ = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x,               \
              total_ = static_cast<size_t>(rows) * (cols);                                   \
       k_ < total_; k_ += static_cast<size_t>(gridDim.x) * blockDim.x)                      \
    if (const int i = static_cast<int>(k_ % (rows)), j = static_cast<int>(k_ / (rows)); true)

template <class From, class To>
__global__ void convert_2d_kernel(int rows, int cols, const From* a, int lda, To* b, int ldb) {
  ISOFAST_FOR_2D(rows, cols, i, j)
  b[i + static_cast<size_t>(j) * ldb] = static_cast<To>(a[i + static_cast<size_t>(j) * lda]);
}

template <class T>
__global__ void fill_2d_kernel(int rows, int cols, T value, T* a, int lda) {
  ISOFAST_FOR_2D(rows, cols, i, j) a[i + static_cast<size_t>(j) * lda] = value;
}

template <class T>
__global__ void add_kernel(size_t n, const T* x, T* y) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    y[i] += x[i];
}

template <class T>
__global__ void scale_columns_kernel(int rows, int cols, T* a, int lda, const double* f,
                                     bool divide) {
  ISOFAST_FOR_2D(rows, cols, i, j) {
    const double fj = divide ? (f[j] > 0 ? 1.0 / f[j] : 0.0) : f[j];
    T& x = a[i + static_cast<size_t>(j) * lda];
    // Same rounding as the CPU backend: float32 multiplies by the float32 factor.
    x = std::is_same<T, double>::value ? static_cast<T>(x * fj) : x * static_cast<T>(fj);
  }
}

}  // namespace

template <class T>
void accumulate_task(const void* ft, DType ft_dtype, const void* base, DType base_dtype, T* acc,
                     size_t n, bool first, int* flags, cudaStream_t stream) {
  const int fc = device_code(ft_dtype, "fine-tuned tensor");
  const int bc = base != nullptr ? device_code(base_dtype, "base tensor") : kF32;
  if (n == 0) return;
  accumulate_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(ft, fc, base, bc, acc, n, first, flags);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void write_merged(const T* m, double s, const void* base, DType base_dtype, void* out,
                  DType out_dtype, size_t n, cudaStream_t stream) {
  const int bc = base != nullptr ? device_code(base_dtype, "base tensor") : kF32;
  const int oc = device_code(out_dtype, "output tensor");
  if (n == 0) return;
  write_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(m, s, base, bc, out, oc, n);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
bool has_nonfinite(const T* a, int rows, int cols, int lda, cudaStream_t stream) {
  const size_t total = static_cast<size_t>(rows) * cols;
  if (total == 0) return false;
  DeviceBuffer<int> flag(1, stream);
  ISOFAST_CUDA_CHECK(cudaMemsetAsync(flag.get(), 0, sizeof(int), stream));
  nonfinite_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(a, rows, cols, lda, flag.get());
  ISOFAST_CUDA_CHECK_LAUNCH();
  int host = 0;
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(&host, flag.get(), sizeof(int), cudaMemcpyDeviceToHost, stream));
  ISOFAST_CUDA_CHECK(cudaStreamSynchronize(stream));
  return host != 0;
}

template <class T>
void take_last_reversed(const T* src, int ld_src, int rows, int total, int count, T* dst,
                        int ld_dst, const T* w_src, T* w_dst, cudaStream_t stream) {
  if (count <= 0 || rows <= 0) return;
  reverse_kernel<T><<<grid_for(static_cast<size_t>(rows) * count), kThreads, 0, stream>>>(
      src, ld_src, rows, total, count, dst, ld_dst, w_src, w_dst);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class From, class To>
void convert_2d(int rows, int cols, const From* a, int lda, To* b, int ldb, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  convert_2d_kernel<From, To><<<grid_for(static_cast<size_t>(rows) * cols), kThreads, 0, stream>>>(
      rows, cols, a, lda, b, ldb);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void fill_2d(int rows, int cols, T value, T* a, int lda, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  fill_2d_kernel<T><<<grid_for(static_cast<size_t>(rows) * cols), kThreads, 0, stream>>>(
      rows, cols, value, a, lda);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void add(size_t n, const T* x, T* y, cudaStream_t stream) {
  if (n == 0) return;
  add_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(n, x, y);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void scale_columns(int rows, int cols, T* a, int lda, const double* f, bool divide,
                   cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  scale_columns_kernel<T><<<grid_for(static_cast<size_t>(rows) * cols), kThreads, 0, stream>>>(
      rows, cols, a, lda, f, divide);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

#define ISOFAST_INSTANTIATE(T)                                                                  \
  template void accumulate_task<T>(const void*, DType, const void*, DType, T*, size_t, bool,    \
                                   int*, cudaStream_t);                                         \
  template void write_merged<T>(const T*, double, const void*, DType, void*, DType, size_t,     \
                                cudaStream_t);                                                  \
  template bool has_nonfinite<T>(const T*, int, int, int, cudaStream_t);                        \
  template void take_last_reversed<T>(const T*, int, int, int, int, T*, int, const T*, T*,      \
                                      cudaStream_t);                                            \
  template void fill_2d<T>(int, int, T, T*, int, cudaStream_t);                                 \
  template void add<T>(size_t, const T*, T*, cudaStream_t);                                     \
  template void scale_columns<T>(int, int, T*, int, const double*, bool, cudaStream_t);
ISOFAST_INSTANTIATE(float)
ISOFAST_INSTANTIATE(double)
#undef ISOFAST_INSTANTIATE
template void convert_2d<float, double>(int, int, const float*, int, double*, int, cudaStream_t);
template void convert_2d<double, float>(int, int, const double*, int, float*, int, cudaStream_t);
template void convert_2d<double, double>(int, int, const double*, int, double*, int,
                                         cudaStream_t);

}  // namespace cuda
}  // namespace isofast
