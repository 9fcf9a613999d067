#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/parallel.hpp"
#include "interpolation.hpp"

namespace isofast {
namespace {

// The blocks, not the threads, fix the order of the float64 sums.
constexpr size_t kBlock = 1 << 16;

struct SlerpSums {
  double aa = 0, bb = 0, ab = 0;
};

}  // namespace

template <class T>
void slerp_update(const T* base, const T* delta, size_t n, double t, double dot_threshold,
                  double eps, T* out, int threads) {
  const size_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<SlerpSums> parts(blocks);
  parallel_for(blocks, threads, [&](size_t first, size_t last) {
    for (size_t k = first; k < last; ++k) {
      SlerpSums s;
      const size_t end = std::min(n, (k + 1) * kBlock);
      for (size_t i = k * kBlock; i < end; ++i) {
        const double a = base[i];
        const double b = static_cast<T>(base[i] + delta[i]);  // the other model, as loaded
        s.aa += a * a;
        s.bb += b * b;
        s.ab += a * b;
      }
      parts[k] = s;
    }
  });
  SlerpSums s;
  for (const SlerpSums& p : parts) {
    s.aa += p.aa;
    s.bb += p.bb;
    s.ab += p.ab;
  }
  double na = std::sqrt(s.aa), nb = std::sqrt(s.bb);
  if (!(na > eps)) na = 1.0;
  if (!(nb > eps)) nb = 1.0;
  const double dot = std::clamp(s.ab / na / nb, -1.0, 1.0);
  double keep_base = 0.0, coef_b = t;  // keep_base = c_a + c_b - 1
  if (std::fabs(dot) <= dot_threshold) {
    const double theta = std::acos(dot), sin_theta = std::sin(theta);
    const double coef_a = std::sin((1.0 - t) * theta) / sin_theta;
    coef_b = std::sin(t * theta) / sin_theta;
    keep_base = coef_a + coef_b - 1.0;
  }
  const T c0 = static_cast<T>(keep_base), c1 = static_cast<T>(coef_b);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) out[i] = c0 * base[i] + c1 * delta[i];
  });
}

template void slerp_update<float>(const float*, const float*, size_t, double, double, double,
                                  float*, int);
template void slerp_update<double>(const double*, const double*, size_t, double, double, double,
                                   double*, int);

}  // namespace isofast
