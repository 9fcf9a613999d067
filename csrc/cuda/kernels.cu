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
__global__ void scale_kernel(const T* src, T* dst, T s, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dst[i] = s * src[i];
}

template <class T>
__global__ void lincomb_kernel(T* out, T b, const T* g, T c, const T* g2, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    out[i] = b * g[i] + c * g2[i];
}

template <class T>
__global__ void poly_h_kernel(T* h, T a, T b, const T* g, T c, const T* g2, int n) {
  const size_t total = static_cast<size_t>(n) * n;
  for (size_t k = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const T v = b * g[k] + c * g2[k];
    h[k] = (k % n == k / n) ? v + a : v;
  }
}

template <class T>
__global__ void upper_triangle_kernel(const T* a, int lda, int n, T* r) {
  const size_t total = static_cast<size_t>(n) * n;
  for (size_t k = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(k % n), j = static_cast<int>(k / n);
    r[k] = i <= j ? a[i + static_cast<size_t>(j) * lda] : T(0);
  }
}

template <class T>
__global__ void symmetrize_kernel(T* g, int n) {
  const size_t total = static_cast<size_t>(n) * n;
  for (size_t k = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(k % n), j = static_cast<int>(k / n);
    if (i < j) g[k] = g[j + static_cast<size_t>(i) * n];  // upper (i < j) from lower (j, i)
  }
}

template <class From, class To>
__global__ void convert_kernel(const From* src, To* dst, size_t n) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    dst[i] = static_cast<To>(src[i]);
}

// Fixed-shape block reduction of kThreads doubles in shared memory (deterministic order).
__device__ double block_sum(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const double out = sh[0];
  __syncthreads();
  return out;
}

template <class T>
__global__ void power_step_kernel(const T* w, T* v, int n, double* rq) {
  __shared__ double sh[kThreads];
  double vv = 0, vw = 0, ww = 0;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const double vi = static_cast<double>(v[i]), wi = static_cast<double>(w[i]);
    vv += vi * vi;
    vw += vi * wi;
    ww += wi * wi;
  }
  vv = block_sum(vv, sh);  // block_sum ends with a barrier: every v[i] was read before the writes
  vw = block_sum(vw, sh);
  ww = block_sum(ww, sh);
  if (threadIdx.x == 0) *rq = (vv > 0 && ww > 0) ? vw / vv : 0.0;
  const double inv = ww > 0 ? 1.0 / sqrt(ww) : 0.0;
  for (int i = threadIdx.x; i < n; i += kThreads) v[i] = static_cast<T>(static_cast<double>(w[i]) * inv);
}

template <class T>
__global__ void column_norms_kernel(const T* a, int rows, int lda, double* sumsq, double* sumabs) {
  __shared__ double sh[kThreads];
  const int j = blockIdx.x;
  const T* col = a + static_cast<size_t>(j) * lda;
  double sq = 0, ab = 0;
  for (int i = threadIdx.x; i < rows; i += kThreads) {
    const double v = static_cast<double>(col[i]);
    sq += v * v;
    ab += fabs(v);
  }
  sq = block_sum(sq, sh);
  ab = block_sum(ab, sh);
  if (threadIdx.x == 0) {
    sumsq[j] = sq;
    sumabs[j] = ab;
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

__global__ void certificate_kernel(const double* c1, const double* c2, int n, double* orth,
                                   double* skew, double* diag) {
  __shared__ double sh[kThreads];
  const int j = blockIdx.x;
  double o = 0, s = 0;
  for (int i = j + threadIdx.x; i < n; i += kThreads) {
    const double v1 = c1[i + static_cast<size_t>(j) * n];
    if (i == j) {
      o += (v1 - 1.0) * (v1 - 1.0);
    } else {
      o += 2.0 * v1 * v1;
      const double d = c2[i + static_cast<size_t>(j) * n] - c2[j + static_cast<size_t>(i) * n];
      s += 2.0 * d * d;
    }
  }
  o = block_sum(o, sh);
  s = block_sum(s, sh);
  if (threadIdx.x == 0) {
    orth[j] = o;
    skew[j] = s;
    diag[j] = c2[j + static_cast<size_t>(j) * n];
  }
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
void scale(const T* src, T* dst, T s, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  scale_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(src, dst, s, n);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void lincomb(T* out, T b, const T* g, T c, const T* g2, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  lincomb_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(out, b, g, c, g2, n);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void poly_h(T* h, T a, T b, const T* g, T c, const T* g2, int n, cudaStream_t stream) {
  if (n <= 0) return;
  poly_h_kernel<T><<<grid_for(static_cast<size_t>(n) * n), kThreads, 0, stream>>>(h, a, b, g, c, g2, n);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void power_step(const T* w, T* v, int n, double* rq, cudaStream_t stream) {
  if (n <= 0) return;
  power_step_kernel<T><<<1, kThreads, 0, stream>>>(w, v, n, rq);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void upper_triangle(const T* a, int lda, int n, T* r, cudaStream_t stream) {
  if (n <= 0) return;
  upper_triangle_kernel<T><<<grid_for(static_cast<size_t>(n) * n), kThreads, 0, stream>>>(a, lda, n, r);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void symmetrize_lower(T* g, int n, cudaStream_t stream) {
  if (n <= 1) return;
  symmetrize_kernel<T><<<grid_for(static_cast<size_t>(n) * n), kThreads, 0, stream>>>(g, n);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class From, class To>
void convert(const From* src, To* dst, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  convert_kernel<From, To><<<grid_for(n), kThreads, 0, stream>>>(src, dst, n);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

template <class T>
void column_norms(const T* a, int rows, int cols, int lda, std::vector<double>& sumsq,
                  std::vector<double>& sumabs, cudaStream_t stream) {
  sumsq.assign(static_cast<size_t>(cols), 0.0);
  sumabs.assign(static_cast<size_t>(cols), 0.0);
  if (cols == 0) return;
  DeviceBuffer<double> d(2 * static_cast<size_t>(cols), stream);
  column_norms_kernel<T><<<cols, kThreads, 0, stream>>>(a, rows, lda, d.get(), d.get() + cols);
  ISOFAST_CUDA_CHECK_LAUNCH();
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(sumsq.data(), d.get(), sizeof(double) * cols,
                                     cudaMemcpyDeviceToHost, stream));
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(sumabs.data(), d.get() + cols, sizeof(double) * cols,
                                     cudaMemcpyDeviceToHost, stream));
  ISOFAST_CUDA_CHECK(cudaStreamSynchronize(stream));
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

void certificate_sums(const double* c1, const double* c2, int n, double out[3],
                      cudaStream_t stream) {
  out[0] = out[1] = out[2] = 0;
  if (n == 0) return;
  DeviceBuffer<double> d(3 * static_cast<size_t>(n), stream);
  certificate_kernel<<<n, kThreads, 0, stream>>>(c1, c2, n, d.get(), d.get() + n, d.get() + 2 * n);
  ISOFAST_CUDA_CHECK_LAUNCH();
  std::vector<double> host(3 * static_cast<size_t>(n));
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(host.data(), d.get(), sizeof(double) * host.size(),
                                     cudaMemcpyDeviceToHost, stream));
  ISOFAST_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int k = 0; k < 3; ++k)
    for (int j = 0; j < n; ++j) out[k] += host[static_cast<size_t>(k) * n + j];
}

template <class T>
void take_last_reversed(const T* src, int ld_src, int rows, int total, int count, T* dst,
                        int ld_dst, const T* w_src, T* w_dst, cudaStream_t stream) {
  if (count <= 0 || rows <= 0) return;
  reverse_kernel<T><<<grid_for(static_cast<size_t>(rows) * count), kThreads, 0, stream>>>(
      src, ld_src, rows, total, count, dst, ld_dst, w_src, w_dst);
  ISOFAST_CUDA_CHECK_LAUNCH();
}

#define ISOFAST_INSTANTIATE(T)                                                                  \
  template void accumulate_task<T>(const void*, DType, const void*, DType, T*, size_t, bool,    \
                                   int*, cudaStream_t);                                         \
  template void write_merged<T>(const T*, double, const void*, DType, void*, DType, size_t,     \
                                cudaStream_t);                                                  \
  template void scale<T>(const T*, T*, T, size_t, cudaStream_t);                                \
  template void lincomb<T>(T*, T, const T*, T, const T*, size_t, cudaStream_t);                 \
  template void symmetrize_lower<T>(T*, int, cudaStream_t);                                     \
  template void poly_h<T>(T*, T, T, const T*, T, const T*, int, cudaStream_t);                  \
  template void power_step<T>(const T*, T*, int, double*, cudaStream_t);                       \
  template void upper_triangle<T>(const T*, int, int, T*, cudaStream_t);                        \
  template void column_norms<T>(const T*, int, int, int, std::vector<double>&,                  \
                                std::vector<double>&, cudaStream_t);                            \
  template bool has_nonfinite<T>(const T*, int, int, int, cudaStream_t);                        \
  template void take_last_reversed<T>(const T*, int, int, int, int, T*, int, const T*, T*,      \
                                      cudaStream_t);
ISOFAST_INSTANTIATE(float)
ISOFAST_INSTANTIATE(double)
#undef ISOFAST_INSTANTIATE
template void convert<float, double>(const float*, double*, size_t, cudaStream_t);
template void convert<double, float>(const double*, float*, size_t, cudaStream_t);

}  // namespace cuda
}  // namespace isofast
