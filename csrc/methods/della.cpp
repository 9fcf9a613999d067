#include "della.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/rng.hpp"

namespace isofast {
namespace {

// The blocks, not the threads, fix the order of the float64 sums.
constexpr size_t kBlock = 1 << 16;

template <class T>
double l1_norm(const T* x, size_t n, int threads) {
  const size_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> parts(blocks);
  parallel_for(blocks, threads, [&](size_t first, size_t last) {
    for (size_t k = first; k < last; ++k) {
      double s = 0;
      for (size_t i = k * kBlock, e = std::min(n, (k + 1) * kBlock); i < e; ++i)
        s += std::fabs(static_cast<double>(x[i]));
      parts[k] = s;
    }
  });
  double total = 0;
  for (double s : parts) total += s;
  return total;
}

}  // namespace

template <class T>
void della_magprune(T* x, size_t n, size_t len, size_t stride, double density, double epsilon,
                    bool rescale, uint64_t key, int threads) {
  if (n == 0 || density >= 1.0) return;
  if (density <= 0.0) {
    std::fill(x, x + n, T(0));
    return;
  }
  ISOFAST_CHECK(density + epsilon < 1.0 && density - epsilon > 0.0,
                "della: epsilon must keep density +- epsilon in (0, 1), got density ", density,
                " and epsilon ", epsilon);
  const double before = rescale ? l1_norm(x, n, threads) : 0.0;
  const size_t rows = n / len;
  ISOFAST_CHECK(len <= UINT32_MAX, "della: rows of at most 2^32 entries, got ", len);
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  parallel_for(rows, threads, [&](size_t first, size_t last) {
    // (bits of |x|, index) pairs: the bits of a non-negative float order as the float does,
    // so one contiguous sort gives the ascending (|x|, index) ranks (ties by index, as a
    // stable sort by |x| would) without an indirect compare.
    std::vector<std::pair<Bits, uint32_t>> order(len);
    for (size_t r = first; r < last; ++r) {
      const size_t start = (r / stride) * len * stride + r % stride;
      for (size_t k = 0; k < len; ++k) {
        const T a = std::fabs(x[start + k * stride]);
        Bits bits;
        std::memcpy(&bits, &a, sizeof(T));
        order[k] = {bits, static_cast<uint32_t>(k)};
      }
      std::sort(order.begin(), order.end());
      const double span = len > 1 ? static_cast<double>(len - 1) : 1.0;
      for (size_t j = 0; j < len; ++j) {
        const size_t k = order[j].second;
        const double rank_norm = len > 1 ? static_cast<double>(j) / span : 0.0;
        const double p = (density - epsilon) + rank_norm * 2.0 * epsilon;
        const size_t i = start + k * stride;
        if (!(dare_uniform(key, i) >= 1.0 - p)) x[i] = T(0);
      }
    }
  });
  if (!rescale) return;
  const double after = l1_norm(x, n, threads);
  if (before < 1e-7 || after < 1e-7) return;
  const T scale = static_cast<T>(before / after);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) x[i] *= scale;
  });
}

template void della_magprune<float>(float*, size_t, size_t, size_t, double, double, bool,
                                    uint64_t, int);
template void della_magprune<double>(double*, size_t, size_t, size_t, double, double, bool,
                                     uint64_t, int);

}  // namespace isofast
