"""GEMM-only polar iteration (csrc/linalg/polar_iter.*, docs/ALGORITHMS.md section 10) on the CPU.

Compared with the polar factor U V^T of a float64 SVD of the same input, on fresh random
matrices A = U diag(s) V^T with log-spaced s (condition numbers 1e2..1e6), square, tall and
wide. What is asserted, and why:

* compute="float64" (the route for Iso-C at the contract's float32 tolerance): relative error
  <= 1e-4 on float32 inputs for every condition number up to 1e6 (it is ~3e-8, the rounding of
  Q to float32), and <= 1e-9 on float64 inputs.
* compute="float32": a float32 GEMM iteration cannot beat float32 rounding noise, and on these
  inputs one rounding of A's entries to float32 already moves the polar factor by ~1e-4 at
  cond 1e5 and ~1e-3 at cond 1e6 (gesdd is a special case: its backward error is graded on
  such spectra). So the float32 iteration is held to a multiple of that measured noise floor
  (flash-attention style: the tolerance follows the real numeric noise; measured
  ratio 2-3x typical, 5.4x the largest in 160 draws; asserted <= 10x), and to 1e-4
  absolutely up to cond 1e4.
* the certificate (||Q^T Q - I||_F / sqrt(r), ||Q^T A - A^T Q||_F / ||A||_F, in float64) is
  <= 1e-5 when converged, and reports non-convergence when cond(A) exceeds 1 / lower_bound
  or A is rank-deficient, so that a caller falls back to gesdd;
* Iso-C's sigma_bar = trace(Q^T A) / r equals the mean singular value to 1e-5.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

import isofast
from isofast._native import core

from conftest import Fresh

F32_EPS = float(np.finfo(np.float32).eps)
F64_EPS = float(np.finfo(np.float64).eps)
SHAPES = [(48, 48), (96, 40), (40, 96), (160, 120)]
CONDS = [1e2, 1e4, 1e5, 1e6]
TOL = 1e-5
# Design constants of csrc/linalg/polar_coeffs.hpp (cushion, margin above the interval).
CUSHION = 0.05
MARGIN = 0.01


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread(single_thread_blas: None) -> Iterator[None]:
    """Small GEMMs: one BLAS thread in isofast and numpy (both restored afterwards)."""
    before = core.get_num_threads()
    core.set_num_threads(1)
    yield
    core.set_num_threads(before)


def spectrum_matrix(
    rng: np.random.Generator, shape: tuple[int, int], cond: float
) -> tuple[np.ndarray, np.ndarray]:
    """A = U diag(s) V^T (float64) with r log-spaced singular values from 1 down to 1/cond,
    times a random scale; returns A and s (descending)."""
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    s = np.logspace(0.0, -np.log10(cond), r) * 10.0 ** rng.uniform(-3, 1)
    return (u * s) @ v.T, s


def polar64(a: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    return u @ vt


def rel(q: np.ndarray, p: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(q, np.float64) - p) / np.linalg.norm(p))


def float32_noise_floor(a32: np.ndarray, p: np.ndarray, rng: np.random.Generator) -> float:
    """How far the polar factor moves when A's entries change by one float32 rounding
    (relative +-2**-24, random): what any float32 computation of it is up against."""
    a = a32.astype(np.float64)
    moves = [
        rel(polar64(a * (1.0 + rng.uniform(-1.0, 1.0, size=a.shape) * 2.0**-24)), p)
        for _ in range(2)
    ]
    return float(np.sqrt(np.mean(np.square(moves))))


def certificate64(q: np.ndarray, a: np.ndarray) -> tuple[float, float]:
    """The certificate recomputed in numpy, on the side the core uses: Q^T Q and Q^T A for a
    tall A, Q Q^T and Q A^T for a wide or square one (the core sees row-major A as A^T)."""
    q = np.asarray(q, np.float64)
    a = np.asarray(a, np.float64)
    if q.shape[0] <= q.shape[1]:
        q, a = q.T, a.T
    r = q.shape[1]
    orth = np.linalg.norm(q.T @ q - np.eye(r)) / np.sqrt(r)
    s = q.T @ a
    return float(orth), float(np.linalg.norm(s - s.T) / np.linalg.norm(a))


# ----------------------------------------------------------------------------- schedule


def _poly(step: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    a, b, c = step[:3]
    return a * x + b * x**3 + c * x**5


@pytest.mark.parametrize("target", [F32_EPS, F64_EPS], ids=["float32", "float64"])
def test_schedule_reaches_target_in_12_to_14_steps(target: float) -> None:
    sched = core.polar_schedule(1e-6, target)
    assert 12 <= len(sched) <= 14, len(sched)
    lo, hi = 1e-6, 1.0
    for k, step in enumerate(sched):
        # p maps the whole interval (and the safety margin above it) into the next interval.
        top = hi + MARGIN * (hi - lo)
        x = np.concatenate([np.geomspace(lo, top, 20001), np.linspace(lo, top, 20001)])
        y = _poly(step, x)
        nlo, nhi = step[3], step[4]
        slack = 1e-12 * max(1.0, nhi)
        assert y.min() >= nlo - slack and y.max() <= nhi + slack, (k, y.min(), y.max(), nlo, nhi)
        assert nlo > lo or nlo > 0.999, k  # the smallest singular value grows every step
        lo, hi = nlo, nhi
    assert max(1.0 - lo, hi - 1.0) <= target


def test_schedule_steps_are_minimax() -> None:
    """Every uncushioned Remez step equioscillates: 1 - p takes +E, -E, +E, -E in turn on its
    design interval (lo at the start, two interior extrema, the top) and never exceeds E
    there, which by Chebyshev's theorem makes it the minimax odd quintic."""
    sched = core.polar_schedule(1e-6, F64_EPS)
    lo, hi = 1e-6, 1.0
    checked = 0
    for step in sched:
        top = hi + MARGIN * (hi - lo)
        if lo >= CUSHION * top and max(1.0 - lo, top - 1.0) >= 1e-3:
            e = 1.0 - _poly(step, np.linspace(lo, top, 400001))
            big = float(np.abs(e).max())
            a, b, c = step[:3]
            y = np.sort(np.roots([5 * c, 3 * b, a]).real)  # p'(x) = 0 at x^2 = y
            x1, x2 = np.sqrt(y)
            assert lo < x1 < x2 < top
            at = 1.0 - _poly(step, np.array([lo, x1, x2, top]))
            np.testing.assert_allclose(at, [big, -big, big, -big], rtol=1e-6)
            checked += 1
        lo, hi = step[3], step[4]
    assert checked >= 2


def test_schedule_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="lower_bound"):
        core.polar_schedule(0.0, F32_EPS)
    with pytest.raises(ValueError, match="lower_bound"):
        core.polar_schedule(1.5, F32_EPS)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_float32_input_float64_compute_matches_svd(shape: tuple[int, int], fresh: Fresh) -> None:
    for cond in CONDS:
        a, _ = spectrum_matrix(fresh.rng, shape, cond)
        a32 = a.astype(np.float32)
        q, orth, sym, converged, steps = core.polar_iter(a32, compute="float64")
        assert q.dtype == np.float32 and q.shape == shape
        err = rel(q, polar64(a32))
        ctx = f"cond {cond:.0e}, {fresh}"
        assert err <= 1e-4, f"relative error {err:.2e} > 1e-4 ({ctx})"
        assert converged and orth <= TOL and sym <= TOL, (orth, sym, ctx)
        assert 12 <= steps <= 14, (steps, ctx)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_float32_compute_within_float32_noise(shape: tuple[int, int], fresh: Fresh) -> None:
    for cond in CONDS:
        a, _ = spectrum_matrix(fresh.rng, shape, cond)
        a32 = a.astype(np.float32)
        q, orth, sym, converged, steps = core.polar_iter(a32)  # float32 in, float32 compute
        p = polar64(a32)
        err = rel(q, p)
        floor = float32_noise_floor(a32, p, fresh.rng)
        limit = max(1e-4 if cond <= 1e4 else 2e-5, 10.0 * floor)
        ctx = f"cond {cond:.0e}: error {err:.2e}, float32 noise floor {floor:.2e}, {fresh}"
        assert err <= limit, f"error above {limit:.1e} ({ctx})"
        assert converged and orth <= TOL and sym <= TOL, (orth, sym, ctx)
        # The reported certificate is the float64 one of the returned Q.
        want = certificate64(q, a32)
        assert orth == pytest.approx(want[0], rel=1e-6, abs=1e-12), ctx
        assert sym == pytest.approx(want[1], rel=1e-6, abs=1e-12), ctx
        assert 12 <= steps <= 14, (steps, ctx)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_float64_matches_svd(shape: tuple[int, int], fresh: Fresh) -> None:
    for cond in CONDS:
        a, _ = spectrum_matrix(fresh.rng, shape, cond)
        q, orth, sym, converged, _ = core.polar_iter(a)
        assert q.dtype == np.float64
        err = rel(q, polar64(a))
        assert err <= 1e-9, f"cond {cond:.0e}: relative error {err:.2e} ({fresh})"
        assert converged and orth <= 1e-12 and sym <= 1e-12, (orth, sym, fresh)


@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_iso_c_sigma_bar_from_trace(compute: str, fresh: Fresh) -> None:
    """sigma_bar = trace(Q^T A) / r is the mean singular value (no SVD needed)."""
    for shape in SHAPES:
        for cond in CONDS:
            a, _ = spectrum_matrix(fresh.rng, shape, cond)
            a32 = a.astype(np.float32)
            q, *_ = core.polar_iter(a32, compute=compute)
            sigma = np.linalg.svd(a32.astype(np.float64), compute_uv=False)
            bar = float(np.trace(q.astype(np.float64).T @ a32.astype(np.float64))) / min(shape)
            assert bar == pytest.approx(float(sigma.mean()), rel=1e-5), (shape, cond, fresh)


# ----------------------------------------------------------------------------- certificate


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(48, 48), (96, 40), (40, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_reports_non_convergence_beyond_lower_bound(
    dtype: type, shape: tuple[int, int], fresh: Fresh
) -> None:
    """cond 1e9 > 1 / lower_bound, or exact rank deficiency: converged is False (fallback)."""
    a, _ = spectrum_matrix(fresh.rng, shape, 1e9)
    q, orth, _, converged, _ = core.polar_iter(a.astype(dtype), lower_bound=1e-6)
    assert not converged and orth > 100 * TOL, (orth, fresh)
    assert np.isfinite(q).all()

    m, n = shape
    b = fresh.rng.standard_normal((m, 5)) @ fresh.rng.standard_normal((5, n))  # rank 5
    q, orth, _, converged, _ = core.polar_iter(b.astype(dtype))
    assert not converged and orth > 100 * TOL, (orth, fresh)
    assert np.isfinite(q).all()


def test_lower_bound_widens_the_range(fresh: Fresh) -> None:
    """The same cond-1e9 input converges once lower_bound covers it (more steps)."""
    a, _ = spectrum_matrix(fresh.rng, (60, 40), 1e9)
    _, _, _, converged, steps = core.polar_iter(a, lower_bound=1e-10)
    assert converged, fresh
    assert steps > len(core.polar_schedule(1e-6, F64_EPS))


def test_zero_and_empty_inputs() -> None:
    q, orth, sym, converged, steps = core.polar_iter(np.zeros((5, 3), np.float32))
    assert not converged and steps == 0 and orth == 1.0 and sym == 0.0
    assert not q.any()
    q, orth, sym, converged, steps = core.polar_iter(np.zeros((0, 4), np.float64))
    assert q.shape == (0, 4) and converged and steps == 0


def test_scale_and_awkward_spectra(fresh: Fresh) -> None:
    """Huge / tiny magnitudes (no overflow in (A^T A)^2: power-of-two prescaling) and a top
    singular value barely above a flat bulk (where power iteration alone underestimates
    sigma_max: the scaling uses a rigorous bound)."""
    rng = fresh.rng
    for scale in (1e30, 1e-30):
        a = (rng.standard_normal((50, 30)) * scale).astype(np.float32)
        q, _, _, converged, _ = core.polar_iter(a)
        assert converged and rel(q, polar64(a)) <= 1e-4, (scale, fresh)
    n = 120
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = np.full(n, 0.8)
    s[0] = 1.0
    a = ((u * s) @ v.T).astype(np.float32)
    q, _, _, converged, _ = core.polar_iter(a)
    assert converged and rel(q, polar64(a)) <= 1e-4, fresh


def test_layout_does_not_matter(fresh: Fresh) -> None:
    a = fresh.rng.standard_normal((70, 50)).astype(np.float32)
    want = core.polar_iter(np.ascontiguousarray(a))[0]
    np.testing.assert_array_equal(core.polar_iter(np.asfortranarray(a))[0], want)
    big = np.zeros((140, 50), np.float32)
    big[::2] = a
    np.testing.assert_array_equal(core.polar_iter(big[::2])[0], want)


def test_errors() -> None:
    bad = np.ones((4, 3), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(isofast.LinAlgError, match="NaN or Inf"):
        core.polar_iter(bad)
    with pytest.raises(ValueError, match="2-D"):
        core.polar_iter(np.ones((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="float32 or float64"):
        core.polar_iter(np.ones((3, 3), np.int64))
    with pytest.raises(ValueError, match="lower_bound"):
        core.polar_iter(np.eye(3), lower_bound=0.0)
    with pytest.raises(ValueError, match="compute"):
        core.polar_iter(np.eye(3), compute="bfloat16")
