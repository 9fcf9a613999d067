// Element-wise and reduction kernels of the CUDA Iso-C path (host launchers). All launches are
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

// dst[i] = s * src[i] (dst may equal src).
template <class T>
void scale(const T* src, T* dst, T s, size_t n, cudaStream_t stream);

// out[i] = b * g[i] + c * g2[i] (out may alias g2).
template <class T>
void lincomb(T* out, T b, const T* g, T c, const T* g2, size_t n, cudaStream_t stream);

// h = a I + b g + c g2 for n x n column-major matrices (h may alias g2): one polar step's
// polynomial, X <- X h (or h X), with the a X term folded into the diagonal.
template <class T>
void poly_h(T* h, T a, T b, const T* g, T c, const T* g2, int n, cudaStream_t stream);

// One power-iteration step on the device: given w = G v, writes *rq = (v . w) / (v . v)
// (0 when v or w is zero) and v = w / ||w|| (one block; n up to a few 10^4).
template <class T>
void power_step(const T* w, T* v, int n, double* rq, cudaStream_t stream);

// r (n x n) = the upper triangle of the first n rows of a (lda), zeros below the diagonal.
template <class T>
void upper_triangle(const T* a, int lda, int n, T* r, cudaStream_t stream);

// Copy the lower triangle of the n x n column-major g onto its upper triangle.
template <class T>
void symmetrize_lower(T* g, int n, cudaStream_t stream);

// dst = src converted element-wise (float <-> double).
template <class From, class To>
void convert(const From* src, To* dst, size_t n, cudaStream_t stream);

// Per column j of the rows x cols column-major a: sum of squares and sum of |a_ij| (float64),
// copied back to the host (synchronises the stream).
template <class T>
void column_norms(const T* a, int rows, int cols, int lda, std::vector<double>& sumsq,
                  std::vector<double>& sumabs, cudaStream_t stream);

// Non-zero when the rows x cols column-major a holds NaN or Inf (synchronises the stream).
template <class T>
bool has_nonfinite(const T* a, int rows, int cols, int lda, cudaStream_t stream);

// Certificate sums from c1 = Q^T Q (lower triangle valid) and c2 = Q^T A, both n x n float64:
// out = {sum (c1 - I)^2, sum (c2 - c2^T)^2, trace c2} (synchronises the stream).
void certificate_sums(const double* c1, const double* c2, int n, double out[3],
                      cudaStream_t stream);

// dst[:, j] = src[:, total - 1 - j] for j < count (rows each), and w_dst[j] = w_src[total-1-j].
template <class T>
void take_last_reversed(const T* src, int ld_src, int rows, int total, int count, T* dst,
                        int ld_dst, const T* w_src, T* w_dst, cudaStream_t stream);

}  // namespace cuda
}  // namespace isofast
