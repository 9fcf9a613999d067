// GEMM-only polar factor (the GPU route of docs/ALGORITHMS.md, section 10): Q ~ polar(A) =
// U V^T of A = U S V^T by a Polar Express-style sequence of minimax odd quintic steps
// (coefficients: polar_coeffs.hpp), with the certificate that lets a caller fall back to an
// SVD route:
//   cert_orth = ||Q^T Q - I||_F / sqrt(r)   and   cert_sym = ||Q^T A - A^T Q||_F / ||A||_F
// (for a wide A the Gram side is the short one: Q Q^T and Q A^T). Both are computed in
// float64 whatever T is, so the certificate measures Q, not the rounding of its own check.
// Written against Backend<T> (gemm, syrk) plus O(mn) host loops; the CUDA Iso-C path runs the
// same algorithm with the same schedule on the device (csrc/cuda/iso_c_cuda.cu).
//
// Precision. The iteration computes in T. Measured in float32 (tests/test_polar_iter.py): the
// error is 2-3x (at most ~5x) the change of the polar factor that one float32 rounding of
// A's entries causes: ~1e-4 at cond 1e5, ~1e-3 at cond 1e6 on square and rectangular random
// inputs, while gesdd stays near 1e-7 there (its backward error is graded on such spectra).
// TF32 GEMMs (operands rounded to 10 mantissa bits, float32 accumulation; simulated in numpy)
// leave ~1e-3 error and cert_sym ~1e-3 even when only the first step uses them (3e-3 with
// the first 9 of 12): rotations among the large singular directions are never undone by
// later steps, so a TF32 step cannot pass a 1e-5 certificate.
// For Iso-C at the contract's float32 tolerance (1e-4) on real condition numbers (1e4..2.5e5)
// run the iteration in float64 (error ~1e-11 at cond 1e6; on H100/H200 FP64 tensor-core GEMMs run
// at the FP32 (non-TF32) rate).
#pragma once
#include <vector>

#include "backend.hpp"
#include "polar_coeffs.hpp"

namespace isofast {

struct PolarOptions {
  // Assumed lower bound on sigma_min / sigma_max; singular values below it do not converge,
  // which the certificate then reports.
  double lower_bound = 1e-6;
  // Certificate tolerance: converged = cert_orth <= tol && cert_sym <= tol.
  double tol = 1e-5;
  // Power iterations on (A^T A)^2 for the lower estimate of sigma_max.
  int power_iters = 8;
};

struct PolarResult {
  double cert_orth = 0;   // ||Q^T Q - I||_F / sqrt(r)
  double cert_sym = 0;    // ||Q^T A - A^T Q||_F / ||A||_F
  bool converged = false;
  int steps = 0;          // quintic steps run
  double trace_qta = 0;   // trace(Q^T A): Iso-C's sigma_bar = trace_qta / r
  double sigma_max_upper = 0;  // rigorous bound used for scaling (of A)
  double sigma_max_lower = 0;  // power-iteration estimate (a lower bound of sigma_max)
};

// Q (rows x cols, leading dimension ldq) ~ polar(A) for the column-major rows x cols matrix A
// (leading dimension lda, not modified). Non-finite input raises LinAlgError. An all-zero A
// gives Q = 0, cert_orth = 1, converged = false. The certificate is computed on `be64`.
template <class T>
PolarResult polar_iter(Backend<T>& be, int rows, int cols, const T* a, int lda, T* q, int ldq,
                       const PolarOptions& opt = PolarOptions(),
                       Backend<double>& be64 = cpu_backend<double>());

// Bounds on sigma_max of the n x n symmetric matrix g2 = (X^T X)^2 of a scaled X, used to
// scale the first step: upper = min(||g2||_F, ||g2||_inf)^(1/4) (rigorous), lower = power
// iteration's Rayleigh quotient of g2, to the 1/4 (never above the largest eigenvalue).
template <class T>
void sigma_max_bounds(Backend<T>& be, int n, const T* g2, int ld, int power_iters, double& lower,
                      double& upper);

// The certificate of Q against A (both column-major rows x cols), in float64 by row or column
// blocks: fills cert_orth, cert_sym, trace_qta of `out`; returns ||A||_F.
template <class T>
double polar_certificate(Backend<double>& be64, int rows, int cols, const T* a, int lda, const T* q,
                         int ldq, PolarResult& out);

}  // namespace isofast
