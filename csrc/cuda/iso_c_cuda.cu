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

// The polar iteration on the device (the same algorithm as linalg/polar_iter.cpp): Q ends up
// in `q_out`. Returns the certificate's trace(Q^T D).
template <class W>
double polar_device(CudaContext& ctx, CudaBackend<W>& be, int rows, int cols, const W* d,
                    double d_norm, W* q_out, const IsoCCudaOptions& opt, double lower_bound,
                    IsoCCudaReport& rep) {
  cudaStream_t st = ctx.stream();
  const int n = std::min(rows, cols);
  const bool right = rows >= cols;
  const int longer = right ? rows : cols;
  const size_t count = static_cast<size_t>(rows) * cols;

  int exp2 = 0;
  std::frexp(d_norm, &exp2);
  DeviceBuffer<W> x(count, st), y(count, st), g(static_cast<size_t>(n) * n, st),
      g2(static_cast<size_t>(n) * n, st);
  cuda::scale(d, x.get(), static_cast<W>(std::ldexp(1.0, -exp2)), count, st);  // exact

  auto gram = [&](W* xs) {
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
    std::vector<W> v(static_cast<size_t>(n)), w(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i)
      v[i] = static_cast<W>(static_cast<double>(mix64(0x5EEDULL + static_cast<uint64_t>(i)) >> 11) *
                                (2.0 / 9007199254740992.0) -
                            1.0);
    DeviceBuffer<W> dv(static_cast<size_t>(n), st), dw(static_cast<size_t>(n), st);
    double rayleigh = 0;
    for (int it = 0; it <= opt.power_iters; ++it) {
      ISOFAST_CUDA_CHECK(cudaMemcpyAsync(dv.get(), v.data(), sizeof(W) * n, cudaMemcpyHostToDevice, st));
      be.gemv(n, g2.get(), n, dv.get(), dw.get());
      ISOFAST_CUDA_CHECK(cudaMemcpyAsync(w.data(), dw.get(), sizeof(W) * n, cudaMemcpyDeviceToHost, st));
      ctx.synchronize();
      double vv = 0, vw = 0, ww = 0;
      for (int i = 0; i < n; ++i) {
        vv += static_cast<double>(v[i]) * v[i];
        vw += static_cast<double>(v[i]) * w[i];
        ww += static_cast<double>(w[i]) * w[i];
      }
      if (!(vv > 0) || !(ww > 0)) break;
      rayleigh = std::max(rayleigh, vw / vv);
      const double inv = 1.0 / std::sqrt(ww);
      for (int i = 0; i < n; ++i) v[i] = static_cast<W>(w[i] * inv);
    }
    if (rayleigh > 0) lower = std::max(lower, std::pow(rayleigh, 0.25));
    lower = std::min(lower, upper);
  }

  const std::vector<PolarStep> sched = polar_schedule(
      std::max(lower_bound * lower / upper, 1e-300), std::numeric_limits<W>::epsilon());
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
    cuda::lincomb(g2.get(), static_cast<W>(cb), g.get(), static_cast<W>(cc), g2.get(),
                  static_cast<size_t>(n) * n, st);
    copy_d2d(y.get(), x.get(), count, st);
    if (right)
      be.gemm(false, false, rows, cols, cols, W(1), x.get(), rows, g2.get(), n, static_cast<W>(ca),
              y.get(), rows);
    else
      be.gemm(false, false, rows, cols, rows, W(1), g2.get(), n, x.get(), rows, static_cast<W>(ca),
              y.get(), rows);
    std::swap(x, y);
  }
  be.set_tf32(false);
  rep.steps = static_cast<int>(sched.size());
  copy_d2d(q_out, x.get(), count, st);
  return certificate<W>(ctx, rows, cols, q_out, d, d_norm, rep);
}

// The SVD route (ALGORITHMS.md with the contract's rank cut): M = sigma_bar * U_q V_q^T.
template <class W>
void svd_route(CudaContext& ctx, CudaBackend<W>& be, int rows, int cols, const W* d, double cut,
               W* m_out, IsoCCudaReport& rep) {
  cudaStream_t st = ctx.stream();
  const int r = std::min(rows, cols);
  const size_t count = static_cast<size_t>(rows) * cols;
  DeviceBuffer<W> a(count, st), s(static_cast<size_t>(r), st), u(static_cast<size_t>(rows) * r, st),
      vt(static_cast<size_t>(r) * cols, st);
  copy_d2d(a.get(), d, count, st);
  be.svd(rows, cols, a.get(), rows, s.get(), u.get(), rows, vt.get(), r);
  std::vector<W> hs(static_cast<size_t>(r));
  ISOFAST_CUDA_CHECK(cudaMemcpyAsync(hs.data(), s.get(), sizeof(W) * r, cudaMemcpyDeviceToHost, st));
  ctx.synchronize();
  const W limit = hs.empty() ? W(0) : static_cast<W>(hs[0] * cut);
  int q = 0;
  while (q < r && hs[q] > limit) ++q;
  rep.rank = q;
  if (q == 0) {
    ISOFAST_CUDA_CHECK(cudaMemsetAsync(m_out, 0, sizeof(W) * count, st));
    rep.sigma_bar = 0;
    return;
  }
  double total = 0;
  for (int i = 0; i < q; ++i) total += hs[i];
  const W sigma_bar = static_cast<W>(total / q);
  rep.sigma_bar = static_cast<double>(sigma_bar);
  be.gemm(false, false, rows, cols, q, sigma_bar, u.get(), rows, vt.get(), r, W(0), m_out, rows);
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

  const double eps = std::numeric_limits<W>::epsilon();
  const double cut = opt.rank_tol >= 0 ? opt.rank_tol : static_cast<double>(std::max(rows, cols)) * eps;
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
      const double trace = polar_device<W>(ctx, be, rows, cols, d.get(), d_norm, m.get(), opt, lb, rep);
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
      svd_route<W>(ctx, be, rows, cols, d.get(), cut, m.get(), rep);
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
      cudaSetDevice(previous);
    }
  }
  context_cache().clear();
}

}  // namespace isofast
