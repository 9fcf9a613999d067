"""The matrix methods on low-rank updates without forming any m x n matrix.

Each task's update is a factor pair D_t = L_t R_t (L_t: m x r_t, R_t: r_t x n). Stacking them,
L = [L_1 ... L_T] and R = [R_1; ...; R_T], the sum is D = L R. With the thin QR factorisations
L = Q_l K_l and R^T = Q_r K_r, every D_t is Q_l C_t Q_r^T with the small p x p' core
C_t = K_l[:, block t] K_r[:, block t]^T, and D = Q_l C Q_r^T with C = sum_t C_t. Since Q_l and
Q_r have orthonormal columns, every SVD and polar factor of docs/ALGORITHMS.md section 8 is
that of the core, mapped back by Q_l on the left and Q_r on the right
(polar(Q_l X) = Q_l polar(X)). Cost per module: O((m + n) R^2 + R^3), R = sum of ranks.

Everything here is float64 (the cores are small); the rank cut is the caller's tolerance,
relative to sigma_max as docs/CONTRACT.md "Rank tolerance" says. A result is a `Factors`
pair (left m x k, right k x n) with M = left @ right.

numpy's BLAS runs on one thread here (`one_blas_thread`): the matrices are small, and
OpenBLAS's threads wait for each other by spinning between the many small calls that a QR or
an SVD makes, so on a machine with more busy threads than cores each wait can cost a
scheduler time slice (a 2-core machine at load 9: 35x slower with numpy's default of 2
threads; bench/RESULTS.md, "LoRA adapters vs PEFT").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from isofast.adapters.adapter_set import FactorPair
from isofast.methods import IsoCtsParams

_controller: Any = None  # threadpoolctl.ThreadpoolController, made on first use; False: none


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS (and any other BLAS loaded) limited to one thread inside, restored after.

    Needs threadpoolctl; without it, numpy's own setting applies (OPENBLAS_NUM_THREADS, which
    the isofast command line sets to 1 before numpy loads)."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
        except ImportError:  # optional: pip install threadpoolctl
            _controller = False
    if _controller is False:
        yield
        return
    with _controller.limit(limits=1, user_api="blas"):
        yield


@dataclass(frozen=True)
class Factors:
    """A merged update M = left @ right (left m x k, right k x n)."""

    left: np.ndarray
    right: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def scaled(self, alpha: float) -> Factors:
        return Factors(alpha * self.left, self.right)

    def dense(self, dtype: type[np.floating] = np.float64) -> np.ndarray:
        return np.asarray(self.left.astype(dtype) @ self.right.astype(dtype))


def _balanced(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> Factors:
    """u diag(s) v^T as factors carrying sqrt(s) each (no factor much larger than the other:
    the adapter may be stored in 16 bits)."""
    root = np.sqrt(s)
    return Factors(u * root, (v * root).T)


def zero(shape: tuple[int, int]) -> Factors:
    return Factors(np.zeros((shape[0], 0)), np.zeros((0, shape[1])))


@dataclass(frozen=True)
class TaskSpace:
    """Orthonormal bases of the stacked factors and each task's core in them."""

    q_left: np.ndarray  # m x p
    q_right: np.ndarray  # n x p'
    cores: dict[int, np.ndarray]  # task -> C_t (p x p')

    @property
    def total(self) -> np.ndarray:
        return np.asarray(sum(self.cores.values()))

    def to_factors(self, u: np.ndarray, v: np.ndarray, scale: np.ndarray) -> Factors:
        """Q_l u diag(scale) (Q_r v)^T as balanced factors."""
        return _balanced(self.q_left @ u, scale, self.q_right @ v)


def task_space(parts: Mapping[int, FactorPair]) -> TaskSpace:
    tasks = sorted(parts)
    left = np.hstack([parts[t][0] for t in tasks])
    right = np.vstack([parts[t][1] for t in tasks])
    q_left, k_left = np.linalg.qr(left)
    q_right, k_right = np.linalg.qr(right.T)
    cores, start = {}, 0
    for t in tasks:
        stop = start + parts[t][0].shape[1]
        cores[t] = k_left[:, start:stop] @ k_right[:, start:stop].T
        start = stop
    return TaskSpace(q_left, q_right, cores)


def _svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD as (U, S, V) (V, not V^T)."""
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return u, s, vt.T


def _above(s: np.ndarray, cut: float, limit: int | None = None) -> int:
    """How many leading singular values lie strictly above the cut (at most `limit`)."""
    q = int(np.count_nonzero(s > cut))
    return q if limit is None else min(q, max(limit, 0))


def polar(a: np.ndarray) -> np.ndarray:
    if a.shape[1] == 0:
        return a
    u, _, v = _svd(a)
    return np.asarray(u @ v.T)


def concatenate(parts: Mapping[int, FactorPair], weight: float) -> Factors:
    """weight * sum_t L_t R_t, exactly (task arithmetic: 1; weight averaging: 1 / T)."""
    tasks = sorted(parts)
    return Factors(
        weight * np.hstack([parts[t][0] for t in tasks]), np.vstack([parts[t][1] for t in tasks])
    )


def iso_c(space: TaskSpace, tol: float) -> Factors:
    """sigma_bar * U_q V_q^T over the q directions of the sum above tol * sigma_max."""
    u, s, v = _svd(space.total)
    q = _above(s, tol * (s[0] if s.size else 0.0))
    if q == 0:
        return zero((space.q_left.shape[0], space.q_right.shape[0]))
    return space.to_factors(u[:, :q], v[:, :q], np.full(q, float(np.mean(s[:q]))))


def iso_cts_sizes(q: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(k, s) of docs/CONTRACT.md "Iso-CTS sizes", applied to the numerical rank q of the sum
    (the paper's r when the sum has full rank)."""
    k0 = math.floor(fraction * q)  # f * q as an IEEE double, as for r
    s_ts = round((q - k0) / tasks) * tasks  # Python round(): halves to even
    if s_ts > q:
        s_ts = (q // tasks) * tasks
    return q - s_ts, s_ts // tasks


def iso_cts(space: TaskSpace, tasks: int, params: IsoCtsParams, tol: float) -> Factors:
    """Common subspace of the sum (k directions) plus s per task from what it leaves out,
    flattened and orthogonalised; k and s come from the sum's numerical rank q."""
    u, s, v = _svd(space.total)
    cut = tol * (s[0] if s.size else 0.0)
    q = _above(s, cut)
    k, per_task = iso_cts_sizes(q, tasks, params.common_space_fraction)
    us, ss, vs = [u[:, :k]], [s[:k]], [v[:, :k]]
    common = u[:, :k]
    for t in sorted(space.cores):
        c_t = space.cores[t]
        u_t, s_t, v_t = _svd(c_t - common @ (common.T @ c_t))  # left-side projection only
        keep = _above(s_t, cut, per_task)
        us.append(u_t[:, :keep])
        ss.append(s_t[:keep])
        vs.append(v_t[:, :keep])
    flat = np.concatenate(ss)
    if flat.size == 0:
        return zero((space.q_left.shape[0], space.q_right.shape[0]))
    sigma = np.full(flat.size, float(np.mean(flat)))
    return space.to_factors(polar(np.hstack(us)), polar(np.hstack(vs)), sigma)


def tsv_m(space: TaskSpace, tasks: int, shape: tuple[int, int], tol: float) -> Factors:
    """Each task's leading floor(min(m, n) / T) triplets above tol * its own sigma_max,
    concatenated, both sides orthogonalised, the task singular values kept."""
    per_task = min(shape) // tasks
    us, ss, vs = [], [], []
    for t in sorted(space.cores):
        u_t, s_t, v_t = _svd(space.cores[t])
        keep = _above(s_t, tol * (s_t[0] if s_t.size else 0.0), per_task)
        us.append(u_t[:, :keep])
        ss.append(s_t[:keep])
        vs.append(v_t[:, :keep])
    flat = np.concatenate(ss) if ss else np.zeros(0)
    if flat.size == 0:
        return zero(shape)
    return space.to_factors(polar(np.hstack(us)), polar(np.hstack(vs)), flat)


def truncate(factors: Factors, max_rank: int | None, tol: float) -> tuple[Factors, float]:
    """The best rank-`max_rank` approximation of left @ right (a truncated SVD through QR of
    both factors), and its relative Frobenius error. With max_rank None, the numerical rank
    above tol * sigma_max is kept (exact up to the cut)."""
    if factors.rank == 0:
        return factors, 0.0
    with one_blas_thread():
        q_left, k_left = np.linalg.qr(factors.left)
        q_right, k_right = np.linalg.qr(factors.right.T)
        u, s, v = _svd(k_left @ k_right.T)
        keep = _above(s, tol * (s[0] if s.size else 0.0), max_rank)
        energy = float(np.sum(s**2))
        error = float(np.sqrt(np.sum(s[keep:] ** 2) / energy)) if energy > 0 else 0.0
        return _balanced(q_left @ u[:, :keep], s[:keep], q_right @ v[:, :keep]), error


def dense_factors(update: np.ndarray, max_rank: int | None, tol: float) -> tuple[Factors, float]:
    """Factors of a dense merged update (elementwise methods into an adapter): its SVD, cut
    at the numerical rank or `max_rank`, and the relative error of the cut."""
    u, s, v = _svd(np.asarray(update, dtype=np.float64))
    keep = _above(s, tol * (s[0] if s.size else 0.0), max_rank)
    energy = float(np.sum(s**2))
    error = float(np.sqrt(np.sum(s[keep:] ** 2) / energy)) if energy > 0 else 0.0
    return _balanced(u[:, :keep], s[:keep], v[:, :keep]), error
