// Element-wise and reduction kernels of the CUDA backend (host launchers). All launches are
// on the given stream and checked; reductions are deterministic (fixed per-column blocks, the
// final sum on the host in a fixed order), so results do not depend on scheduling.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "../core/dtype.hpp"

namespace isofast {
namespace cuda {

// acc[i] = (first ? 0 : acc[i]) + load(ft[i]) - (base ? load(base[i]) : 0) in T, for n elements
// of any float dtype (f32, f64, bf16, f16). Sets bit 1 of *flags (device int) when ft holds a
// non-finite value, bit 2 when base does.
template <class T>
void accumulate_task(const void* ft, DType ft_dtype, const void* base, DType base_dtype, T* acc,
                     size_t n, bool first, int* flags, cudaStream_t stream);

// out[i] = (base ? load(base[i]) : 0) + scale * m[i], stored as out_dtype (round to nearest even).
template <class T>
void write_merged(const T* m, double scale, const void* base, DType base_dtype, void* out,
                  DType out_dtype, size_t n, cudaStream_t stream);

// Non-zero when the rows x cols column-major a holds NaN or Inf (synchronises the stream).
template <class T>
bool has_nonfinite(const T* a, int rows, int cols, int lda, cudaStream_t stream);

// dst[:, j] = src[:, total - 1 - j] for j < count (rows each), and w_dst[j] = w_src[total-1-j].
template <class T>
void take_last_reversed(const T* src, int ld_src, int rows, int total, int count, T* dst,
                        int ld_dst, const T* w_src, T* w_dst, cudaStream_t stream);

// Column-major matrices with leading dimensions (the Backend primitives of CudaBackend):
// b = a converted element-wise; a = value; y += x; column j of a times f[j] (f: device,
// float64), or divided by it (0 where f[j] is not > 0).
template <class From, class To>
void convert_2d(int rows, int cols, const From* a, int lda, To* b, int ldb, cudaStream_t stream);
template <class T>
void fill_2d(int rows, int cols, T value, T* a, int lda, cudaStream_t stream);
template <class T>
void add(size_t n, const T* x, T* y, cudaStream_t stream);
template <class T>
void scale_columns(int rows, int cols, T* a, int lda, const double* f, bool divide,
                   cudaStream_t stream);

}  // namespace cuda
}  // namespace isofast
