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

}  // namespace isofast
