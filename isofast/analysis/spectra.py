"""Spectral measures of one matrix and of one matrix against another (docs/ALGORITHMS.md,
section 9): singular values, the energy rank k, the subspace alignment ratio (SAR), effective
rank, flatness, condition number and the overlap of two task subspaces.

Singular values and left singular vectors come from the float64 Gram matrix of the short side,
accumulated block by block (as the core's Gram routes do), so no float64 copy of a whole matrix
is made and the extra memory is a few r x r matrices (r = min(m, n)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Float64 elements converted at once while a Gram matrix or a projection is accumulated.
_BLOCK_ELEMENTS = 1 << 22
# A flat spectrum's cumulative energy reaches an exact share (e.g. 19 of 20 equal values at
# share 0.95) only up to rounding; this allowance keeps k from flipping on the last ulp.
ENERGY_SLACK = 1e-6


@dataclass(frozen=True)
class Spectrum:
    """The singular values of an m x n matrix A (descending, float64) and the eigenvectors
    of its short-side Gram matrix in the same order: the left singular vectors U when m <= n,
    the right ones V when m > n."""

    values: np.ndarray
    vectors: np.ndarray
    shape: tuple[int, int]

    @property
    def left(self) -> bool:
        """Whether `vectors` are the left singular vectors."""
        return self.shape[0] <= self.shape[1]


def spectrum(a: np.ndarray) -> Spectrum:
    """Singular values and short-side singular vectors of `a` from its float64 Gram matrix.
    Values below about sqrt(r * eps64) * s_1 are not resolved (see `resolution`)."""
    m, n = a.shape
    wide = m <= n
    r = min(m, n)
    gram = np.zeros((r, r))
    step = max(1, _BLOCK_ELEMENTS // max(r, 1))
    for start in range(0, max(m, n), step):
        block = (a[:, start : start + step] if wide else a[start : start + step]).astype(np.float64)
        gram += block @ block.T if wide else block.T @ block
    eigenvalues, vectors = np.linalg.eigh(gram)
    del gram
    order = np.argsort(eigenvalues)[::-1]  # eigh gives ascending values
    values = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    return Spectrum(values, vectors[:, order], (m, n))


def resolution(r: int) -> float:
    """Relative size below which a Gram-derived singular value is rounding noise: eigenvalues
    carry an absolute error of about r * eps64 * s_1^2."""
    return math.sqrt(max(r, 1) * float(np.finfo(np.float64).eps))


def energy_rank(values: np.ndarray, share: float) -> int:
    """The least k whose k leading singular values hold at least `share` of the energy
    (sum of squares); 0 for a zero matrix."""
    energy = np.cumsum(np.square(values, dtype=np.float64))
    total = float(energy[-1]) if energy.size else 0.0
    if total <= 0.0:
        return 0
    reached = energy >= share * total * (1.0 - ENERGY_SLACK)
    return int(np.argmax(reached)) + 1


def left_basis(a: np.ndarray, spec: Spectrum, k: int) -> np.ndarray:
    """The top-k left singular vectors of `a` (m x k, float64). For a tall matrix they are
    formed as A V_k / s_k, block by block over rows."""
    if spec.left:
        return np.ascontiguousarray(spec.vectors[:, :k])
    m = spec.shape[0]
    v, s = spec.vectors[:, :k], spec.values[:k]
    basis = np.empty((m, k))
    step = max(1, _BLOCK_ELEMENTS // max(spec.shape[1], 1))
    for start in range(0, m, step):
        basis[start : start + step] = (a[start : start + step].astype(np.float64) @ v) / s
    return basis


def squared_norm(a: np.ndarray) -> float:
    """||a||_F^2 accumulated in float64."""
    total = 0.0
    step = max(1, _BLOCK_ELEMENTS // max(a.shape[1], 1))
    for start in range(0, a.shape[0], step):
        block = a[start : start + step].astype(np.float64)
        total += float(np.vdot(block, block))
    return total


def projected_squared_norm(basis: np.ndarray, d: np.ndarray) -> float:
    """||basis^T d||_F^2 for an orthonormal basis (m x k) and d (m x n), over column blocks."""
    if basis.shape[1] == 0:
        return 0.0
    total = 0.0
    step = max(1, _BLOCK_ELEMENTS // max(d.shape[0], 1))
    for start in range(0, d.shape[1], step):
        part = basis.T @ d[:, start : start + step].astype(np.float64)
        total += float(np.vdot(part, part))
    return total


def alignment(projected: float, total: float) -> float:
    """SAR = sqrt(projected / total); NaN for a zero task matrix (nothing to align)."""
    if total <= 0.0:
        return math.nan
    return min(1.0, math.sqrt(max(projected, 0.0) / total))


def subspace_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """||A^T B||_F^2 / min(k_a, k_b) for orthonormal bases A (m x k_a), B (m x k_b): the mean
    squared cosine of their principal angles; 1 when one subspace holds the other, 0 when
    they are orthogonal. NaN when either is empty."""
    k = min(a.shape[1], b.shape[1])
    if k == 0:
        return math.nan
    cross = a.T @ b
    overlap: float = float(np.vdot(cross, cross)) / k
    return min(1.0, overlap)


@dataclass(frozen=True)
class ShapeStats:
    """What one spectrum says about the shape of a matrix's update."""

    rank: int  # numerical rank q: values above cut * s_1
    energy_rank: int  # k at the analysis' energy share
    condition_number: float  # s_1 / s_q (inf for q = 0)
    effective_rank: float  # exp(entropy of s_i / sum s_i) over the q kept values
    flatness: float  # effective_rank / q, in (0, 1]; 1 = every kept value equal


def shape_stats(values: np.ndarray, share: float, cut: float) -> ShapeStats:
    """The spectrum's measures; `cut` is relative to s_1 (values at or below it are zero)."""
    top = float(values[0]) if values.size else 0.0
    kept = values[values > cut * top] if top > 0.0 else values[:0]
    q = int(kept.size)
    if q == 0:
        return ShapeStats(0, 0, math.inf, 0.0, math.nan)
    p = kept / kept.sum()
    entropy = float(-np.sum(p * np.log(p)))
    effective = math.exp(entropy)
    return ShapeStats(
        rank=q,
        energy_rank=energy_rank(values, share),
        condition_number=top / float(kept[-1]),
        effective_rank=effective,
        flatness=min(1.0, effective / q),
    )
