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
  template void abs_digit_histogram<T>(const T*, size_t, int, uint64_t, int64_t*);
ISOFAST_INSTANTIATE(float)
ISOFAST_INSTANTIATE(double)
#undef ISOFAST_INSTANTIATE

}  // namespace isofast
