#include "iso_c_cuda.cuh"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <utility>

#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../linalg/polar_coeffs.hpp"
#include "cuda_backend.cuh"
#include "cuda_check.cuh"
#include "device_buffer.cuh"
#include "kernels.cuh"

namespace isofast {
namespace {

std::string model_label(size_t t) { return concat("fine-tuned model ", t); }

template <class T>
void copy_d2d(T* dst, const T* src, size_t n, cudaStream_t st) {
  if (n) ISOFAST_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(T) * n, cudaMemcpyDeviceToDevice, st));
}

// Float64 certificate of Q against D (both rows x cols column-major, device): fills the
// report's cert_orth / cert_sym and returns trace(Q^T D).
template <class W>
double certificate(CudaContext& ctx, int rows, int cols, const W* q, const W* d, double d_norm,
                   IsoCCudaReport& rep) {
  cudaStream_t st = ctx.stream();
  CudaBackend<double> be64(ctx);
  const size_t count = static_cast<size_t>(rows) * cols;
  DeviceBuffer<double> q64, d64;
  const double* qd;
  const double* dd;
  if constexpr (std::is_same_v<W, double>) {
    qd = q;
    dd = d;
  } else {
    q64.reserve(count, st);
    d64.reserve(count, st);
    cuda::convert(q, q64.get(), count, st);
    cuda::convert(d, d64.get(), count, st);
    qd = q64.get();
    dd = d64.get();
  }
  const bool right = rows >= cols;
  const int n = right ? cols : rows;
  DeviceBuffer<double> c1(static_cast<size_t>(n) * n, st), c2(static_cast<size_t>(n) * n, st);
  if (right) {
    be64.syrk(true, n, rows, 1.0, qd, rows, 0.0, c1.get(), n);
    be64.gemm(true, false, n, n, rows, 1.0, qd, rows, dd, rows, 0.0, c2.get(), n);
  } else {
    be64.syrk(false, n, cols, 1.0, qd, rows, 0.0, c1.get(), n);
    be64.gemm(false, true, n, n, cols, 1.0, qd, rows, dd, rows, 0.0, c2.get(), n);
  }
  double sums[3];
  cuda::certificate_sums(c1.get(), c2.get(), n, sums, st);
  rep.cert_orth = std::sqrt(sums[0] / n);
  rep.cert_sym = d_norm > 0 ? std::sqrt(sums[1]) / d_norm : 0.0;
  return sums[2];
}

// The quintic iteration on the device (the same algorithm and schedule as
// linalg/polar_iter.cpp) on the rows x cols column-major a (leading dimension rows); Q ends up
// in q_out. a_norm: ||a||_F (only its power of two is used, to scale exactly).
// Differences from the CPU loop, none of which changes the arithmetic beyond rounding: the
// power iteration for the lower sigma_max estimate runs on the device (no host round trips),
// and each step forms h = a I + b G + c G^2 and X h (or h X) instead of a X + X (b G + c G^2),
// which saves a full copy of X per step.
template <class W>
void polar_iterate(CudaContext& ctx, CudaBackend<W>& be, int rows, int cols, const W* a,
                   double a_norm, W* q_out, const IsoCCudaOptions& opt, double lower_bound,
                   double target, IsoCCudaReport& rep) {
  cudaStream_t st = ctx.stream();
  const int n = std::min(rows, cols);
  const bool right = rows >= cols;
  const int longer = right ? rows : cols;
  const size_t count = static_cast<size_t>(rows) * cols;

  int exp2 = 0;
  std::frexp(a_norm, &exp2);
  DeviceBuffer<W> x(count, st), y(count, st), g(static_cast<size_t>(n) * n, st),
      g2(static_cast<size_t>(n) * n, st);
  cuda::scale(a, x.get(), static_cast<W>(std::ldexp(1.0, -exp2)), count, st);  // exact

  auto gram = [&](const W* xs) {
    be.syrk(right, n, longer, W(1), xs, rows, W(0), g.get(), n);
    cuda::symmetrize_lower(g.get(), n, st);
    be.gemm(false, false, n, n, n, W(1), g.get(), n, g.get(), n, W(0), g2.get(), n);
  };
  gram(x.get());

  // sigma_max bounds of the scaled X from g2 = (X^T X)^2: rigorous upper bound
  // min(||g2||_F, ||g2||_inf)^(1/4); lower = power iteration's Rayleigh quotient^(1/4).
  std::vector<double> sumsq, sumabs;
  cuda::column_norms(g2.get(), n, n, n, sumsq, sumabs, st);
  const double frob = std::sqrt(std::accumulate(sumsq.begin(), sumsq.end(), 0.0));
  const double inf = *std::max_element(sumabs.begin(), sumabs.end());
  const double upper = std::pow(std::min(frob, inf), 0.25);
  double lower = std::pow(frob / std::sqrt(static_cast<double>(n)), 0.25);
  {
    std::vector<W> v(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i)
      v[i] = static_cast<W>(static_cast<double>(mix64(0x5EEDULL + static_cast<uint64_t>(i)) >> 11) *
                                (2.0 / 9007199254740992.0) -
                            1.0);
    const int iters = std::max(opt.power_iters, 0) + 1;
    DeviceBuffer<W> dv(static_cast<size_t>(n), st), dw(static_cast<size_t>(n), st);
    DeviceBuffer<double> rq(static_cast<size_t>(iters), st);
    ISOFAST_CUDA_CHECK(cudaMemcpyAsync(dv.get(), v.data(), sizeof(W) * n, cudaMemcpyHostToDevice, st));
    for (int it = 0; it < iters; ++it) {
      be.gemv(n, g2.get(), n, dv.get(), dw.get());
      cuda::power_step(dw.get(), dv.get(), n, rq.get() + it, st);
    }
    std::vector<double> hrq(static_cast<size_t>(iters));
    ISOFAST_CUDA_CHECK(cudaMemcpyAsync(hrq.data(), rq.get(), sizeof(double) * iters,
                                       cudaMemcpyDeviceToHost, st));
    ctx.synchronize();  // also keeps v alive until the copy is done
    double rayleigh = 0;
    for (double q : hrq)
      if (std::isfinite(q)) rayleigh = std::max(rayleigh, q);
    if (rayleigh > 0) lower = std::max(lower, std::pow(rayleigh, 0.25));
    lower = std::min(lower, upper);
  }

  const std::vector<PolarStep> sched =
      polar_schedule(std::max(lower_bound * lower / upper, 1e-300), target);
  for (size_t k = 0; k < sched.size(); ++k) {
    be.set_tf32(static_cast<int>(k) < opt.tf32_steps);
    double ca = sched[k].a, cb = sched[k].b, cc = sched[k].c;
    if (k == 0) {  // fold the division by `upper` into the first step (no rounding of X)
      ca /= upper;
      cb /= upper * upper * upper;
      cc /= upper * upper * upper * upper * upper;
    } else {
      gram(x.get());
    }
    cuda::poly_h(g2.get(), static_cast<W>(ca), static_cast<W>(cb), g.get(), static_cast<W>(cc),
                 g2.get(), n, st);
    W* dst = k + 1 == sched.size() ? q_out : y.get();  // the last step writes Q in place
    if (right)
      be.gemm(false, false, rows, cols, cols, W(1), x.get(), rows, g2.get(), n, W(0), dst, rows);
    else
      be.gemm(false, false, rows, cols, rows, W(1), g2.get(), n, x.get(), rows, W(0), dst, rows);
    std::swap(x, y);
  }
  if (sched.empty()) copy_d2d(q_out, x.get(), count, st);
  be.set_tf32(false);
  rep.steps = static_cast<int>(sched.size());
}

template <class W>
void geqrf(CudaContext& ctx, int m, int n, W* a, int lda, W* tau) {
  int lwork = 0;
  if constexpr (std::is_same_v<W, float>)
    ISOFAST_CUSOLVER_CHECK(cusolverDnSgeqrf_bufferSize(ctx.solver(), m, n, a, lda, &lwork));
  else
    ISOFAST_CUSOLVER_CHECK(cusolverDnDgeqrf_bufferSize(ctx.solver(), m, n, a, lda, &lwork));
  W* work = static_cast<W*>(ctx.device_workspace(sizeof(W) * static_cast<size_t>(std::max(lwork, 1))));
  if constexpr (std::is_same_v<W, float>)
    ISOFAST_CUSOLVER_CHECK(cusolverDnSgeqrf(ctx.solver(), m, n, a, lda, tau, work, lwork, ctx.device_info()));
  else
    ISOFAST_CUSOLVER_CHECK(cusolverDnDgeqrf(ctx.solver(), m, n, a, lda, tau, work, lwork, ctx.device_info()));
  check_cusolver_info("cusolverDn<t>geqrf", ctx.read_info(), m, n);
}

// c (m x n) <- Q c with Q the m x m orthogonal factor of a geqrf (k = n reflectors).
template <class W>
void ormqr_left(CudaContext& ctx, int m, int n, const W* a, int lda, const W* tau, W* c, int ldc) {
  int lwork = 0;
  if constexpr (std::is_same_v<W, float>)
    ISOFAST_CUSOLVER_CHECK(cusolverDnSormqr_bufferSize(ctx.solver(), CUBLAS_SIDE_LEFT, CUBLAS_OP_N, m,
                                                       n, n, a, lda, tau, c, ldc, &lwork));
  else
    ISOFAST_CUSOLVER_CHECK(cusolverDnDormqr_bufferSize(ctx.solver(), CUBLAS_SIDE_LEFT, CUBLAS_OP_N, m,
                                                       n, n, a, lda, tau, c, ldc, &lwork));
  W* work = static_cast<W*>(ctx.device_workspace(sizeof(W) * static_cast<size_t>(std::max(lwork, 1))));
  if constexpr (std::is_same_v<W, float>)
    ISOFAST_CUSOLVER_CHECK(cusolverDnSormqr(ctx.solver(), CUBLAS_SIDE_LEFT, CUBLAS_OP_N, m, n, n, a,
                                            lda, tau, c, ldc, work, lwork, ctx.device_info()));
  else
    ISOFAST_CUSOLVER_CHECK(cusolverDnDormqr(ctx.solver(), CUBLAS_SIDE_LEFT, CUBLAS_OP_N, m, n, n, a,
                                            lda, tau, c, ldc, work, lwork, ctx.device_info()));
  check_cusolver_info("cusolverDn<t>ormqr", ctx.read_info(), m, n);
}

// Tall a (big x small, column-major, leading dimension big): a = Q_R R (Householder QR),
// polar(a) = Q_R polar(R), so the quintic steps run on the small x small R (5 small^3 FLOPs a
// step instead of 3 big small^2 + 2 small^3). Q_R is orthogonal to working precision; the
// certificate is still taken against the original D.
template <class W>
void polar_tall_qr(CudaContext& ctx, CudaBackend<W>& be, int big, int small, const W* a,
                   double a_norm, W* q_out, const IsoCCudaOptions& opt, double lower_bound,
                   double target, IsoCCudaReport& rep) {
  cudaStream_t st = ctx.stream();
  const size_t count = static_cast<size_t>(big) * small;
  const size_t sq = static_cast<size_t>(small) * small;
  DeviceBuffer<W> qr(count, st), tau(static_cast<size_t>(small), st), r(sq, st), p(sq, st);
  copy_d2d(qr.get(), a, count, st);
  geqrf<W>(ctx, big, small, qr.get(), big, tau.get());
  cuda::upper_triangle(qr.get(), big, small, r.get(), st);
  polar_iterate<W>(ctx, be, small, small, r.get(), a_norm, p.get(), opt, lower_bound, target, rep);
  ISOFAST_CUDA_CHECK(cudaMemsetAsync(q_out, 0, sizeof(W) * count, st));
  ISOFAST_CUDA_CHECK(cudaMemcpy2DAsync(q_out, sizeof(W) * static_cast<size_t>(big), p.get(),
                                       sizeof(W) * static_cast<size_t>(small),
                                       sizeof(W) * static_cast<size_t>(small),
                                       static_cast<size_t>(small), cudaMemcpyDeviceToDevice, st));
  ormqr_left<W>(ctx, big, small, qr.get(), big, tau.get(), q_out, big);
}

// Q ~ polar(d) into q_out by the quintic iteration (through a QR reduction when the matrix is
// long: opt.qr_reduce), then the float64 certificate. Returns trace(Q^T D).
template <class W>
double polar_device(CudaContext& ctx, CudaBackend<W>& be, int rows, int cols, const W* d,
                    double d_norm, W* q_out, const IsoCCudaOptions& opt, double lower_bound,
                    double target, IsoCCudaReport& rep) {
  cudaStream_t st = ctx.stream();
  const int big = std::max(rows, cols), small = std::min(rows, cols);
  // Auto: measured on an H200 (bench/results_gpu.md), the QR reduction saves 20 % on
  // 4096 x 14336 but doubles the time of 4096 x 1024 (cuSOLVER's geqrf panel kernel dominates
  // there), so only long matrices with a large short side take it.
  const bool use_qr = opt.qr_reduce > 0 ||
                      (opt.qr_reduce < 0 && static_cast<int64_t>(big) >= 3LL * small && small >= 2048);
  rep.qr = use_qr;
  if (!use_qr) {
    polar_iterate<W>(ctx, be, rows, cols, d, d_norm, q_out, opt, lower_bound, target, rep);
  } else if (rows >= cols) {
    polar_tall_qr<W>(ctx, be, rows, cols, d, d_norm, q_out, opt, lower_bound, target, rep);
  } else {  // wide: polar(D) = polar(D^T)^T, and D^T is tall
    const size_t count = static_cast<size_t>(rows) * cols;
    DeviceBuffer<W> dt(count, st), qt(count, st);
    // beta = 0 with B = C (cuBLAS's in-place form); zeroed first so no stale NaN can leak.
    ISOFAST_CUDA_CHECK(cudaMemsetAsync(dt.get(), 0, sizeof(W) * count, st));
    be.geam(true, false, cols, rows, W(1), d, rows, W(0), dt.get(), cols, dt.get(), cols);
    polar_tall_qr<W>(ctx, be, cols, rows, dt.get(), d_norm, qt.get(), opt, lower_bound, target, rep);
    ISOFAST_CUDA_CHECK(cudaMemsetAsync(q_out, 0, sizeof(W) * count, st));
    be.geam(true, false, rows, cols, W(1), qt.get(), cols, W(0), q_out, rows, q_out, rows);
  }
  return certificate<W>(ctx, rows, cols, q_out, d, d_norm, rep);
}

// The SVD route (docs/ALGORITHMS.md section 8.4, with the rank cut of docs/CONTRACT.md):
// M = sigma_bar * U_q V_q^T, always computed in float64 (cusolverDnXgesvdp): it is the fallback
// that must hold when the iteration could not certify, and a float32 gesvdp was measured to
// return garbage (relative error 1.8e2) on 4096 x 4096 inputs of condition number 1e5.
// Kept: sigma_i > max(cut * sigma_max, 2 * err_sigma), err_sigma = gesvdp's own perturbation
// estimate, so that the null space of an exactly low-rank D, which gesvdp resolves only to its
// own accuracy, is not taken for genuine directions.
template <class W>
void svd_route(CudaContext& ctx, int rows, int cols, const W* d, double cut, W* m_out,
               IsoCCudaReport& rep) {
  cudaStream_t st = ctx.stream();
  CudaBackend<double> be(ctx);
  const int r = std::min(rows, cols);
  const size_t count = static_cast<size_t>(rows) * cols;
  DeviceBuffer<double> a(count, st), s(static_cast<size_t>(r), st),
      u(static_cast<size_t>(rows) * r, st), vt(static_cast<size_t>(r) * cols, st);
  if constexpr (std::is_same_v<W, double>)
    copy_d2d(a.get(), d, count, st);
  else
    cuda::convert(d, a.get(), count, st);
  be.svd(rows, cols, a.get(), rows, s.get(), u.get(), rows, vt.get(), r);
  std::vector<double> hs(static_cast<size_t>(r));
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(hs.data(), s.get(), sizeof(double) * r, cudaMemcpyDeviceToHost, st));
  ctx.synchronize();
  rep.svd_err_sigma = be.last_svd_err_sigma();
  rep.sigma_max = hs.empty() ? 0.0 : hs[0];
  const double limit = hs.empty() ? 0.0 : std::max(hs[0] * cut, 2.0 * rep.svd_err_sigma);
  rep.sigma_cut = limit;
  int q = 0;
  while (q < r && hs[q] > limit) ++q;
  rep.rank = q;
  rep.sigma_first_dropped = q < r ? hs[q] : 0.0;
  if (q == 0) {
    ISOFAST_CUDA_CHECK(cudaMemsetAsync(m_out, 0, sizeof(W) * count, st));
    rep.sigma_bar = 0;
    return;
  }
  double total = 0;
  for (int i = 0; i < q; ++i) total += hs[i];
  rep.sigma_bar = total / q;
  if constexpr (std::is_same_v<W, double>) {
    be.gemm(false, false, rows, cols, q, rep.sigma_bar, u.get(), rows, vt.get(), r, 0.0, m_out, rows);
  } else {
    be.gemm(false, false, rows, cols, q, rep.sigma_bar, u.get(), rows, vt.get(), r, 0.0, a.get(), rows);
    cuda::convert(a.get(), m_out, count, st);
  }
}

// cuBLAS / cuSOLVER handles and workspaces, cached per (device, stream) across calls (handle
// creation costs milliseconds). One call at a time uses them (the lock in iso_c_cuda).
std::mutex& context_mutex() {
  static std::mutex mu;
  return mu;
}
std::map<std::pair<int, cudaStream_t>, std::unique_ptr<CudaContext>>& context_cache() {
  static std::map<std::pair<int, cudaStream_t>, std::unique_ptr<CudaContext>> cache;
  return cache;
}
CudaContext& cached_context(cudaStream_t stream) {
  int device = 0;
  ISOFAST_CUDA_CHECK(cudaGetDevice(&device));
  auto& slot = context_cache()[{device, stream}];
  if (!slot) slot = std::make_unique<CudaContext>(stream);
  return *slot;
}

template <class W>
IsoCCudaReport run(const std::vector<DeviceTensor>& fts, const DeviceTensor* base,
                   const DeviceTensor& out, const IsoCCudaOptions& opt, cudaStream_t stream) {
  IsoCCudaReport rep;
  const int64_t m64 = out.shape[0], n64 = out.shape[1];
  ISOFAST_CHECK(m64 <= std::numeric_limits<int>::max() && n64 <= std::numeric_limits<int>::max(),
                "iso_c (cuda): matrix too large");
  // Row-major m x n D is the column-major n x m X = D^T; polar(D^T) = polar(D)^T, so Q of X
  // in column-major order is polar(D) in row-major order (as the CPU core does).
  const int rows = static_cast<int>(n64), cols = static_cast<int>(m64);
  const size_t count = static_cast<size_t>(rows) * cols;
  const int r = std::min(rows, cols);

  CudaContext& ctx = cached_context(stream);
  CudaBackend<W> be(ctx);
  DeviceBuffer<W> d(count, stream), m(count, stream);
  DeviceBuffer<int> flags(std::max<size_t>(fts.size(), 1), stream);
  ISOFAST_CUDA_CHECK(cudaMemsetAsync(flags.get(), 0, sizeof(int) * flags.size(), stream));
  for (size_t t = 0; t < fts.size(); ++t)
    cuda::accumulate_task<W>(fts[t].data, fts[t].dtype, base ? base->data : nullptr,
                             base ? base->dtype : DType::F32, d.get(), count, t == 0,
                             flags.get() + t, stream);
  std::vector<int> hflags(flags.size());
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(hflags.data(), flags.get(), sizeof(int) * hflags.size(),
                                     cudaMemcpyDeviceToHost, stream));
  ctx.synchronize();
  for (size_t t = 0; t < fts.size(); ++t) {
    ISOFAST_CHECK(!(hflags[t] & 2), "the base model's tensor holds NaN or Inf");
    ISOFAST_CHECK(!(hflags[t] & 1), "the tensor of ", model_label(t), " holds NaN or Inf");
  }

  // Rank cut of docs/CONTRACT.md: rank_tol, else 16 * eps(compute type), relative to sigma_max.
  const double eps = std::numeric_limits<W>::epsilon();
  const double cut = opt.rank_tol >= 0 ? opt.rank_tol : 16.0 * eps;
  std::vector<double> sumsq, sumabs;
  cuda::column_norms(d.get(), rows, cols, rows, sumsq, sumabs, stream);
  const double d_norm = std::sqrt(std::accumulate(sumsq.begin(), sumsq.end(), 0.0));

  if (r == 0 || d_norm == 0) {
    rep.route = "zero";
    ISOFAST_CUDA_CHECK(cudaMemsetAsync(m.get(), 0, sizeof(W) * count, stream));
  } else {
    bool done = false;
    if (!opt.force_svd) {
      // Singular values below the rank cut are dropped by the contract; the iteration can only
      // certify inputs whose spectrum lies above its lower bound, so use the larger of both.
      const double lb = std::max(opt.lower_bound, std::min(cut, 0.5));
      // Iterate to the output's precision: float32 (or narrower) outputs need no float64-exact Q.
      const double target =
          opt.target > 0 ? opt.target
                         : (out.dtype == DType::F64 ? eps : std::max(eps, 1.1920928955078125e-07));
      const double trace =
          polar_device<W>(ctx, be, rows, cols, d.get(), d_norm, m.get(), opt, lb, target, rep);
      const bool ok = std::isfinite(rep.cert_orth) && std::isfinite(rep.cert_sym) &&
                      rep.cert_orth <= opt.tol && rep.cert_sym <= opt.tol;
      if (ok) {
        rep.route = "polar";
        rep.rank = r;
        rep.sigma_bar = trace / r;
        cuda::scale(m.get(), m.get(), static_cast<W>(rep.sigma_bar), count, stream);
        done = true;
      } else {
        rep.warning = concat("iso_c (cuda): the polar iteration did not certify its result on a ",
                             m64, " x ", n64, " matrix (||Q^T Q - I||_F/sqrt(r) = ", rep.cert_orth,
                             ", ||Q^T D - D^T Q||_F/||D||_F = ", rep.cert_sym, ", tol ", opt.tol,
                             "): condition number above 1/", lb,
                             " or rank-deficient; fell back to the SVD route (cusolverDnXgesvdp)");
      }
    }
    if (!done) {
      rep.route = "svd";
      svd_route<W>(ctx, rows, cols, d.get(), cut, m.get(), rep);
    }
  }
  cuda::write_merged<W>(m.get(), opt.alpha, base ? base->data : nullptr,
                        base ? base->dtype : DType::F32, out.data, out.dtype, count, stream);
  ctx.synchronize();
  return rep;
}

}  // namespace

IsoCCudaReport iso_c_cuda(const std::vector<DeviceTensor>& finetuned, const DeviceTensor* base,
                          const DeviceTensor& out, const IsoCCudaOptions& opt,
                          cudaStream_t stream) {
  ISOFAST_CHECK(!finetuned.empty(), "iso_c (cuda) needs at least one fine-tuned tensor");
  ISOFAST_CHECK(out.shape.size() == 2, "iso_c (cuda) works on 2-D tensors, got ",
                out.shape.size(), " dimensions");
  auto same = [&](const DeviceTensor& t, const std::string& what) {
    ISOFAST_CHECK(t.shape == out.shape, what, " has a different shape from the output");
  };
  for (size_t t = 0; t < finetuned.size(); ++t) same(finetuned[t], model_label(t));
  if (base) same(*base, "the base model's tensor");
  ISOFAST_CHECK(opt.tol > 0, "iso_c (cuda): tol must be > 0");
  ISOFAST_CHECK(opt.lower_bound > 0 && opt.lower_bound < 1,
                "iso_c (cuda): lower_bound must be in (0, 1), got ", opt.lower_bound);
  ISOFAST_CHECK(opt.tf32_steps >= 0, "iso_c (cuda): tf32_steps must be >= 0");
  ISOFAST_CHECK(opt.target >= 0 && opt.target < 1, "iso_c (cuda): target must be in [0, 1)");
  ISOFAST_CHECK(std::isfinite(opt.alpha), "alpha must be finite, got ", opt.alpha);
  std::lock_guard<std::mutex> lock(context_mutex());
  return opt.compute64 ? run<double>(finetuned, base, out, opt, stream)
                       : run<float>(finetuned, base, out, opt, stream);
}

void release_cuda_contexts() {
  std::lock_guard<std::mutex> lock(context_mutex());
  for (auto& [key, ctx] : context_cache()) {
    if (!ctx) continue;
    int previous = 0;
    if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(key.first) == cudaSuccess) {
      cudaStreamSynchronize(key.second);
      ctx.reset();
      cudaMemPool_t pool = nullptr;  // hand the pool's kept memory back (CudaContext keeps it)
      if (cudaDeviceGetDefaultMemPool(&pool, key.first) == cudaSuccess) cudaMemPoolTrimTo(pool, 0);
      cudaSetDevice(previous);
    }
  }
  context_cache().clear();
}

}  // namespace isofast
