"""No route less accurate than the plain float32 loop (issue 11's accuracy item).

On ill-conditioned task sums (condition numbers 1e3 and 3e5, square, tall and wide keys), each
matrix method's float32 result must lie within max(2e-4, 2x the error of the paper-style
float32 PyTorch loop, bench/reference_impl.py) of the float64 result (tests/reference.py).
Before the routes were fixed, Iso-C on square sums (float32 gesdd) and Iso-CTS on tall keys
(left vectors formed in float32) were 3x and 200x worse than that loop.

Both sides run without a rank cut here: these log-spaced spectra reach 1/cond with a noise
floor just below, so whether the last directions survive a cut is a question of the contract,
not of a route's accuracy (the default cut is tested on bench/shapes.py spectra below).
The floor is 2e-4, not 1e-4: on
these near-degenerate task spectra Iso-CTS in float32 lands near 1.2e-4 by either code (the
loop itself moves between 4e-5 and 1.2e-4 with its thread count).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import isofast

if importlib.util.find_spec("bench") is None:  # appended: the installed isofast must win
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from bench import reference_impl

import reference
from conftest import Fresh

pytestmark = pytest.mark.usefixtures("single_thread_blas")

PAPER_LOOP = {
    "iso_c": reference_impl.iso_c_matrix,
    "iso_cts": reference_impl.iso_cts_matrix,
    "tsv_m": reference_impl.tsv_m_matrix,
}


def ill_conditioned_tasks(
    rng: np.random.Generator, shape: tuple[int, int], cond: float, tasks: int = 8
) -> list[np.ndarray]:
    """Task matrices sharing singular bases, log-spaced spectra down to 1/cond, per-task
    jitter of the singular values and a noise floor below the smallest one."""
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    spectrum = np.logspace(0, -np.log10(cond), r)
    out = []
    for _ in range(tasks):
        jittered = spectrum * (1 + 0.3 * rng.standard_normal(r))
        noise = 0.02 * spectrum[-1] * rng.standard_normal((m, n))
        out.append(((u * jittered) @ v.T / tasks + noise).astype(np.float32))
    return out


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("method", list(PAPER_LOOP))
@pytest.mark.parametrize("shape", [(160, 160), (240, 96), (96, 240)])
@pytest.mark.parametrize("cond", [1e3, 3e5])
def test_float32_routes_are_as_accurate_as_the_float32_loop(
    fresh: Fresh, method: str, shape: tuple[int, int], cond: float
) -> None:
    tasks = ill_conditioned_tasks(fresh.rng, shape, cond)
    want = getattr(reference, method)([t.astype(np.float64) for t in tasks], rank_tol=0.0)
    base = {"w": np.zeros(shape, np.float32)}
    got = isofast.merge(base, [{"w": t} for t in tasks], method, threads=1, rank_tol=0.0)["w"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads would only spin against each other
    try:
        loop = PAPER_LOOP[method]([torch.from_numpy(t) for t in tasks]).double().numpy()
    finally:
        torch.set_num_threads(threads)
    err, loop_err = rel(got.astype(np.float64), want), rel(loop, want)
    assert err <= max(2e-4, 2 * loop_err), (
        f"{method} {shape} cond {cond:g}: {err:.2e} vs loop {loop_err:.2e} ({fresh})"
    )


def shapes_tasks(shape: tuple[int, int], depth: float | None, seed: int) -> list[np.ndarray]:
    from bench import shapes

    mats = shapes.task_matrices("blocks.0.w", shape, 8, seed=seed, depth=depth)
    return [t.numpy() for t in mats]


@pytest.mark.parametrize("method", list(PAPER_LOOP))
@pytest.mark.parametrize("shape", [(256, 256), (384, 128), (128, 384)])
@pytest.mark.parametrize("deep", [False, True], ids=["as-generated", "cond-1e6"])
def test_default_rank_cut_on_benchmark_spectra_up_to_cond_1e6(
    fresh: Fresh, method: str, shape: tuple[int, int], deep: bool
) -> None:
    """The acceptance of issue 11 with the default rank cut (no rank_tol): on bench/shapes.py
    spectra (cond ~5e3..1e4 as generated; 1e5..1.5e6 with a deeper roll-off: depth 3
    square, 5 rectangular), each matrix method's float32 result lies within max(1e-4, 2x the
    float32 loop's error) of float64. With the earlier cut (16 eps32) Iso-C was 9e-2 away at
    cond 1e6 (the loop: 7e-4); with 4 eps32 it is 1e-4 (square) and 7e-4 (rectangular, loop
    3e-3)."""
    depth = (3.0 if shape[0] == shape[1] else 5.0) if deep else None
    first = fresh.seed % 2**20
    # The smallest singular value of a square sum is heavy-tailed (3e5..4e6 at depth 3): take
    # the first seed from the fresh one whose sum lies in the range the contract promises.
    for seed in range(first, first + 50):
        tasks = shapes_tasks(shape, depth, seed)
        sigma = np.linalg.svd(sum(t.astype(np.float64) for t in tasks), compute_uv=False)
        if sigma[0] / sigma[-1] <= 1.5e6:
            break
    want = getattr(reference, method)([t.astype(np.float64) for t in tasks])
    base = {"w": np.zeros(shape, np.float32)}
    got = isofast.merge(base, [{"w": t} for t in tasks], method, threads=1)["w"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loop = PAPER_LOOP[method]([torch.from_numpy(t) for t in tasks]).double().numpy()
    finally:
        torch.set_num_threads(threads)
    err, loop_err = rel(got.astype(np.float64), want), rel(loop, want)
    cond = sigma[0] / sigma[-1]
    assert err <= max(1e-4, 2 * loop_err), (
        f"{method} {shape} cond {cond:.2g}: {err:.2e} vs loop {loop_err:.2e} ({fresh})"
    )
