#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/parallel.hpp"
#include "interpolation.hpp"

namespace isofast {
namespace {

// The blocks, not the threads, fix the order of the float64 sums.
constexpr size_t kBlock = 1 << 16;

// |v|^2 of v = sum_j c_j u_j for a Gram matrix u (row-major, k x k).
double sq_norm(const std::vector<double>& c, const std::vector<double>& u) {
  const size_t k = c.size();
  double s = 0;
  for (size_t i = 0; i < k; ++i)
    for (size_t j = 0; j < k; ++j) s += c[i] * u[i * k + j] * c[j];
  return std::max(s, 0.0);
}

}  // namespace

template <class T>
void karcher_update(const T* base, const std::vector<T*>& deltas, size_t n, int max_iter,
                    double tol, T* out, int threads) {
  if (n == 0) return;
  const size_t models = deltas.size() + 1, stats = models * models;
  // The full weights as loaded: X_0 = base, X_m = base + D_m rounded to T.
  auto x = [&](size_t m, size_t i) -> double {
    return m == 0 ? static_cast<double>(base[i])
                  : static_cast<double>(static_cast<T>(base[i] + deltas[m - 1][i]));
  };
  const size_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> parts(blocks * stats, 0.0);
  parallel_for(blocks, threads, [&](size_t first, size_t last) {
    std::vector<double> row(models);
    for (size_t k = first; k < last; ++k) {
      double* g = parts.data() + k * stats;
      for (size_t i = k * kBlock, e = std::min(n, (k + 1) * kBlock); i < e; ++i) {
        for (size_t a = 0; a < models; ++a) row[a] = x(a, i);
        for (size_t a = 0; a < models; ++a)
          for (size_t b = a; b < models; ++b) g[a * models + b] += row[a] * row[b];
      }
    }
  });
  std::vector<double> g(stats, 0.0);
  for (size_t k = 0; k < blocks; ++k)
    for (size_t p = 0; p < stats; ++p) g[p] += parts[k * stats + p];
  std::vector<double> norms(models);
  for (size_t a = 0; a < models; ++a) norms[a] = std::sqrt(std::max(g[a * models + a], 0.0));
  std::vector<size_t> valid;
  for (size_t a = 0; a < models; ++a)
    if (norms[a] > tol) valid.push_back(a);
  // coef[m]: the coefficient of X_m in the result.
  std::vector<double> coef(models, 0.0);
  if (!valid.empty()) {
    const size_t k = valid.size();
    std::vector<double> u(k * k);  // Gram matrix of the unit vectors u_j = X_j / |X_j|
    for (size_t i = 0; i < k; ++i)
      for (size_t j = 0; j < k; ++j) {
        const size_t a = std::min(valid[i], valid[j]), b = std::max(valid[i], valid[j]);
        u[i * k + j] = g[a * models + b] / (norms[valid[i]] * norms[valid[j]]);
      }
    const double alpha = 1.0 / static_cast<double>(k);
    std::vector<double> c(k, alpha);  // the mean on the sphere, in the unit vectors
    const double mean_norm = std::sqrt(sq_norm(c, u));
    if (mean_norm < tol) {
      std::fill(c.begin(), c.end(), 0.0);
      c[0] = 1.0;
    } else {
      for (double& v : c) v /= mean_norm;
    }
    std::vector<double> tangent(k);
    for (int it = 0; it < max_iter; ++it) {
      std::fill(tangent.begin(), tangent.end(), 0.0);
      for (size_t j = 0; j < k; ++j) {
        double dot = 0;
        for (size_t i = 0; i < k; ++i) dot += c[i] * u[i * k + j];
        dot = std::clamp(dot, -1.0, 1.0);
        const double theta = std::acos(dot);
        if (theta < tol) continue;
        const double f = alpha * theta / std::sin(theta);
        for (size_t i = 0; i < k; ++i) tangent[i] -= f * dot * c[i];
        tangent[j] += f;
      }
      const double tn = std::sqrt(sq_norm(tangent, u));
      if (tn < tol) break;
      const double cs = std::cos(tn), sn = std::sin(tn) / tn;
      for (size_t i = 0; i < k; ++i) c[i] = cs * c[i] + sn * tangent[i];
      const double unit_norm = std::sqrt(sq_norm(c, u));
      if (unit_norm > tol)
        for (double& v : c) v /= unit_norm;
    }
    double scale = 0;  // mergekit: the mean norm over every model, the zero ones included
    for (double v : norms) scale += v / static_cast<double>(models);
    for (size_t j = 0; j < k; ++j) coef[valid[j]] = scale * c[j] / norms[valid[j]];
  }
  // out = sum_m coef_m X_m - base = (sum_m coef_m - 1) base + sum_{m >= 1} coef_m D_m.
  double keep = -1.0;
  for (double v : coef) keep += v;
  const T keep_base = static_cast<T>(keep);
  std::vector<T> c(deltas.size());
  for (size_t m = 0; m < deltas.size(); ++m) c[m] = static_cast<T>(coef[m + 1]);
  parallel_for(n, threads, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      T acc = keep_base * base[i];
      for (size_t m = 0; m < deltas.size(); ++m) acc += c[m] * deltas[m][i];
      out[i] = acc;
    }
  });
}

template void karcher_update<float>(const float*, const std::vector<float*>&, size_t, int, double,
                                    float*, int);
template void karcher_update<double>(const double*, const std::vector<double*>&, size_t, int,
                                     double, double*, int);

}  // namespace isofast
