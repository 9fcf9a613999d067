#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/parallel.hpp"
#include "interpolation.hpp"

namespace isofast {
namespace {

// The blocks, not the threads, fix the order of the float64 sums.
constexpr size_t kBlock = 1 << 16;

// Upper triangle (i <= j, row-major) of the Gram matrix of the tasks over [begin, end),
// added into g.
template <class T>
void add_gram(const std::vector<T*>& d, size_t begin, size_t end, double* g) {
  const size_t tasks = d.size();
  for (size_t i = begin; i < end; ++i) {
    size_t p = 0;
    for (size_t a = 0; a < tasks; ++a) {
      const double x = d[a][i];
      for (size_t b = a; b < tasks; ++b) g[p++] += x * static_cast<double>(d[b][i]);
    }
  }
}

// model_stock's interpolation ratio t from a Gram upper triangle.
double stock_ratio(const double* g, size_t tasks) {
  std::vector<double> norms(tasks);
  for (size_t a = 0, p = 0; a < tasks; ++a) {
    norms[a] = std::sqrt(g[p]);
    p += tasks - a;
  }
  double cos_sum = 0;
  size_t pairs = 0;
  for (size_t a = 0, p = 0; a < tasks; ++a) {
    ++p;  // the diagonal entry
    for (size_t b = a + 1; b < tasks; ++b, ++p) {
      cos_sum += std::clamp(g[p] / std::max(norms[a] * norms[b], 1e-6), -1.0, 1.0);
      ++pairs;
    }
  }
  const double cos = cos_sum / static_cast<double>(pairs);
  const double k = static_cast<double>(tasks);
  const double den = 1.0 + (k - 1.0) * cos;
  return std::fabs(den) < 1e-6 ? 0.0 : k * cos / den;
}

}  // namespace

template <class T>
void model_stock_update(const std::vector<T*>& deltas, size_t n, size_t row_len, T* out,
                        int threads) {
  const size_t tasks = deltas.size(), stats = tasks * (tasks + 1) / 2;
  if (n == 0 || row_len == 0) return;
  const size_t rows = n / row_len;
  std::vector<double> ratio(rows);
  if (rows == 1) {
    const size_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> parts(blocks * stats, 0.0);
    parallel_for(blocks, threads, [&](size_t first, size_t last) {
      for (size_t k = first; k < last; ++k)
        add_gram(deltas, k * kBlock, std::min(n, (k + 1) * kBlock), parts.data() + k * stats);
    });
    std::vector<double> g(stats, 0.0);
    for (size_t k = 0; k < blocks; ++k)
      for (size_t p = 0; p < stats; ++p) g[p] += parts[k * stats + p];
    ratio[0] = stock_ratio(g.data(), tasks);
  } else {
    // One row per work item, summed in index order: the same sums on any thread count.
    parallel_for(rows, threads, [&](size_t first, size_t last) {
      std::vector<double> g(stats);
      for (size_t r = first; r < last; ++r) {
        std::fill(g.begin(), g.end(), 0.0);
        add_gram(deltas, r * row_len, (r + 1) * row_len, g.data());
        ratio[r] = stock_ratio(g.data(), tasks);
      }
    });
  }
  const T inv_k = T(1) / static_cast<T>(tasks);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      T acc = 0;
      for (T* d : deltas) acc += d[i];
      out[i] = static_cast<T>(ratio[i / row_len]) * (acc * inv_k);
    }
  });
}

template void model_stock_update<float>(const std::vector<float*>&, size_t, size_t, float*, int);
template void model_stock_update<double>(const std::vector<double*>&, size_t, size_t, double*,
                                         int);

}  // namespace isofast
