// Coefficients of the GEMM-only polar iteration (Polar Express-style minimax polynomials),
// shared by the CPU iteration (polar_iter.cpp) and the CUDA one (csrc/cuda/iso_c_cuda.cu).
// Host-only C++ (no BLAS, no CUDA): the .cu files include it as plain host code.
//
// The iteration. A (scaled so its singular values lie in [l, 1]) is driven to its polar
// factor by K odd quintic steps X <- a X + b X (X^T X) + c X (X^T X)^2, i.e. every singular
// value x goes to p(x) = a x + b x^3 + c x^5 while the singular vectors stay. Step k knows an
// interval [lo_k, hi_k] that holds every singular value and picks the odd quintic p that
// minimises max |1 - p(x)| over it; the next interval is the image p([lo_k, hi_k]).
//
// How the coefficients are derived (at run time, in double, by polar_schedule()):
//  1. Design interval: [max(lo, cushion * top), top] with top = hi + 0.01 * (hi - lo). The
//     1 % margin above hi keeps singular values that rounding (or the sigma_max bound) pushes
//     slightly past hi inside the region where p is controlled: past its design interval an
//     odd quintic with c > 0 grows like x^5 and the iteration would diverge.
//     The cushion (0.05, as Polar Express's 0.024 for bf16) stops the polynomial from
//     mapping mid-sized singular values to tiny ones (1 - E ~ 0 when lo -> 0), which in
//     finite precision would amplify rounding in directions that are well conditioned.
//  2. Minimax odd quintic on the design interval by the Remez exchange: the best
//     approximation of 1 by span{x, x^3, x^5} (a Haar system on x > 0) equioscillates at 4
//     points lo' < x1 < x2 < top with errors +E, -E, +E, -E. Each Remez pass solves the 4x4
//     linear system a x_i + b x_i^3 + c x_i^5 + (-1)^i E = 1 and moves x1, x2 to the roots of
//     p'(x) = a + 3 b x^2 + 5 c x^4 = 0; it converges in a handful of passes.
//     Once the interval is within 1e-3 of 1 the minimax quintic is within 1e-9 of the
//     Newton-Schulz quintic (15 x - 10 x^3 + 3 x^5) / 8 (p(1) = 1, p'(1) = p''(1) = 0), which
//     is used from then on (the 4x4 system becomes ill-conditioned as the points merge).
//  3. Recentre: scale p so that its minimum and maximum over [lo, top] are symmetric about 1
//     (after the cushion the minimum is p(lo), not 1 - E).
//  4. Next interval = [min p, max p] over [lo, top], from p at the ends and at x1, x2.
//  5. Stop when the interval is within `target` of 1 (target = eps of the compute type).
//
// For l = 1e-6 this gives 12 steps to float32 accuracy and 13 to float64 (tests check it).
// Steps 1-7 mostly multiply the smallest singular values by ~8 then ~4 each, steps 8-10
// bring everything near 1, the last ones are Newton-Schulz-like. The first steps, for l = 1e-6:
//   step  a         b           c          interval after the step
//   1     8.03221  -21.3991    15.1615     [8.03e-06, 2.0]
//   2     4.01607  -2.67488    0.473802    [3.23e-05, 2.0]
//   8     3.82571  -2.63556    0.48286     [0.127, 1.87]
//   10    2.33489  -1.68195    0.411309    [0.858, 1.14]
//   12    1.87497  -1.24993    0.374966    [1 - 4e-9, 1 + 4e-9]
//   (all of them: isofast._core.polar_schedule(1e-6, 2**-23))
#pragma once
#include <algorithm>
#include <cmath>
#include <vector>

#include "../core/error.hpp"

namespace isofast {

// One step: X <- a X + b X (X^T X) + c X (X^T X)^2; [lo, hi] holds the singular values after it.
struct PolarStep {
  double a = 0, b = 0, c = 0;
  double lo = 0, hi = 0;
};

constexpr double kPolarCushion = 0.05;
constexpr double kPolarMargin = 0.01;
// Below this distance from 1 the Newton-Schulz quintic replaces the Remez solve.
constexpr double kPolarNewtonSchulzZone = 1e-3;

inline double polar_poly(double a, double b, double c, double x) {
  const double x2 = x * x;
  return x * (a + x2 * (b + x2 * c));
}

namespace detail {

// Solve the 4x4 system m * s = rhs by Gaussian elimination with partial pivoting.
inline bool solve4(double m[4][4], double rhs[4], double s[4]) {
  for (int col = 0; col < 4; ++col) {
    int piv = col;
    for (int r = col + 1; r < 4; ++r)
      if (std::fabs(m[r][col]) > std::fabs(m[piv][col])) piv = r;
    if (!(std::fabs(m[piv][col]) > 0)) return false;
    if (piv != col) {
      for (int k = 0; k < 4; ++k) std::swap(m[piv][k], m[col][k]);
      std::swap(rhs[piv], rhs[col]);
    }
    for (int r = col + 1; r < 4; ++r) {
      const double f = m[r][col] / m[col][col];
      for (int k = col; k < 4; ++k) m[r][k] -= f * m[col][k];
      rhs[r] -= f * rhs[col];
    }
  }
  for (int r = 3; r >= 0; --r) {
    double acc = rhs[r];
    for (int k = r + 1; k < 4; ++k) acc -= m[r][k] * s[k];
    s[r] = acc / m[r][r];
  }
  return std::isfinite(s[0]) && std::isfinite(s[1]) && std::isfinite(s[2]) && std::isfinite(s[3]);
}

// Positive roots x1 < x2 of p'(x) = a + 3 b x^2 + 5 c x^4; false when there are not two.
inline bool critical_points(double a, double b, double c, double& x1, double& x2) {
  if (!(c != 0)) return false;
  const double disc = 9 * b * b - 20 * a * c;
  if (!(disc > 0)) return false;
  const double sq = std::sqrt(disc);
  // Stable quadratic roots in y = x^2.
  const double q = -0.5 * (3 * b + std::copysign(sq, b));
  double y1 = q / (5 * c), y2 = a / q;
  if (y1 > y2) std::swap(y1, y2);
  if (!(y1 > 0)) return false;
  x1 = std::sqrt(y1);
  x2 = std::sqrt(y2);
  return true;
}

}  // namespace detail

// Minimax odd quintic approximation of 1 on [lo, hi] (0 < lo < hi) by the Remez exchange.
// Returns a, b, c in the step and the equioscillation points in x1, x2.
inline PolarStep minimax_odd_quintic(double lo, double hi, double& x1, double& x2) {
  ISOFAST_CHECK(lo > 0 && hi > lo, "minimax_odd_quintic needs 0 < lo < hi, got [", lo, ", ", hi,
                "]");
  x1 = lo + 0.25 * (hi - lo);
  x2 = lo + 0.75 * (hi - lo);
  PolarStep best;
  for (int iter = 0; iter < 200; ++iter) {
    const double xs[4] = {lo, x1, x2, hi};
    double m[4][4], rhs[4], s[4];
    for (int i = 0; i < 4; ++i) {
      const double x = xs[i];
      m[i][0] = x;
      m[i][1] = x * x * x;
      m[i][2] = x * x * x * x * x;
      m[i][3] = (i % 2 == 0) ? 1.0 : -1.0;
      rhs[i] = 1.0;
    }
    if (!detail::solve4(m, rhs, s))
      throw Error(concat("polar coefficients: singular Remez system on [", lo, ", ", hi, "]"));
    best.a = s[0];
    best.b = s[1];
    best.c = s[2];
    double n1 = 0, n2 = 0;
    if (!detail::critical_points(best.a, best.b, best.c, n1, n2) || !(n1 > lo) || !(n2 < hi) ||
        !(n1 < n2))
      throw Error(concat("polar coefficients: Remez exchange left [", lo, ", ", hi, "]"));
    const double moved = std::fabs(n1 - x1) + std::fabs(n2 - x2);
    x1 = n1;
    x2 = n2;
    if (moved <= 1e-15 * hi) break;
  }
  return best;
}

// The whole schedule for singular values in [lower, 1]: steps until the interval is within
// `target` of 1 (at most max_steps; the last interval tells how far it got).
inline std::vector<PolarStep> polar_schedule(double lower, double target, int max_steps = 64) {
  ISOFAST_CHECK(lower > 0 && lower < 1, "polar iteration: lower_bound must be in (0, 1), got ",
                lower);
  ISOFAST_CHECK(target > 0 && target < 1, "polar iteration: target must be in (0, 1), got ",
                target);
  std::vector<PolarStep> steps;
  double lo = lower, hi = 1.0;
  while (static_cast<int>(steps.size()) < max_steps) {
    const double top = hi + kPolarMargin * (hi - lo);
    PolarStep st;
    double crit[2] = {1.0, 1.0};
    int ncrit = 0;
    if (std::max(1.0 - lo, top - 1.0) < kPolarNewtonSchulzZone) {
      st.a = 15.0 / 8.0;
      st.b = -10.0 / 8.0;
      st.c = 3.0 / 8.0;  // monotone: p'(x) = 15/8 (1 - x^2)^2 >= 0, no interior extrema
    } else {
      const double dlo = std::max(lo, kPolarCushion * top);
      double x1 = 0, x2 = 0;
      st = minimax_odd_quintic(dlo, top, x1, x2);
      crit[0] = x1;
      crit[1] = x2;
      ncrit = 2;
      // Recentre over [lo, top]: p is increasing on [0, x1], so the minimum is min(p(lo),
      // p(x2)) and the maximum max(p(x1), p(top)).
      const double pmin = std::min(polar_poly(st.a, st.b, st.c, lo), polar_poly(st.a, st.b, st.c, x2));
      const double pmax = std::max(polar_poly(st.a, st.b, st.c, x1), polar_poly(st.a, st.b, st.c, top));
      const double scale = 2.0 / (pmin + pmax);
      st.a *= scale;
      st.b *= scale;
      st.c *= scale;
    }
    double nlo = std::min(polar_poly(st.a, st.b, st.c, lo), polar_poly(st.a, st.b, st.c, top));
    double nhi = std::max(polar_poly(st.a, st.b, st.c, lo), polar_poly(st.a, st.b, st.c, top));
    for (int i = 0; i < ncrit; ++i) {
      if (crit[i] > lo && crit[i] < top) {
        const double v = polar_poly(st.a, st.b, st.c, crit[i]);
        nlo = std::min(nlo, v);
        nhi = std::max(nhi, v);
      }
    }
    st.lo = nlo;
    st.hi = nhi;
    steps.push_back(st);
    lo = nlo;
    hi = nhi;
    if (std::max(1.0 - lo, hi - 1.0) <= target) break;
  }
  return steps;
}

}  // namespace isofast
