// mergekit's SCE (select, calculate, erase) on the flat task vectors of one tensor.
#pragma once
#include <cstddef>
#include <vector>

namespace isofast {

// select_topk < 1: keep, in every task vector, the entries of the k = int(nz * select_topk)
// largest variances across tasks (population variance in float64; nz: entries where the tasks
// differ; ties to the lowest index), none when select_topk <= 0. Weights w_t = mean_i D_ti^2 /
// sum_t (1 / T each where that sum is below 1e-6). Elect s_i = +1 where sum_t D_ti >= 0 else -1;
// out_i = sum_{t: sign D_ti = s_i} w_t D_ti / max(sum_{same t} w_t, 1e-6). The task vectors are
// masked in place.
template <class T>
void sce_update(const std::vector<T*>& deltas, size_t n, double select_topk, T* out,
                int threads);

}  // namespace isofast
