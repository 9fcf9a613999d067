// Iso-C on one 2-D key, end to end on the GPU (docs/ALGORITHMS.md sections 8.4 and 10):
//   D = sum_t (theta_t - theta_0)            (bf16/f16/f32/f64 in, converted on the device)
//   Q ~ polar(D) by the minimax quintic iteration (coefficients: linalg/polar_coeffs.hpp, the
//     same schedule as the CPU polar_iter), GEMMs on cuBLAS; for long matrices
//     (max(m, n) >= 3 min(m, n) >= 6144) on the R factor of a Householder QR (geqrf/ormqr)
//   certificate ||Q^T Q - I||_F / sqrt(r), ||Q^T D - D^T Q||_F / ||D||_F in float64 on the device
//   sigma_bar = trace(Q^T D) / r
//   if the certificate fails: the SVD route (float64 cusolverDnXgesvdp) with the contract's rank
//     cut, and a warning for the caller to surface
//   out = theta_0 + alpha * sigma_bar * Q   (or alpha * M when no base is given)
// All pointers are device pointers; the work runs on `stream`, which is synchronised before
// returning.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/tensor_view.hpp"

namespace isofast {

// The CPU core's view type, holding device pointers here.
using DeviceTensor = TensorView;

struct IsoCCudaOptions {
  double alpha = 1.0;
  double lower_bound = 1e-6;  // assumed sigma_min / sigma_max for the polar iteration
  double tol = 1e-5;          // certificate tolerance
  bool compute64 = true;      // float64 GEMMs (default; see polar_iter.hpp "Precision")
  int tf32_steps = 0;         // float32 only: the first k steps on TF32 tensor cores
  double rank_tol = -1.0;     // < 0: 16 * eps(compute type) (docs/CONTRACT.md)
  int power_iters = 8;
  bool force_svd = false;     // skip the polar iteration (benchmarks, tests)
  double target = 0;          // schedule's target distance to 1; 0: eps(compute type) for a
                              // float64 output, else max(eps(compute type), eps32)
  int qr_reduce = -1;         // QR first, iterate on R: -1 when max(m, n) >= 3 min(m, n) and
                              // min(m, n) >= 2048, 0 never, 1 always
};

struct IsoCCudaReport {
  std::string route;          // "polar", "svd" (fallback or forced) or "zero"
  double cert_orth = 0, cert_sym = 0;
  int steps = 0;
  double sigma_bar = 0;
  int rank = 0;               // directions kept (r on the polar route)
  std::string warning;        // non-empty when the polar route fell back to the SVD
  bool qr = false;            // the polar route ran on the R factor of a QR of D (or D^T)
  // SVD route diagnostics: sigma_max, gesvdp's h_err_sigma, the absolute cut, the largest
  // dropped singular value (0 when none).
  double sigma_max = 0, svd_err_sigma = 0, sigma_cut = 0, sigma_first_dropped = 0;
};

// finetuned[t]: theta_t (or D_t when base is null); out: same shape (any float dtype).
// Handles and workspaces are cached per (device, stream) between calls; calls are serialised.
IsoCCudaReport iso_c_cuda(const std::vector<DeviceTensor>& finetuned, const DeviceTensor* base,
                          const DeviceTensor& out, const IsoCCudaOptions& opt,
                          cudaStream_t stream);

// Destroy the cached handles and workspaces (registered with Python's atexit by the module, so
// that it runs before the CUDA runtime shuts down; safe to call at any time).
void release_cuda_contexts();

}  // namespace isofast
