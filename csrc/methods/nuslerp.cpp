#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/parallel.hpp"
#include "interpolation.hpp"

namespace isofast {
namespace {

// The blocks, not the threads, fix the order of the float64 sums.
constexpr size_t kBlock = 1 << 16;

struct PairSums {
  double aa = 0, bb = 0, ab = 0;
  void add(double a, double b) {
    aa += a * a;
    bb += b * b;
    ab += a * b;
  }
};

// mergekit's nuslerp coefficients of one pair of vectors from their float64 sums.
void nuslerp_coefs(const PairSums& s, double t, double eps, double& c0, double& c1) {
  const double na = std::max(std::sqrt(s.aa), 1e-7), nb = std::max(std::sqrt(s.bb), 1e-7);
  const double cos = std::clamp(s.ab / na / nb, -1.0, 1.0);
  if (1.0 - cos * cos <= eps * eps) {
    c0 = 1.0 - t;
    c1 = t;
    return;
  }
  const double theta = std::acos(cos), sin_theta = std::sin(theta);
  c0 = std::sin((1.0 - t) * theta) / sin_theta;
  c1 = std::sin(t * theta) / sin_theta;
}

}  // namespace

template <class T>
void nuslerp_update(const T* d0, const T* d1, size_t n, size_t len, bool strided, double t,
                    double eps, T* out, int threads) {
  if (n == 0 || len == 0) return;
  const size_t vectors = n / len;
  std::vector<PairSums> sums(vectors);
  if (vectors == 1) {
    const size_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<PairSums> parts(blocks);
    parallel_for(blocks, threads, [&](size_t first, size_t last) {
      for (size_t k = first; k < last; ++k) {
        PairSums s;
        for (size_t i = k * kBlock, e = std::min(n, (k + 1) * kBlock); i < e; ++i)
          s.add(d0[i], d1[i]);
        parts[k] = s;
      }
    });
    for (const PairSums& p : parts) {
      sums[0].aa += p.aa;
      sums[0].bb += p.bb;
      sums[0].ab += p.ab;
    }
  } else if (!strided) {  // rows of the last axis: one row per work item, in index order
    parallel_for(vectors, threads, [&](size_t first, size_t last) {
      for (size_t r = first; r < last; ++r) {
        PairSums s;
        for (size_t i = r * len; i < (r + 1) * len; ++i) s.add(d0[i], d1[i]);
        sums[r] = s;
      }
    });
  } else {  // vectors along the first axis: column j holds j + k * vectors, summed in k order
    parallel_for(vectors, threads, [&](size_t first, size_t last) {
      for (size_t k = 0; k < len; ++k) {
        const size_t row = k * vectors;
        for (size_t j = first; j < last; ++j) sums[j].add(d0[row + j], d1[row + j]);
      }
    });
  }
  std::vector<T> c0(vectors), c1(vectors);
  for (size_t v = 0; v < vectors; ++v) {
    double a, b;
    nuslerp_coefs(sums[v], t, eps, a, b);
    c0[v] = static_cast<T>(a);
    c1[v] = static_cast<T>(b);
  }
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      const size_t v = strided ? i % vectors : i / len;
      out[i] = c0[v] * d0[i] + c1[v] * d1[i];
    }
  });
}

template void nuslerp_update<float>(const float*, const float*, size_t, size_t, bool, double,
                                    double, float*, int);
template void nuslerp_update<double>(const double*, const double*, size_t, size_t, bool, double,
                                     double, double*, int);

}  // namespace isofast
