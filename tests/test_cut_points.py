"""The fast routes of Iso-CTS and TSV-M where their cut points are easy and where they are hard.

Iso-CTS keeps the top k directions of the task sum and the top s of each task's residual;
TSV-M keeps the top r/T of each task. The float32 routes reach those through float64 Gram
matrices and a subset eigensolver, so they are checked here on designed spectra:

* "gap": every cut falls at a clear spectral gap (a common block, then per-task private
  blocks, then a weak bulk), so the kept subspaces are well determined;
* "bulk": Gaussian task matrices, whose spectra have no gap at all: every cut falls inside a
  dense bulk (Marchenko-Pastur), the hard case for a subset eigensolver;
* "plateau": a common block whose tail is a nearly flat plateau straddling k.

Shapes tall, wide and square, T in {3, 8}, float32 (Gram routes) and float64 (gesdd routes).
The limit is test_methods.py's: 1e-4 (float32) / 1e-10 (float64), widened only by the
reference's own sensitivity to eps-sized perturbations of the inputs when the designed
spectrum makes the exact answer ill-conditioned. Rank-deficient sums are covered in
test_methods.py (test_rank_deficient_matches_range_restricted_reference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import isofast
from isofast._native import core

from conftest import GRID, THREADS, Fresh, base_values, convert, rel_update_error, to_numpy
from test_methods import ALPHA, check_against_reference, reference_merge

pytestmark = pytest.mark.usefixtures("single_thread_blas")

NAME = "block.weight"
SHAPES = [(48, 32), (32, 48), (40, 40)]
Spectrum = Callable[[np.random.Generator, tuple[int, int], int, str], list[np.ndarray]]


def orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def cut_sizes(shape: tuple[int, int], tasks: int, method: str) -> tuple[int, int]:
    """(common size k, per-task size) of the method's cut points."""
    r = min(shape)
    if method == "iso_cts":
        k, s = core.iso_cts_sizes(r, tasks, 0.8)
        return int(k), int(s)
    return 0, r // tasks


def gap_tasks(
    rng: np.random.Generator, shape: tuple[int, int], tasks: int, method: str
) -> list[np.ndarray]:
    """A shared block (sigma 1..0.5) in k directions, each task's own block (sigma 0.2) in s
    directions of the complement, and a weak bulk (1e-3): gaps of 2.5x and 200x at the cuts."""
    m, n = shape
    r = min(shape)
    k, s = cut_sizes(shape, tasks, method)
    u, v = orthonormal(rng, m, r), orthonormal(rng, n, r)
    common = (u[:, :k] * np.linspace(1.0, 0.5, k)) @ v[:, :k].T / tasks
    out = []
    for t in range(tasks):
        cols = slice(k + t * s, k + (t + 1) * s)
        private = 0.2 * u[:, cols] @ v[:, cols].T
        out.append(common + private + 1e-3 * rng.standard_normal(shape) / np.sqrt(m + n))
    return out


def bulk_tasks(
    rng: np.random.Generator, shape: tuple[int, int], tasks: int, method: str
) -> list[np.ndarray]:
    """Independent Gaussian task matrices: dense spectra, no gap anywhere."""
    return [rng.standard_normal(shape) / np.sqrt(sum(shape)) for _ in range(tasks)]


def plateau_tasks(
    rng: np.random.Generator, shape: tuple[int, int], tasks: int, method: str
) -> list[np.ndarray]:
    """Shared block: half of k strong directions, then a plateau falling by only 1% over the
    remaining directions, so the cut at k sits inside it; plus a small per-task part."""
    m, n = shape
    r = min(shape)
    k, _ = cut_sizes(shape, tasks, method)
    head = max(1, k // 2)
    sigma = np.concatenate([np.linspace(1.0, 0.5, head), 0.1 * np.linspace(1.0, 0.99, r - head)])
    u, v = orthonormal(rng, m, r), orthonormal(rng, n, r)
    common = (u * sigma) @ v.T / tasks
    return [common + 0.02 * rng.standard_normal(shape) / np.sqrt(m + n) for _ in range(tasks)]


SPECTRA: dict[str, Spectrum] = {"gap": gap_tasks, "bulk": bulk_tasks, "plateau": plateau_tasks}


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("tasks", [3, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("method", ["iso_cts", "tsv_m"])
def test_cut_points_match_reference(
    method: str, spectrum: str, shape: tuple[int, int], tasks: int, compute: str, fresh: Fresh
) -> None:
    rng = fresh.rng
    base64 = {NAME: base_values(rng, shape)}
    # On the 2**-20 grid, base + delta is exact in float32: both sides see the same values.
    deltas = [np.round(d / GRID) * GRID for d in SPECTRA[spectrum](rng, shape, tasks, method)]
    fts64 = [{NAME: base64[NAME] + d} for d in deltas]
    base, fts = convert(base64, "numpy", compute), [convert(f, "numpy", compute) for f in fts64]
    got = isofast.merge(base, fts, method, ALPHA, compute_dtype=compute, threads=THREADS)
    check_against_reference(got, base64, fts64, method, {}, seed=0, compute=compute, fresh=fresh)


def shared_input_tasks(rng: np.random.Generator, shape: tuple[int, int], tasks: int) -> list[Any]:
    """Task matrices that share their input-side basis V0 and a steep spectral roll-off (as
    real layers do, bench/shapes.py): with T = 20 on a tall key, the Iso-CTS concatenation
    [V_k, v_1 .. v_T] has cond 1e4..1e5, so the polar must take its ill-conditioned route."""
    m, n = shape
    r = min(shape)
    x = np.arange(r) / r
    roll_off = (1 + 16 * x) ** -0.5 * 10.0 ** (-3 * np.maximum(0, (x - 0.9) / 0.1))
    u0, v0 = orthonormal(rng, m, r), orthonormal(rng, n, r)
    out = []
    for _ in range(tasks):
        left = u0 + 0.5 * rng.standard_normal((m, r)) / np.sqrt(m)
        core_t = rng.standard_normal((r, r)) / np.sqrt(r)
        out.append(1e-2 * (left @ core_t * roll_off) @ v0.T)
    return out


def test_iso_cts_ill_conditioned_concatenation_in_float32(fresh: Fresh) -> None:
    """Regression: a float32 SVD of such a concatenation lost ~cond * eps32 (7e-2 on ViT-B/32
    qkv keys at T = 20); the float64 fallback keeps the float32 merge within 1e-4. At this
    size the old float32 fallback failed 5 runs of 5 (7.8e-4 on one fixed seed)."""
    shape, tasks = (768, 256), 20
    rng = fresh.rng
    base64 = {NAME: base_values(rng, shape)}
    deltas = [np.round(d / GRID) * GRID for d in shared_input_tasks(rng, shape, tasks)]
    fts64 = [{NAME: base64[NAME] + d} for d in deltas]

    # The input really is ill-conditioned where it matters (float64, as the reference does it).
    k, s = (int(v) for v in core.iso_cts_sizes(min(shape), tasks, 0.8))
    u, _, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    right = [vt[:k].T]
    for d in deltas:
        residual = d - u[:, :k] @ (u[:, :k].T @ d)
        right.append(np.linalg.svd(residual, full_matrices=False)[2][:s].T)
    sv = np.linalg.svd(np.hstack(right), compute_uv=False)
    assert sv[0] / sv[-1] > 1e3, f"cond(V_cat) = {sv[0] / sv[-1]:.1e} ({fresh})"

    base, fts = convert(base64, "numpy", "float32"), [convert(f, "numpy", "float32") for f in fts64]
    got = isofast.merge(base, fts, "iso_cts", ALPHA, compute_dtype="float32", threads=THREADS)
    want = reference_merge(base64, fts64, "iso_cts", {}, seed=0, compute="float32")
    err = rel_update_error(to_numpy(got[NAME]), want[NAME], base64[NAME])
    assert err <= 1e-4, f"relative error {err:.1e} ({fresh})"
