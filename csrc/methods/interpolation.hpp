// Interpolating merges on flat tensors (mergekit's slerp and model_stock): the angles come from
// float64 dot products summed in fixed blocks, so results do not depend on the thread count.
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace isofast {

// mergekit's slerp of the full weights a = base and b = base + delta at t: norms below eps
// count as 1; |cos| > dot_threshold falls back to (1 - t) a + t b. Writes the update
// out = slerp(a, b) - a = (c_a + c_b - 1) a + c_b delta.
template <class T>
void slerp_update(const T* base, const T* delta, size_t n, double t, double dot_threshold,
                  double eps, T* out, int threads);

// mergekit's model_stock on rows of row_len entries (one row: the whole tensor): per row
// cos = mean over task pairs of clamp(D_i.D_j / max(|D_i||D_j|, 1e-6), -1, 1),
// t = k cos / (1 + (k - 1) cos) (0 where |1 + (k - 1) cos| < 1e-6), out = t * mean_k D_k.
template <class T>
void model_stock_update(const std::vector<T*>& deltas, size_t n, size_t row_len, T* out,
                        int threads);

// mergekit's nuslerp of two task vectors d0 (t = 0) and d1 (t = 1), per vector of len entries:
// the whole tensor (len = n), contiguous rows of the last axis, or (strided) the vectors along
// the first axis (entries j + k * (n / len), k < len). Per vector: norms clamped to >= 1e-7,
// cos = clamp(d0.d1 / (|d0||d1|), -1, 1); 1 - cos^2 <= eps^2: out = (1 - t) d0 + t d1; else
// out = (sin((1 - t) theta) d0 + sin(t theta) d1) / sin(theta), theta = acos(cos). out may be
// d0 (each entry is read before it is written).
template <class T>
void nuslerp_update(const T* d0, const T* d1, size_t n, size_t len, bool strided, double t,
                    double eps, T* out, int threads);

// mergekit's multislerp of the task vectors with weights w (normalized to sum 1 when asked):
// out = (sum_i w_i |D_i|) * m, m = sum_i w_i D_i / (|D_i| + eps) normalized (its tangent step
// is exactly zero); one task: out = D_0; |sum_i w_i unit_i| < eps: sum_i w_i D_i with two
// tasks, an error with more.
template <class T>
void multislerp_update(const std::vector<T*>& deltas, size_t n, const std::vector<double>& weights,
                       bool normalize_weights, double eps, T* out, int threads);

// mergekit's karcher: the Karcher mean on the unit sphere of the full weights X_0 = base and
// X_m = base + D_m, equal weights, from their float64 Gram matrix (max_iter steps, stopping
// once the tangent norm is below tol; norms <= tol leave out their model), scaled to the mean
// norm of all models. Writes the update out = mean - base.
template <class T>
void karcher_update(const T* base, const std::vector<T*>& deltas, size_t n, int max_iter,
                    double tol, T* out, int threads);

}  // namespace isofast
