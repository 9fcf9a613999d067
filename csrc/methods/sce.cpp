#include "sce.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "../core/parallel.hpp"

namespace isofast {
namespace {

// The blocks, not the threads, fix the order of the float64 sums.
constexpr size_t kBlock = 1 << 16;

// Population variance of the tasks' entry i, in float64 (0 exactly where all tasks agree).
template <class T>
double task_variance(const std::vector<T*>& deltas, size_t i) {
  const size_t tasks = deltas.size();
  const double first = deltas[0][i];
  bool same = true;
  double sum = 0;
  for (size_t t = 0; t < tasks; ++t) {
    const double v = deltas[t][i];
    same = same && v == first;
    sum += v;
  }
  if (same) return 0.0;
  const double mean = sum / static_cast<double>(tasks);
  double sq = 0;
  for (size_t t = 0; t < tasks; ++t) {
    const double d = static_cast<double>(deltas[t][i]) - mean;
    sq += d * d;
  }
  return sq / static_cast<double>(tasks);
}

template <class T>
void select_topk(const std::vector<T*>& deltas, size_t n, double density, int threads) {
  std::vector<char> keep(n, 0);
  if (density > 0) {
    std::vector<double> var(n);
    parallel_for(n, threads, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) var[i] = task_variance(deltas, i);
    });
    size_t nonzero = 0;
    for (double v : var) nonzero += v != 0.0;
    const auto k = static_cast<size_t>(static_cast<double>(nonzero) * density);
    if (k > 0) {
      // The k largest (variance, then lowest index): a total order, so one exact set.
      std::vector<size_t> order(n);
      for (size_t i = 0; i < n; ++i) order[i] = i;
      auto before = [&](size_t a, size_t b) {
        return var[a] > var[b] || (var[a] == var[b] && a < b);
      };
      std::nth_element(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k - 1),
                       order.end(), before);
      for (size_t j = 0; j < k; ++j) keep[order[j]] = 1;
    }
  }
  for (T* d : deltas)
    parallel_for(n, threads, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i)
        if (!keep[i]) d[i] = T(0);
    });
}

}  // namespace

template <class T>
void sce_update(const std::vector<T*>& deltas, size_t n, double select_topk_density, T* out,
                int threads) {
  const size_t tasks = deltas.size();
  if (n == 0) return;
  if (select_topk_density < 1.0) select_topk(deltas, n, select_topk_density, threads);
  // Weights: the mean square of each (selected) task vector, normalized.
  const size_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> parts(blocks * tasks, 0.0);
  parallel_for(blocks, threads, [&](size_t first, size_t last) {
    for (size_t k = first; k < last; ++k)
      for (size_t t = 0; t < tasks; ++t) {
        double s = 0;
        for (size_t i = k * kBlock, e = std::min(n, (k + 1) * kBlock); i < e; ++i) {
          const double v = deltas[t][i];
          s += v * v;
        }
        parts[k * tasks + t] = s;
      }
  });
  std::vector<double> w(tasks, 0.0);
  for (size_t k = 0; k < blocks; ++k)
    for (size_t t = 0; t < tasks; ++t) w[t] += parts[k * tasks + t];
  double total = 0;
  for (double& v : w) {
    v /= static_cast<double>(n);
    total += v;
  }
  for (double& v : w) v = std::fabs(total) < 1e-6 ? 1.0 / static_cast<double>(tasks) : v / total;
  std::vector<T> wt(tasks);
  for (size_t t = 0; t < tasks; ++t) wt[t] = static_cast<T>(w[t]);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      double vote = 0;
      for (size_t t = 0; t < tasks; ++t) vote += static_cast<double>(deltas[t][i]);
      const int s = vote >= 0 ? 1 : -1;
      T acc = 0, div = 0;
      for (size_t t = 0; t < tasks; ++t) {
        const T v = deltas[t][i];
        if ((v > T(0) ? 1 : v < T(0) ? -1 : 0) == s) {
          acc += wt[t] * v;
          div += wt[t];
        }
      }
      out[i] = acc / std::max(div, T(1e-6));
    }
  });
}

template void sce_update<float>(const std::vector<float*>&, size_t, double, float*, int);
template void sce_update<double>(const std::vector<double*>&, size_t, double, double*, int);

}  // namespace isofast
