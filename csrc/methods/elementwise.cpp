#include "elementwise.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "../core/parallel.hpp"
#include "../core/rng.hpp"

namespace isofast {
namespace {

template <class T>
int sign_of(T v) {
  return (v > T(0)) - (v < T(0));
}

template <class T>
T trimmed(T x, double threshold) {
  return std::fabs(static_cast<double>(x)) >= threshold ? x : T(0);
}

// Elected sign of entry i: sign of the sum of trimmed values, `fallback` where it is 0.
template <class T>
int elected_sign(const std::vector<T*>& deltas, size_t i, const TiesSpec& spec, int fallback) {
  T total = 0;
  for (size_t t = 0; t < deltas.size(); ++t) total += trimmed(deltas[t][i], spec.thresholds[t]);
  const int s = sign_of(total);
  return s != 0 ? s : fallback;
}

}  // namespace

template <class T>
double ties_threshold(const T* x, size_t n, double density) {
  const auto kth = static_cast<size_t>(std::floor(static_cast<double>(n) * (1.0 - density)));
  if (kth < 1) return -std::numeric_limits<double>::infinity();
  std::vector<T> mags(x, x + n);
  for (auto& v : mags) v = std::fabs(v);
  std::nth_element(mags.begin(), mags.begin() + (kth - 1), mags.end());
  return static_cast<double>(mags[kth - 1]);
}

template <class T>
int64_t ties_sign_vote(const std::vector<T*>& deltas, size_t n, const TiesSpec& spec,
                       int threads) {
  std::atomic<int64_t> vote{0};
  parallel_for(n, threads, [&](size_t b, size_t e) {
    int64_t local = 0;
    for (size_t i = b; i < e; ++i) local += elected_sign(deltas, i, spec, 0);
    vote += local;
  });
  return vote.load();
}

template <class T>
void ties_merge(const std::vector<T*>& deltas, size_t n, const TiesSpec& spec, T* out,
                int threads) {
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      const int s = elected_sign(deltas, i, spec, spec.majority_sign);
      T acc = 0;
      int count = 0;
      for (size_t t = 0; t < deltas.size(); ++t) {
        const T v = trimmed(deltas[t][i], spec.thresholds[t]);
        if (v != T(0) && sign_of(v) == s) {
          acc += v;
          ++count;
        }
      }
      out[i] = spec.sum ? acc : acc / T(std::max(count, 1));
    }
  });
}

template <class T>
void dare_drop(T* x, size_t n, double drop_rate, uint64_t seed, const std::string& name,
               uint64_t task, int threads) {
  const uint64_t key = dare_key(seed, name, task);
  const T rescale = T(1.0 / (1.0 - drop_rate));
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) x[i] = dare_uniform(key, i) >= drop_rate ? x[i] * rescale : T(0);
  });
}

template <class T>
void consensus_mask(const std::vector<T*>& deltas, size_t n, double lam, int min_agree, T* out,
                    int threads) {
  const T l = static_cast<T>(lam);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      T total = 0;
      for (T* d : deltas) total += d[i];
      int agree = 0;
      for (T* d : deltas) agree += std::fabs(d[i]) >= l * std::fabs(total - d[i]);
      if (agree < min_agree) out[i] = T(0);
    }
  });
}

template <class T>
void task_sum(const std::vector<T*>& deltas, size_t n, bool mean, T* out, int threads) {
  const T scale = mean ? T(1) / T(deltas.size()) : T(1);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      T acc = 0;
      for (T* d : deltas) acc += d[i];
      out[i] = acc * scale;
    }
  });
}

namespace {

// Fixed blocks for the passes whose result depends on an order (tie ranks, sums): the
// blocks, not the threads, set it.
constexpr size_t kBlock = 1 << 16;

// The (0-based) rank-th smallest of mags[0, end) (all of it by default).
template <class T>
T abs_at_rank(std::vector<T>& mags, size_t rank, size_t end = 0) {
  const auto last = end ? mags.begin() + static_cast<std::ptrdiff_t>(end) : mags.end();
  std::nth_element(mags.begin(), mags.begin() + static_cast<std::ptrdiff_t>(rank), last);
  return mags[rank];
}

}  // namespace

template <class T>
void keep_rank_range(T* x, size_t n, size_t lo, size_t hi, bool index_ascending, int threads) {
  hi = std::min(hi, n);
  if (lo >= hi) {
    std::fill(x, x + n, T(0));
    return;
  }
  if (lo == 0 && hi == n) return;
  std::vector<T> mags(n);
  for (size_t i = 0; i < n; ++i) mags[i] = std::fabs(x[i]);
  // Boundary magnitudes: a = |x| at rank lo, b = |x| at rank hi - 1 (ascending).
  const T b = abs_at_rank(mags, hi - 1);
  // nth_element left every smaller value in front of hi - 1: rank lo lies among them.
  const T a = lo == hi - 1 ? b : abs_at_rank(mags, lo, hi - 1);
  std::vector<T>().swap(mags);
  const size_t blocks = (n + kBlock - 1) / kBlock;
  // Per block: entries below a, below b, equal to a, equal to b (blocks in index order).
  std::vector<size_t> below_a(blocks), below_b(blocks), eq_a(blocks), eq_b(blocks);
  parallel_for(blocks, threads, [&](size_t cb, size_t ce) {
    for (size_t c = cb; c < ce; ++c) {
      size_t la = 0, lb = 0, ea = 0, eb = 0;
      for (size_t i = c * kBlock, e = std::min(n, i + kBlock); i < e; ++i) {
        const T m = std::fabs(x[i]);
        la += m < a;
        lb += m < b;
        ea += m == a;
        eb += m == b;
      }
      below_a[c] = la, below_b[c] = lb, eq_a[c] = ea, eq_b[c] = eb;
    }
  });
  size_t less_a = 0, less_b = 0;
  for (size_t c = 0; c < blocks; ++c) less_a += below_a[c], less_b += below_b[c];
  // Ties at a: in the tie order, the first (lo - less_a) are below rank lo (dropped). Ties at
  // b: the first (hi - less_b) are at ranks < hi (kept).
  const size_t drop_a = lo - less_a, keep_b = hi - less_b;
  // Tie ranks run with the index (ascending) or against it: the number of ties before entry
  // i in tie order is a prefix (or suffix) count over the blocks.
  std::vector<size_t> start_a(blocks), start_b(blocks);
  size_t run_a = 0, run_b = 0;
  for (size_t k = 0; k < blocks; ++k) {
    const size_t c = index_ascending ? k : blocks - 1 - k;
    start_a[c] = run_a, start_b[c] = run_b;
    run_a += eq_a[c], run_b += eq_b[c];
  }
  parallel_for(blocks, threads, [&](size_t cb, size_t ce) {
    for (size_t c = cb; c < ce; ++c) {
      const size_t first = c * kBlock, last = std::min(n, first + kBlock);
      size_t ra = start_a[c], rb = start_b[c];
      for (size_t j = 0; j < last - first; ++j) {
        const size_t i = index_ascending ? first + j : last - 1 - j;
        const T m = std::fabs(x[i]);
        bool keep = m > a && m < b;
        const bool at_a = m == a, at_b = m == b;
        if (at_a || at_b) {
          // Inside [a, b] on both boundaries that apply.
          keep = (!at_a || ra >= drop_a) && (!at_b || rb < keep_b);
          ra += at_a;
          rb += at_b;
        }
        if (!keep) x[i] = T(0);
      }
    }
  });
}

template <class T>
void gta_sparsify(T* x, size_t n, int method, double density, double gamma, bool rescale,
                  uint64_t key, int threads) {
  if (method == 0 || n == 0) return;
  if (density >= 1.0) return;  // mergekit returns the tensor untouched
  const size_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> before(blocks);
  auto l1 = [&](std::vector<double>& sums) {
    parallel_for(blocks, threads, [&](size_t cb, size_t ce) {
      for (size_t c = cb; c < ce; ++c) {
        double s = 0;
        for (size_t i = c * kBlock, e = std::min(n, i + kBlock); i < e; ++i)
          s += std::fabs(static_cast<double>(x[i]));
        sums[c] = s;
      }
    });
    double total = 0;
    for (double s : sums) total += s;
    return total;
  };
  const double norm_before = rescale ? l1(before) : 0.0;
  const double dn = static_cast<double>(n);
  if (method == 1) {  // magnitude
    if (density <= 0) {
      std::fill(x, x + n, T(0));
    } else {
      const size_t k = std::max<size_t>(1, static_cast<size_t>(density * dn));
      // Top k of (|x| desc, index asc) == ranks [n - k, n) of (|x| asc, index desc).
      keep_rank_range(x, n, n - std::min(k, n), n, false, threads);
    }
  } else if (method == 2) {  // random (the contract's counter-based draw)
    const double drop = 1.0 - density;
    parallel_for(n, threads, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i)
        if (!(dare_uniform(key, i) >= drop)) x[i] = T(0);
    });
  } else {  // magnitude outliers
    const auto target = static_cast<size_t>(density * dn);
    const auto top = static_cast<size_t>(gamma * dn);
    const size_t bottom = n > target + top ? n - target - top : 0;
    keep_rank_range(x, n, bottom, bottom + target, true, threads);
  }
  if (!rescale) return;
  std::vector<double> after(blocks);
  const double norm_after = l1(after);
  if (norm_before < 1e-7 || norm_after < 1e-7) return;
  const T scale = static_cast<T>(norm_before / norm_after);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) x[i] *= scale;
  });
}

template <class T>
void gta_merge(const std::vector<T*>& deltas, size_t n, const std::vector<double>& weights,
               int elect, bool normalize, T* out, int threads) {
  const size_t tasks = deltas.size();
  std::vector<T> w(tasks);
  for (size_t t = 0; t < tasks; ++t) w[t] = static_cast<T>(weights[t]);
  T all = 0;
  for (T v : w) all += v;
  if (std::fabs(all) < T(1e-8)) all = T(1);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      int s = 0;
      if (elect == 1) {
        T vote = 0;
        for (size_t t = 0; t < tasks; ++t) vote += deltas[t][i];
        s = vote >= T(0) ? 1 : -1;
      } else if (elect == 2) {
        int vote = 0;
        for (size_t t = 0; t < tasks; ++t) vote += sign_of(deltas[t][i]);
        s = vote >= 0 ? 1 : -1;
      }
      T acc = 0, div = 0;
      for (size_t t = 0; t < tasks; ++t) {
        const T v = deltas[t][i];
        if (elect == 0 || sign_of(v) == s) {
          acc += v;
          div += w[t];
        }
      }
      if (elect == 0) div = all;
      else if (div == T(0)) div = T(1);
      out[i] = normalize ? acc / div : acc;
    }
  });
}

template <class T>
void abs_digit_histogram(const T* x, size_t n, int digit, uint64_t prefix, int64_t* hist) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr int width = 8 * sizeof(T);
  const int shift = width - 16 * (digit + 1);
  const int above = shift + 16;  // bits above the digit
  for (size_t i = 0; i < n; ++i) {
    T a = std::fabs(x[i]);
    Bits bits;
    std::memcpy(&bits, &a, sizeof(T));
    if (above < width && (static_cast<uint64_t>(bits) >> above) != prefix) continue;
    ++hist[(bits >> shift) & 0xffffu];
  }
}

#define ISOFAST_INSTANTIATE(T)                                                                   \
  template double ties_threshold<T>(const T*, size_t, double);                                  \
  template int64_t ties_sign_vote<T>(const std::vector<T*>&, size_t, const TiesSpec&, int);      \
  template void ties_merge<T>(const std::vector<T*>&, size_t, const TiesSpec&, T*, int);         \
  template void dare_drop<T>(T*, size_t, double, uint64_t, const std::string&, uint64_t, int);   \
  template void consensus_mask<T>(const std::vector<T*>&, size_t, double, int, T*, int);         \
  template void task_sum<T>(const std::vector<T*>&, size_t, bool, T*, int);                      \
  template void abs_digit_histogram<T>(const T*, size_t, int, uint64_t, int64_t*);            \
  template void keep_rank_range<T>(T*, size_t, size_t, size_t, bool, int);                       \
  template void gta_sparsify<T>(T*, size_t, int, double, double, bool, uint64_t, int);           \
  template void gta_merge<T>(const std::vector<T*>&, size_t, const std::vector<double>&, int,    \
                             bool, T*, int);
ISOFAST_INSTANTIATE(float)
ISOFAST_INSTANTIATE(double)
#undef ISOFAST_INSTANTIATE

}  // namespace isofast
