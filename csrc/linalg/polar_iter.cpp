#include "polar_iter.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "../core/error.hpp"
#include "../core/rng.hpp"

namespace isofast {
namespace {

// Host scratch of this CPU-only tool (the methods use Backend-owned Matrix<T> instead).
template <class T>
struct HostMatrix {
  int rows = 0, cols = 0;
  std::vector<T> data;
  HostMatrix(int r, int c) : rows(r), cols(c), data(static_cast<size_t>(r) * c) {}
  T* ptr() { return data.data(); }
  T* col(int j) { return data.data() + static_cast<size_t>(j) * rows; }
};

// Full symmetric matrix from the lower triangle that syrk wrote.
template <class T>
void symmetrize_lower(int n, T* g, int ld) {
  for (int j = 0; j < n; ++j)
    for (int i = j + 1; i < n; ++i) g[j + static_cast<size_t>(i) * ld] = g[i + static_cast<size_t>(j) * ld];
}

// ||A||_F in float64; +inf/NaN when A holds a non-finite value.
template <class T>
double frobenius64(int rows, int cols, const T* a, int lda) {
  double acc = 0;
  for (int j = 0; j < cols; ++j) {
    const T* c = a + static_cast<size_t>(j) * lda;
    for (int i = 0; i < rows; ++i) acc += static_cast<double>(c[i]) * static_cast<double>(c[i]);
  }
  return std::sqrt(acc);
}

template <class T>
bool all_finite(int rows, int cols, const T* a, int lda) {
  for (int j = 0; j < cols; ++j) {
    const T* c = a + static_cast<size_t>(j) * lda;
    T acc = 0;
    for (int i = 0; i < rows; ++i) acc += c[i] - c[i];  // NaN exactly when some c[i] is NaN/Inf
    if (!(acc == 0)) return false;
  }
  return true;
}

}  // namespace

template <class T>
void sigma_max_bounds(Backend<T>& be, int n, const T* g2, int ld, int power_iters, double& lower,
                      double& upper) {
  double frob = 0, inf = 0;
  for (int j = 0; j < n; ++j) {
    double col = 0;  // column sums = row sums (symmetric)
    for (int i = 0; i < n; ++i) {
      const double v = g2[i + static_cast<size_t>(j) * ld];
      frob += v * v;
      col += std::fabs(v);
    }
    inf = std::max(inf, col);
  }
  frob = std::sqrt(frob);
  // sigma_max^4 = lambda_max(g2) <= any consistent norm; >= ||g2||_F / sqrt(n).
  upper = std::pow(std::min(frob, inf), 0.25);
  double low = std::pow(frob / std::sqrt(static_cast<double>(std::max(n, 1))), 0.25);
  // Power iteration from a fixed pseudo-random start (deterministic output); the Rayleigh
  // quotient of a symmetric matrix never exceeds its largest eigenvalue.
  std::vector<T> v(static_cast<size_t>(n)), w(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i)
    v[i] = static_cast<T>(static_cast<double>(mix64(0x5EEDULL + static_cast<uint64_t>(i)) >> 11) *
                              (2.0 / 9007199254740992.0) -
                          1.0);
  double rayleigh = 0;
  for (int it = 0; it <= power_iters; ++it) {
    be.gemm(false, false, n, 1, n, T(1), g2, ld, v.data(), n, T(0), w.data(), n);
    double vv = 0, vw = 0, ww = 0;
    for (int i = 0; i < n; ++i) {
      vv += static_cast<double>(v[i]) * v[i];
      vw += static_cast<double>(v[i]) * w[i];
      ww += static_cast<double>(w[i]) * w[i];
    }
    if (!(vv > 0) || !(ww > 0)) break;
    rayleigh = std::max(rayleigh, vw / vv);
    const double inv = 1.0 / std::sqrt(ww);
    for (int i = 0; i < n; ++i) v[i] = static_cast<T>(w[i] * inv);
  }
  if (rayleigh > 0) low = std::max(low, std::pow(rayleigh, 0.25));
  lower = std::min(low, upper);
}

template <class T>
double polar_certificate(Backend<double>& be64, int rows, int cols, const T* a, int lda, const T* q,
                         int ldq, PolarResult& out) {
  constexpr int kBlock = 256;
  const bool right = rows >= cols;  // Gram side: Q^T Q (cols x cols), else Q Q^T (rows x rows)
  const int n = right ? cols : rows;
  const int len = right ? rows : cols;
  HostMatrix<double> c1(n, n), c2(n, n);
  double a2 = 0;
  if (right) {
    HostMatrix<double> qb(std::min(kBlock, std::max(rows, 1)), cols), ab(qb.rows, cols);
    for (int i0 = 0; i0 < len; i0 += kBlock) {
      const int b = std::min(kBlock, len - i0);
      for (int j = 0; j < cols; ++j) {
        for (int i = 0; i < b; ++i) {
          const double av = a[i0 + i + static_cast<size_t>(j) * lda];
          qb.data[i + static_cast<size_t>(j) * qb.rows] = q[i0 + i + static_cast<size_t>(j) * ldq];
          ab.data[i + static_cast<size_t>(j) * ab.rows] = av;
          a2 += av * av;
        }
      }
      const double beta = i0 == 0 ? 0.0 : 1.0;
      be64.syrk(true, n, b, 1.0, qb.ptr(), qb.rows, beta, c1.ptr(), n);
      be64.gemm(true, false, n, n, b, 1.0, qb.ptr(), qb.rows, ab.ptr(), ab.rows, beta, c2.ptr(), n);
    }
  } else {
    HostMatrix<double> qb(rows, std::min(kBlock, std::max(cols, 1))), ab(rows, qb.cols);
    for (int j0 = 0; j0 < len; j0 += kBlock) {
      const int b = std::min(kBlock, len - j0);
      for (int j = 0; j < b; ++j) {
        for (int i = 0; i < rows; ++i) {
          const double av = a[i + static_cast<size_t>(j0 + j) * lda];
          qb.data[i + static_cast<size_t>(j) * rows] = q[i + static_cast<size_t>(j0 + j) * ldq];
          ab.data[i + static_cast<size_t>(j) * rows] = av;
          a2 += av * av;
        }
      }
      const double beta = j0 == 0 ? 0.0 : 1.0;
      be64.syrk(false, n, b, 1.0, qb.ptr(), rows, beta, c1.ptr(), n);
      be64.gemm(false, true, n, n, b, 1.0, qb.ptr(), rows, ab.ptr(), rows, beta, c2.ptr(), n);
    }
  }
  double orth = 0, skew = 0, trace = 0;
  for (int j = 0; j < n; ++j) {
    const double d = c1.data[j + static_cast<size_t>(j) * n] - 1.0;
    orth += d * d;
    trace += c2.data[j + static_cast<size_t>(j) * n];
    for (int i = j + 1; i < n; ++i) {
      const double o = c1.data[i + static_cast<size_t>(j) * n];  // lower triangle of syrk
      orth += 2 * o * o;
      const double s = c2.data[i + static_cast<size_t>(j) * n] - c2.data[j + static_cast<size_t>(i) * n];
      skew += 2 * s * s;
    }
  }
  const double anorm = std::sqrt(a2);
  out.cert_orth = n > 0 ? std::sqrt(orth / n) : 0.0;
  out.cert_sym = anorm > 0 ? std::sqrt(skew) / anorm : 0.0;
  out.trace_qta = trace;
  return anorm;
}

template <class T>
PolarResult polar_iter(Backend<T>& be, int rows, int cols, const T* a, int lda, T* q, int ldq,
                       const PolarOptions& opt, Backend<double>& be64) {
  ISOFAST_CHECK(rows >= 0 && cols >= 0, "polar_iter: negative shape ", rows, " x ", cols);
  ISOFAST_CHECK(lda >= std::max(rows, 1) && ldq >= std::max(rows, 1),
                "polar_iter: leading dimension smaller than the row count");
  ISOFAST_CHECK(opt.tol > 0, "polar_iter: tol must be > 0, got ", opt.tol);
  ISOFAST_CHECK(opt.lower_bound > 0 && opt.lower_bound < 1,
                "polar_iter: lower_bound must be in (0, 1), got ", opt.lower_bound);
  PolarResult res;
  const int n = std::min(rows, cols);
  if (n == 0) {
    res.converged = true;
    return res;
  }
  if (!all_finite(rows, cols, a, lda))
    throw LinAlgError(concat("polar_iter on a ", rows, " x ", cols,
                             " matrix: the input holds NaN or Inf"));
  const double fro = frobenius64(rows, cols, a, lda);
  auto zero_q = [&] {
    for (int j = 0; j < cols; ++j) std::fill(q + static_cast<size_t>(j) * ldq, q + static_cast<size_t>(j) * ldq + rows, T(0));
  };
  if (fro == 0) {
    zero_q();
    res.cert_orth = 1.0;  // ||0 - I||_F / sqrt(r)
    return res;
  }

  const bool right = rows >= cols;  // X <- a X + X h (h = b G + c G^2, G = X^T X), else h X
  const int longer = right ? rows : cols;
  // Exact power-of-two scaling to ||X||_F in [0.5, 1): no rounding, no overflow in G^2.
  int exp2 = 0;
  std::frexp(fro, &exp2);
  const T pow2 = static_cast<T>(std::ldexp(1.0, -exp2));
  HostMatrix<T> x(rows, cols), y(rows, cols), g(n, n), g2(n, n);
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < rows; ++i) x.data[i + static_cast<size_t>(j) * rows] = a[i + static_cast<size_t>(j) * lda] * pow2;

  auto gram = [&] {
    be.syrk(right, n, longer, T(1), x.ptr(), rows, T(0), g.ptr(), n);
    symmetrize_lower(n, g.ptr(), n);
    be.gemm(false, false, n, n, n, T(1), g.ptr(), n, g.ptr(), n, T(0), g2.ptr(), n);
  };
  gram();
  double lower = 0, upper = 0;
  sigma_max_bounds(be, n, g2.ptr(), n, opt.power_iters, lower, upper);
  res.sigma_max_lower = std::ldexp(lower, exp2);
  res.sigma_max_upper = std::ldexp(upper, exp2);
  // Singular values of X / upper lie in [lower_bound * lower / upper, 1] when the assumed
  // bound holds; the first step's coefficients absorb the division by `upper` (no rounding).
  const double l0 = opt.lower_bound * lower / upper;
  const std::vector<PolarStep> sched =
      polar_schedule(std::max(l0, 1e-300), std::numeric_limits<T>::epsilon());

  for (size_t k = 0; k < sched.size(); ++k) {
    double ca = sched[k].a, cb = sched[k].b, cc = sched[k].c;
    if (k == 0) {
      ca /= upper;
      cb /= upper * upper * upper;
      cc /= upper * upper * upper * upper * upper;
    } else {
      gram();
    }
    // h = b G + c G^2, in place of G^2.
    const T tb = static_cast<T>(cb), tc = static_cast<T>(cc);
    for (size_t i = 0; i < g2.data.size(); ++i) g2.data[i] = tb * g.data[i] + tc * g2.data[i];
    std::memcpy(y.ptr(), x.ptr(), sizeof(T) * x.data.size());
    if (right)
      be.gemm(false, false, rows, cols, cols, T(1), x.ptr(), rows, g2.ptr(), n, static_cast<T>(ca), y.ptr(), rows);
    else
      be.gemm(false, false, rows, cols, rows, T(1), g2.ptr(), n, x.ptr(), rows, static_cast<T>(ca), y.ptr(), rows);
    std::swap(x, y);
  }
  res.steps = static_cast<int>(sched.size());
  for (int j = 0; j < cols; ++j)
    std::memcpy(q + static_cast<size_t>(j) * ldq, x.col(j), sizeof(T) * rows);

  polar_certificate(be64, rows, cols, a, lda, q, ldq, res);
  res.converged = std::isfinite(res.cert_orth) && std::isfinite(res.cert_sym) &&
                  res.cert_orth <= opt.tol && res.cert_sym <= opt.tol;
  return res;
}

template PolarResult polar_iter<float>(Backend<float>&, int, int, const float*, int, float*, int,
                                       const PolarOptions&, Backend<double>&);
template PolarResult polar_iter<double>(Backend<double>&, int, int, const double*, int, double*,
                                        int, const PolarOptions&, Backend<double>&);
template void sigma_max_bounds<float>(Backend<float>&, int, const float*, int, int, double&,
                                      double&);
template void sigma_max_bounds<double>(Backend<double>&, int, const double*, int, int, double&,
                                       double&);
template double polar_certificate<float>(Backend<double>&, int, int, const float*, int,
                                         const float*, int, PolarResult&);
template double polar_certificate<double>(Backend<double>&, int, int, const double*, int,
                                          const double*, int, PolarResult&);

}  // namespace isofast
