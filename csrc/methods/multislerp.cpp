#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "interpolation.hpp"

namespace isofast {
namespace {

// The blocks, not the threads, fix the order of the float64 sums.
constexpr size_t kBlock = 1 << 16;

}  // namespace

template <class T>
void multislerp_update(const std::vector<T*>& deltas, size_t n, const std::vector<double>& weights,
                       bool normalize_weights, double eps, T* out, int threads) {
  const size_t tasks = deltas.size();
  if (n == 0) return;
  if (tasks == 1) {  // mergekit: one model is returned as it is
    std::copy(deltas[0], deltas[0] + n, out);
    return;
  }
  // Gram matrix of the task vectors (full, row-major), float64 over fixed blocks.
  const size_t blocks = (n + kBlock - 1) / kBlock, stats = tasks * tasks;
  std::vector<double> parts(blocks * stats, 0.0);
  parallel_for(blocks, threads, [&](size_t first, size_t last) {
    for (size_t k = first; k < last; ++k) {
      double* g = parts.data() + k * stats;
      for (size_t i = k * kBlock, e = std::min(n, (k + 1) * kBlock); i < e; ++i)
        for (size_t a = 0; a < tasks; ++a) {
          const double x = deltas[a][i];
          for (size_t b = a; b < tasks; ++b) g[a * tasks + b] += x * static_cast<double>(deltas[b][i]);
        }
    }
  });
  std::vector<double> g(stats, 0.0);
  for (size_t k = 0; k < blocks; ++k)
    for (size_t p = 0; p < stats; ++p) g[p] += parts[k * stats + p];
  for (size_t a = 0; a < tasks; ++a)
    for (size_t b = 0; b < a; ++b) g[a * tasks + b] = g[b * tasks + a];
  std::vector<double> w(weights);
  if (normalize_weights) {
    double total = 0;
    for (double v : w) total += v;
    ISOFAST_CHECK(total != 0.0, "multislerp: the weights sum to 0 (normalize_weights)");
    for (double& v : w) v /= total;
  }
  // unit_i = D_i / (|D_i| + eps); mean = sum_i w_i unit_i = sum_i a_i D_i.
  std::vector<double> a(tasks);
  double avg_norm = 0;
  for (size_t i = 0; i < tasks; ++i) {
    const double norm = std::sqrt(std::max(g[i * tasks + i], 0.0));
    a[i] = w[i] / (norm + eps);
    avg_norm += w[i] * norm;
  }
  double mean_sq = 0;
  for (size_t i = 0; i < tasks; ++i)
    for (size_t j = 0; j < tasks; ++j) mean_sq += a[i] * g[i * tasks + j] * a[j];
  const double mean_norm = std::sqrt(std::max(mean_sq, 0.0));
  std::vector<double> coef(tasks);
  if (mean_norm < eps) {
    ISOFAST_CHECK(tasks == 2,
                  "multislerp: the weighted sum of the unit task vectors is zero (antipodal "
                  "task vectors with balancing weights); try other weights");
    coef = w;  // mergekit's linear fallback for two models
  } else {
    // The tangent step vanishes: sum_i w_i (unit_i - (unit_i . m) m) = mean - |mean| m = 0 for
    // m = mean / |mean|; the exponential map of the zero tangent (norm eps) is cos(eps) m.
    const double scale = avg_norm * std::cos(eps) / mean_norm;
    for (size_t i = 0; i < tasks; ++i) coef[i] = scale * a[i];
  }
  std::vector<T> c(tasks);
  for (size_t i = 0; i < tasks; ++i) c[i] = static_cast<T>(coef[i]);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      T acc = 0;
      for (size_t t = 0; t < tasks; ++t) acc += c[t] * deltas[t][i];
      out[i] = acc;
    }
  });
}

template void multislerp_update<float>(const std::vector<float*>&, size_t,
                                       const std::vector<double>&, bool, double, float*, int);
template void multislerp_update<double>(const std::vector<double*>&, size_t,
                                        const std::vector<double>&, bool, double, double*, int);

}  // namespace isofast
