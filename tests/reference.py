"""Float64 NumPy ground truth for every isofast merging method.

Written from docs/ALGORITHMS.md (rank-deficient inputs: section 8.2) and docs/CONTRACT.md
only. Readability over speed: every SVD is numpy.linalg.svd(full_matrices=False).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]
Model = dict[str, np.ndarray]

F64_EPS = float(np.finfo(np.float64).eps)
ELEMENTWISE_METHODS = (
    "weight_average",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "consensus",
)


# ----------------------------------------------------------------------------- linear algebra


def _f64(deltas: Sequence[np.ndarray]) -> list[Array]:
    if len(deltas) == 0:
        raise ValueError("need at least one task")
    out = [np.asarray(d, dtype=np.float64) for d in deltas]
    if any(d.shape != out[0].shape for d in out):
        raise ValueError("all task matrices must have the same shape")
    return out


def _tol(shape: tuple[int, ...], rank_tol: float | None, eps: float) -> float:
    # CONTRACT.md: tol = rank_tol if given else c * eps(compute dtype), relative to sigma_max,
    # c = 4 for float32 and 16 for float64.
    if rank_tol is not None:
        return float(rank_tol)
    return (4.0 if eps == np.finfo(np.float32).eps else 16.0) * float(eps)


def range_block(a: Array, cut: float, limit: int | None = None) -> tuple[Array, Array, Array]:
    """Leading singular triplets of `a` with sigma > cut, at most `limit` of them.

    Returns (U, S, V) with U m x q, S (q,), V n x q (V, not V^T). A direction with
    sigma <= cut is outside the numerical range and is dropped (CONTRACT.md rank rule).
    """
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    q = int(np.count_nonzero(s > cut))  # s is sorted descending, so the kept ones lead
    if limit is not None:
        q = min(q, max(int(limit), 0))
    return u[:, :q], s[:q], vt[:q].T


def polar(a: Array) -> Array:
    """Polar factor P Q^T of the thin SVD a = P Sigma Q^T (an m x 0 input stays m x 0)."""
    if a.shape[1] == 0:
        return np.zeros_like(a)
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def _sigma_max(a: Array) -> float:
    return float(np.linalg.svd(a, compute_uv=False)[0]) if a.size else 0.0


# ----------------------------------------------------------------------------- per-tensor methods


def weight_average(deltas: Sequence[np.ndarray]) -> Array:
    return np.mean(np.stack(_f64(deltas)), axis=0)


def task_arithmetic(deltas: Sequence[np.ndarray]) -> Array:
    return np.sum(np.stack(_f64(deltas)), axis=0)


def iso_c(
    deltas: Sequence[np.ndarray], rank_tol: float | None = None, eps: float = F64_EPS
) -> Array:
    """sigma_bar * U_q V_q^T over the q directions of D = sum_t D_t above the cut."""
    d = task_arithmetic(deltas)
    cut = _tol(d.shape, rank_tol, eps) * _sigma_max(d)
    u, s, v = range_block(d, cut)
    if s.size == 0:  # all-zero (or numerically zero) sum: no direction to keep
        return np.zeros_like(d)
    return float(np.mean(s)) * (u @ v.T)


def iso_cts_sizes(r: int, T: int, f: float = 0.8) -> tuple[int, int]:
    """(k, s): common subspace size and per-task size, CONTRACT.md "Iso-CTS sizes"."""
    if r < 0 or T < 1:
        raise ValueError("need r >= 0 and T >= 1")
    k0 = math.floor(f * r)
    s_ts = round((r - k0) / T) * T  # Python round(): halves go to even, as specified
    if s_ts > r:
        s_ts = (r // T) * T
    return r - s_ts, s_ts // T


def iso_cts(
    deltas: Sequence[np.ndarray],
    common_space_fraction: float = 0.8,
    rank_tol: float | None = None,
    eps: float = F64_EPS,
    rank_aware: bool = True,
) -> Array:
    """The block sizes come from the numerical rank q of the sum (CONTRACT.md, "Iso-CTS
    sizes"; the same as r = min(m, n) for a full-rank sum); rank_aware=False: from r, the
    paper's code on rank-deficient sums."""
    ds = _f64(deltas)
    d = np.sum(np.stack(ds), axis=0)
    # One scale for every block: sigma_max of the sum (CONTRACT.md).
    cut = _tol(d.shape, rank_tol, eps) * _sigma_max(d)
    q = int(np.count_nonzero(np.linalg.svd(d, compute_uv=False) > cut))
    k, s = iso_cts_sizes(q if rank_aware else min(d.shape), len(ds), common_space_fraction)
    u_k, s_k, v_k = range_block(d, cut, limit=k)  # k_eff = min(k, q)
    us, ss, vs = [u_k], [s_k], [v_k]
    for dt in ds:
        # Left-side projection only; apply U_k (U_k^T D_t), never form U_k U_k^T.
        rt = dt - u_k @ (u_k.T @ dt)
        u_t, s_t, v_t = range_block(rt, cut, limit=s)
        us.append(u_t)
        ss.append(s_t)
        vs.append(v_t)
    s_cat = np.concatenate(ss)
    if s_cat.size == 0:
        return np.zeros_like(d)
    sigma_bar = float(np.mean(s_cat))
    return sigma_bar * (polar(np.hstack(us)) @ polar(np.hstack(vs)).T)


def tsv_m(
    deltas: Sequence[np.ndarray], rank_tol: float | None = None, eps: float = F64_EPS
) -> Array:
    ds = _f64(deltas)
    shape = ds[0].shape
    d_keep = min(shape) // len(ds)  # d = floor(r / T) triplets per task
    tol = _tol(shape, rank_tol, eps)
    us, ss, vs = [], [], []
    for dt in ds:
        # Per-task scale: sigma_max(D_t); zero columns are dropped, not stored.
        u_t, s_t, v_t = range_block(dt, tol * _sigma_max(dt), limit=d_keep)
        us.append(u_t)
        ss.append(s_t)
        vs.append(v_t)
    s_cat = np.concatenate(ss)
    if s_cat.size == 0:
        return np.zeros(shape, dtype=np.float64)
    return (polar(np.hstack(us)) * s_cat) @ polar(np.hstack(vs)).T


# ----------------------------------------------------------------------------- elementwise (model)


def _names(deltas_by_task: Sequence[Model]) -> list[str]:
    if len(deltas_by_task) == 0:
        raise ValueError("need at least one task")
    names = list(deltas_by_task[0])
    for task in deltas_by_task:
        if set(task) != set(names):
            raise ValueError("all tasks must share the same tensor names")
    return names


def _ties_trim(x: Array, density: float) -> Array:
    """Keep entries with |x| >= the kth smallest |x|, kth = floor(n * (1 - density))."""
    if not 0.0 <= density <= 1.0:
        raise ValueError("density must be in [0, 1]")
    kth = math.floor(x.size * (1 - density))
    if kth < 1:
        return x.copy()
    mag = np.abs(x)
    threshold = np.partition(mag, kth - 1)[kth - 1]  # 1-indexed kth smallest, ties counted
    return np.where(mag >= threshold, x, 0.0)


def _ties_vectors(trimmed: Array, merge: str) -> Array:
    """Elect + disjoint merge on a (T, n) stack of trimmed vectors."""
    s = np.sign(trimmed.sum(axis=0))
    # Majority-sign fallback: sign of the sum of the elected signs over the same vector.
    s = np.where(s == 0, np.sign(s.sum()), s)
    agree = (trimmed != 0) & (np.sign(trimmed) == s)
    total = np.where(agree, trimmed, 0.0).sum(axis=0)
    if merge == "sum":
        return total
    if merge == "mean":
        return total / np.maximum(agree.sum(axis=0), 1)
    raise ValueError(f"unknown TIES merge {merge!r} (use 'mean' or 'sum')")


def ties_model(
    deltas_by_task: Sequence[Model],
    density: float = 0.2,
    trim: str = "global",
    merge: str = "mean",
) -> dict[str, Array]:
    names = _names(deltas_by_task)
    shapes = {n: np.shape(deltas_by_task[0][n]) for n in names}
    if trim == "tensor":
        out = {}
        for n in names:
            stack = np.stack(
                [_ties_trim(np.asarray(t[n], np.float64).ravel(), density) for t in deltas_by_task]
            )
            out[n] = _ties_vectors(stack, merge).reshape(shapes[n])
        return out
    if trim != "global":
        raise ValueError(f"unknown TIES trim {trim!r} (use 'global' or 'tensor')")
    # Global: each task vector is the whole model flattened (trim and majority sign both).
    flat = [
        np.concatenate([np.asarray(t[n], np.float64).ravel() for n in names] or [np.zeros(0)])
        for t in deltas_by_task
    ]
    merged = _ties_vectors(np.stack([_ties_trim(x, density) for x in flat]), merge)
    out, start = {}, 0
    for n in names:
        size = math.prod(shapes[n])
        out[n] = merged[start : start + size].reshape(shapes[n])
        start += size
    return out


_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def _mix(z: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """splitmix64 finalizer, mod 2^64 (uint64 wrap-around is the intended arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def _fnv1a64(name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & _MASK64
    return h


def dare_mask(
    seed: int, name: str, task_index: int, shape: Sequence[int] | int, drop_rate: float
) -> NDArray[np.bool_]:
    """Keep mask of DARE for one tensor of one task (CONTRACT.md counter-based RNG)."""
    key = _mix(np.array(seed & _MASK64, dtype=np.uint64))
    key = _mix(key ^ _U64(_fnv1a64(name)))
    key = _mix(key ^ _U64(task_index & _MASK64))
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    i = np.arange(1, math.prod(shape) + 1, dtype=np.uint64)  # i + 1, i the flat row-major index
    with np.errstate(over="ignore"):
        z = key + i * _U64(0x9E3779B97F4A7C15)
    u = (_mix(z) >> _U64(11)).astype(np.float64) * 2.0**-53  # exact: 53-bit integers
    return (u >= drop_rate).reshape(shape)


def dare_model(
    deltas_by_task: Sequence[Model], seed: int = 0, drop_rate: float = 0.5
) -> list[dict[str, Array]]:
    """DARE(D_t) for every task and tensor; the tensor name and task position key the RNG."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError("drop_rate must be in [0, 1)")
    names = _names(deltas_by_task)
    out = []
    for t, task in enumerate(deltas_by_task):
        rescaled = {}
        for n in names:
            x = np.asarray(task[n], dtype=np.float64)
            keep = dare_mask(seed, n, t, x.shape, drop_rate)
            rescaled[n] = np.where(keep, x / (1.0 - drop_rate), 0.0)
        out.append(rescaled)
    return out


def _sum_model(deltas_by_task: Sequence[Model]) -> dict[str, Array]:
    return {n: task_arithmetic([t[n] for t in deltas_by_task]) for n in _names(deltas_by_task)}


def dare_linear_model(
    deltas_by_task: Sequence[Model], seed: int = 0, drop_rate: float = 0.5
) -> dict[str, Array]:
    return _sum_model(dare_model(deltas_by_task, seed=seed, drop_rate=drop_rate))


def dare_ties_model(
    deltas_by_task: Sequence[Model],
    seed: int = 0,
    drop_rate: float = 0.5,
    density: float = 1.0,
    trim: str = "global",
    merge: str = "mean",
) -> dict[str, Array]:
    dared = dare_model(deltas_by_task, seed=seed, drop_rate=drop_rate)
    return ties_model(dared, density=density, trim=trim, merge=merge)


def consensus_model(
    deltas_by_task: Sequence[Model],
    lam: float = 0.4,
    min_agree: int = 2,
    apply_to: str = "ta",
    **ties_params: Any,
) -> dict[str, Array]:
    names = _names(deltas_by_task)
    if apply_to == "ta":
        if ties_params:
            raise TypeError(f"TIES parameters {sorted(ties_params)} need apply_to='ties'")
        merged = _sum_model(deltas_by_task)
    elif apply_to == "ties":
        merged = ties_model(deltas_by_task, **ties_params)
    else:
        raise ValueError(f"unknown consensus apply_to {apply_to!r} (use 'ta' or 'ties')")
    out = {}
    for n in names:
        ds = np.stack(_f64([t[n] for t in deltas_by_task]))
        tau_mtl = ds.sum(axis=0)
        masks = np.abs(ds) >= lam * np.abs(tau_mtl - ds)  # TALL mask m_t per task
        out[n] = np.where(masks.sum(axis=0) >= min_agree, merged[n], 0.0)
    return out


# ----------------------------------------------------------------------------- mergekit (gta)


def _keep_ranks(x: Array, lo: int, hi: int, index_ascending: bool) -> Array:
    """Keep the entries ranked [lo, hi) by ascending |x|, ties by index (ascending or not)."""
    idx = np.arange(x.size)
    order = np.lexsort((idx if index_ascending else -idx, np.abs(x)))
    keep = np.zeros(x.size, dtype=bool)
    keep[order[max(lo, 0) : max(hi, 0)]] = True
    return np.where(keep, x, 0.0)


def gta_sparsify(
    x: Array,
    method: str,
    density: float,
    gamma: float = 0.0,
    rescale: bool = False,
    keep_draw: NDArray[np.bool_] | None = None,
) -> Array:
    """mergekit's sparsifications of one flat task vector, with its L1 rescale. magnitude:
    the top max(1, int(density n)) |x|, ties at the threshold to the lowest index (exactly k
    kept); random: entries whose DARE draw keeps them (`keep_draw`); magnitude_outliers: drop
    the int(gamma n) largest, keep the next int(density n) (ties: lower index ranks lower)."""
    n = x.size
    if method == "none" or density >= 1 or n == 0:
        return x.copy()
    if method == "magnitude":
        if density <= 0:
            out = np.zeros_like(x)
        else:
            k = max(1, int(density * n))
            out = _keep_ranks(x, n - k, n, index_ascending=False)
    elif method == "random":
        assert keep_draw is not None
        out = np.where(keep_draw.ravel(), x, 0.0)
    elif method == "magnitude_outliers":
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        out = _keep_ranks(x, bottom, bottom + target, index_ascending=True)
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    if rescale:
        before, after = np.abs(x).sum(), np.abs(out).sum()
        if before >= 1e-7 and after >= 1e-7:
            out = out * (before / after)
    return out


def gta_vectors(
    deltas: Sequence[Array],
    weights: Sequence[float],
    elect: str = "none",
    normalize: bool = False,
    lam: float = 1.0,
) -> Array:
    """mergekit's merge of sparsified task vectors (a (T, n) stack) with per-task weights."""
    w = np.asarray(weights, dtype=np.float64)[:, None]
    d = np.stack(deltas) * w
    if elect == "none":
        mixed = d.sum(axis=0)
        div = np.full(mixed.shape, w.sum())
        div[np.abs(div) < 1e-8] = 1.0
    else:
        vote = d.sum(axis=0) if elect == "sum" else np.sign(d).sum(axis=0)
        s = np.where(vote >= 0, 1.0, -1.0)
        mask = np.sign(d) == s
        mixed = np.where(mask, d, 0.0).sum(axis=0)
        div = np.where(mask, w, 0.0).sum(axis=0)
        div[div == 0] = 1.0
    if normalize:
        mixed = mixed / div
    return mixed * lam


def _for_task(value: Any, t: int) -> float:
    return float(value[t]) if isinstance(value, (list, tuple)) else float(value)


def gta_model(
    deltas_by_task: Sequence[Model],
    seed: int = 0,
    per_tensor: Callable[[str], dict[str, Any]] | None = None,
    **params: Any,
) -> dict[str, Array]:
    """mergekit's generalized task arithmetic, per tensor. `params` (GtaParams' names, plain
    values or per-model lists) hold for every tensor; `per_tensor(name)` overrides them."""
    out = {}
    for n in _names(deltas_by_task):
        p = {
            "sparsify": "none",
            "elect": "none",
            "weight": 1.0,
            "density": 1.0,
            "gamma": 0.01,
            "rescale": False,
            "normalize": False,
            "lam": 1.0,
            **params,
            **(per_tensor(n) if per_tensor else {}),
        }
        shape = np.shape(deltas_by_task[0][n])
        vectors = []
        for t, task in enumerate(deltas_by_task):
            x = np.asarray(task[n], np.float64).ravel()
            density = _for_task(p["density"], t)
            draw = (
                dare_mask(seed, n, t, x.size, 1.0 - density) if p["sparsify"] == "random" else None
            )
            vectors.append(
                gta_sparsify(
                    x, p["sparsify"], density, _for_task(p["gamma"], t), bool(p["rescale"]), draw
                )
            )
        weights = [_for_task(p["weight"], t) for t in range(len(deltas_by_task))]
        merged = gta_vectors(vectors, weights, p["elect"], bool(p["normalize"]), float(p["lam"]))
        out[n] = merged.reshape(shape)
    return out


# ----------------------------------------------------------------------------- whole-model merge


def _is_copied(x: np.ndarray) -> bool:
    return np.asarray(x).dtype.kind in "biu"  # bool, signed and unsigned integers


_MATRIX_FNS: dict[str, Callable[..., Array]] = {"tsv_m": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts}


def merge_model(
    base: Model,
    finetuned: Sequence[Model],
    method: str,
    alpha: float = 1.0,
    exclude: Sequence[str] = ("text_projection",),
    seed: int = 0,
    eps: float = F64_EPS,
    **params: Any,
) -> dict[str, np.ndarray]:
    """theta0 + alpha * M per CONTRACT.md's tensor kinds; int/bool tensors copied from base."""
    if len(finetuned) == 0:
        raise ValueError("need at least one fine-tuned model")
    for ft in finetuned:
        if set(ft) != set(base):
            raise ValueError("fine-tuned models must have the base model's tensor names")
        for n, x in base.items():
            if np.shape(ft[n]) != np.shape(x):
                raise ValueError(f"shape mismatch for {n!r}")

    out: dict[str, np.ndarray] = {n: np.array(x, copy=True) for n, x in base.items()}
    floats = [n for n, x in base.items() if not _is_copied(x)]
    theta0 = {n: np.asarray(base[n], dtype=np.float64) for n in floats}
    deltas = [
        {n: np.asarray(ft[n], dtype=np.float64) - theta0[n] for n in floats} for ft in finetuned
    ]

    m: dict[str, Array]
    if method in ("weight_average", "task_arithmetic") and params:
        raise TypeError(f"{method} takes no parameters, got {sorted(params)}")
    if method in _MATRIX_FNS:
        matrix_fn = _MATRIX_FNS[method]
        m = {}
        for n in floats:
            per_task = [t[n] for t in deltas]
            if theta0[n].ndim == 2 and not any(e in n for e in exclude):
                m[n] = matrix_fn(per_task, eps=eps, **params)
            else:
                m[n] = weight_average(per_task)
    elif method == "weight_average":
        m = {n: weight_average([t[n] for t in deltas]) for n in floats}
    elif method == "task_arithmetic":
        m = _sum_model(deltas)
    elif method == "ties":
        m = ties_model(deltas, **params)
    elif method == "dare_linear":
        m = dare_linear_model(deltas, seed=seed, **params)
    elif method == "dare_ties":
        m = dare_ties_model(deltas, seed=seed, **params)
    elif method == "consensus":
        m = consensus_model(deltas, **params)
    elif method == "gta":
        m = gta_model(deltas, seed=seed, **params)
    else:
        known = ", ".join(ELEMENTWISE_METHODS + tuple(_MATRIX_FNS))
        raise ValueError(f"unknown method {method!r}; known: {known}")

    for n in floats:
        out[n] = theta0[n] + alpha * m[n]
    return out


# ----------------------------------------------------------------------------- interpolation


def slerp(a: Array, b: Array, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Array:
    """mergekit's slerp of two full weights (t = 0: a): norms at or below eps count as 1, and
    where |cos| > dot_threshold the linear interpolation."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = float(np.clip(np.sum((a64 / na) * (b64 / nb)), -1.0, 1.0))
    if abs(dot) > dot_threshold:
        return (1 - t) * a64 + t * b64
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)


def slerp_model(
    theta0: Model,
    deltas_by_task: Sequence[Model],
    t: float = 0.5,
    per_tensor: Callable[[str], float] | None = None,
) -> dict[str, Array]:
    """Update M = slerp(theta0, theta0 + mean_k D_k, t) - theta0 per tensor; `per_tensor(name)`
    gives t where it varies (gradients, filters)."""
    out = {}
    for n in _names(deltas_by_task):
        a = np.asarray(theta0[n], np.float64)
        b = a + np.mean(np.stack([np.asarray(d[n], np.float64) for d in deltas_by_task]), axis=0)
        out[n] = slerp(a, b, per_tensor(n) if per_tensor else t) - a
    return out


def model_stock(deltas: Sequence[np.ndarray], filter_wise: bool = False) -> Array:
    """mergekit's model_stock update of one tensor: per row (the whole tensor, or with
    filter_wise each row of the last axis of a tensor of 2+ dims) the mean over task pairs of
    cos = clamp(D_i.D_j / max(|D_i||D_j|, 1e-6), -1, 1); t = k cos / (1 + (k - 1) cos), 0 where
    |1 + (k - 1) cos| < 1e-6; M = t * mean_k D_k."""
    ds = _f64(deltas)
    if len(ds) < 2:
        raise ValueError("model_stock needs at least two tasks")
    shape = ds[0].shape
    by_row = filter_wise and len(shape) >= 2
    rows = [d.reshape(-1, shape[-1]) if by_row else d.reshape(1, -1) for d in ds]
    k = len(rows)
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = np.linalg.norm(rows[i], axis=1) * np.linalg.norm(rows[j], axis=1)
            dot = np.sum(rows[i] * rows[j], axis=1)
            cosines.append(np.clip(dot / np.maximum(norms, 1e-6), -1.0, 1.0))
    cos = np.mean(np.stack(cosines), axis=0)
    den = 1.0 + (k - 1) * cos
    singular = np.abs(den) < 1e-6
    ratio = np.where(singular, 0.0, k * cos / np.where(singular, 1.0, den))
    mean = np.mean(np.stack(rows), axis=0)
    return np.asarray((ratio[:, None] * mean).reshape(shape), np.float64)


def model_stock_model(
    deltas_by_task: Sequence[Model], filter_wise: bool = False
) -> dict[str, Array]:
    return {
        n: model_stock([t[n] for t in deltas_by_task], filter_wise) for n in _names(deltas_by_task)
    }


def nuslerp(
    d0: np.ndarray,
    d1: np.ndarray,
    t: float,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> Array:
    """mergekit's nuslerp of two task vectors (t = 0: d0), over the whole tensor (flatten),
    each row of its last axis, or (row_wise) each vector along its first axis: norms clamped to
    >= 1e-7; where 1 - cos^2 <= eps^2 the linear interpolation."""
    a, b = np.asarray(d0, np.float64), np.asarray(d1, np.float64)
    shape = a.shape
    if flatten or a.ndim == 0:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif row_wise:
        a, b = np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1)
    moved = a.shape
    a, b = a.reshape(-1, moved[-1]), b.reshape(-1, moved[-1])
    na = np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-7)
    nb = np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-7)
    cos = np.clip(np.sum((a / na) * (b / nb), axis=1, keepdims=True), -1.0, 1.0)
    colinear = (1 - cos**2) <= eps**2
    theta = np.arccos(np.where(colinear, 0.0, cos))
    sin = np.where(colinear, 1.0, np.sin(theta))
    sph = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / sin
    out = np.where(colinear, (1 - t) * a + t * b, sph).reshape(moved)
    if row_wise and not flatten and out.ndim > 0:
        out = np.moveaxis(out, -1, 0)
    return np.asarray(out.reshape(shape), np.float64)


def nuslerp_model(
    deltas_by_task: Sequence[Model],
    weight: Any = 1.0,
    row_wise: bool = False,
    flatten: bool = True,
    per_tensor: Callable[[str], Any] | None = None,
) -> dict[str, Array]:
    """Per tensor: nuslerp(D_0, D_1) at t = w_1 / (w_0 + w_1) (0.5 where |w_0 + w_1| < 1e-6);
    more tasks fold in one at a time, r = nuslerp(r, D_k) at t = w_k / (w_0 + ... + w_k);
    `per_tensor(name)` gives the weight (a scalar or one per model) where it varies."""
    out = {}
    for n in _names(deltas_by_task):
        w = per_tensor(n) if per_tensor else weight
        r = np.asarray(deltas_by_task[0][n], np.float64)
        seen = _for_task(w, 0)
        for k in range(1, len(deltas_by_task)):
            total = seen + _for_task(w, k)
            t = 0.5 if abs(total) < 1e-6 else _for_task(w, k) / total
            r = nuslerp(r, deltas_by_task[k][n], t, row_wise, flatten)
            seen = total
        out[n] = r
    return out


def multislerp(
    deltas: Sequence[np.ndarray],
    weights: Sequence[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Array:
    """mergekit's multislerp of task vectors, step by step as mergekit writes it (tangent space
    at the weighted mean of the unit vectors, exponential map back, times the weighted mean
    norm)."""
    ds = _f64(deltas)
    if len(ds) == 1:
        return ds[0].copy()
    shape = ds[0].shape
    x = np.stack([d.ravel() for d in ds])
    w = np.asarray(weights, np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = float(np.linalg.norm(mean))
    if mean_norm < eps:
        if len(ds) == 2:
            return np.asarray((w[0] * x[0] + w[1] * x[1]).reshape(shape), np.float64)
        raise ValueError("the weighted sum of the unit task vectors is zero")
    mean = mean / mean_norm
    dots = units @ mean
    tangent = ((units - dots[:, None] * mean) * w[:, None]).sum(0)
    tn = float(np.linalg.norm(tangent)) + eps
    result = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
    return np.asarray((result * float(norms[:, 0] @ w)).reshape(shape), np.float64)


def multislerp_model(
    deltas_by_task: Sequence[Model],
    weight: Any = 1.0,
    normalize_weights: bool = True,
    per_tensor: Callable[[str], Any] | None = None,
) -> dict[str, Array]:
    out = {}
    for n in _names(deltas_by_task):
        w = per_tensor(n) if per_tensor else weight
        weights = [_for_task(w, t) for t in range(len(deltas_by_task))]
        out[n] = multislerp([t[n] for t in deltas_by_task], weights, normalize_weights)
    return out


def karcher(tensors: Sequence[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> Array:
    """mergekit's karcher of full weights, step by step as mergekit writes it (equal weights):
    models with norm <= tol left out of the mean, the mean norm of all as its scale."""
    xs = _f64(tensors)
    if len(xs) == 1:
        return xs[0].copy()
    shape = xs[0].shape
    flat = [x.ravel() for x in xs]
    norms = [float(np.linalg.norm(x)) for x in flat]
    valid = [i for i, nm in enumerate(norms) if nm > tol]
    if not valid:
        return np.zeros(shape)
    units = [flat[i] / norms[i] for i in valid]
    alpha = 1.0 / len(valid)
    mean = sum(alpha * u for u in units)
    mean_norm = float(np.linalg.norm(mean))
    mean = units[0].copy() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for u in units:
            dot = float(np.clip(mean @ u, -1.0, 1.0))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (u - dot * mean)
        tn = float(np.linalg.norm(tangent))
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        unit_norm = float(np.linalg.norm(mean))
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = sum(norms) / len(norms)
    return np.asarray((scale * mean).reshape(shape), np.float64)


def karcher_model(
    theta0: Model, deltas_by_task: Sequence[Model], max_iter: int = 10, tol: float = 1e-5
) -> dict[str, Array]:
    """Update M = karcher(theta0, theta0 + D_1, ...) - theta0 per tensor."""
    out = {}
    for n in _names(deltas_by_task):
        a = np.asarray(theta0[n], np.float64)
        models = [a, *(a + np.asarray(d[n], np.float64) for d in deltas_by_task)]
        out[n] = karcher(models, max_iter, tol) - a
    return out


def della_mask(
    x: np.ndarray, seed: int, name: str, task_index: int, density: float, epsilon: float
) -> NDArray[np.bool_]:
    """DELLA's MagPrune keep mask of tensor x (mergekit's della_magprune with the contract's
    draw): per row along the second axis (a 1-D tensor: one row), the ascending (|x|, index)
    rank j of m entries gives p = (density - epsilon) + j / (m - 1) * 2 epsilon (0 for m = 1);
    entry i (flat row-major index) stays when the DARE draw u_i >= 1 - p."""
    a = np.asarray(x, np.float64)
    shape = a.shape
    if a.ndim < 2:
        a = a.reshape(1, -1)
    moved = np.moveaxis(a, 1, -1)  # rows along the second axis
    flat = moved.reshape(-1, moved.shape[-1])
    m = flat.shape[1]
    ranks = np.argsort(np.argsort(np.abs(flat), axis=1, kind="stable"), axis=1, kind="stable")
    rank_norm = ranks / (m - 1) if m > 1 else np.zeros_like(flat)
    p = (density - epsilon) + rank_norm * 2 * epsilon
    p_full = np.moveaxis(p.reshape(moved.shape), -1, 1).reshape(shape)
    key = _mix(np.array(seed & _MASK64, dtype=np.uint64))
    key = _mix(key ^ _U64(_fnv1a64(name)))
    key = _mix(key ^ _U64(task_index & _MASK64))
    i = np.arange(1, a.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = key + i * _U64(0x9E3779B97F4A7C15)
    u = (_mix(z) >> _U64(11)).astype(np.float64) * 2.0**-53
    return np.asarray(u.reshape(shape) >= 1.0 - p_full)


def della_model(
    deltas_by_task: Sequence[Model],
    seed: int = 0,
    per_tensor: Callable[[str], dict[str, Any]] | None = None,
    **params: Any,
) -> dict[str, Array]:
    """mergekit's della / della_linear: gta (gta_model's parameters) with DELLA's MagPrune as
    the sparsification (per model `epsilon`, default 0.15) and its L1 rescale."""
    out = {}
    for n in _names(deltas_by_task):
        p = {
            "elect": "none",
            "weight": 1.0,
            "density": 1.0,
            "epsilon": 0.15,
            "rescale": True,
            "normalize": False,
            "lam": 1.0,
            **params,
            **(per_tensor(n) if per_tensor else {}),
        }
        shape = np.shape(deltas_by_task[0][n])
        vectors = []
        for t, task in enumerate(deltas_by_task):
            x = np.asarray(task[n], np.float64)
            density, epsilon = _for_task(p["density"], t), _for_task(p["epsilon"], t)
            if density >= 1:
                kept = x.copy()
            elif density <= 0:
                kept = np.zeros_like(x)
            else:
                if not (density + epsilon < 1 and density - epsilon > 0):
                    raise ValueError("density +- epsilon must lie in (0, 1)")
                kept = np.where(della_mask(x, seed, n, t, density, epsilon), x, 0.0)
                if p["rescale"]:
                    before, after = np.abs(x).sum(), np.abs(kept).sum()
                    if before >= 1e-7 and after >= 1e-7:
                        kept = kept * (before / after)
            vectors.append(kept.ravel())
        weights = [_for_task(p["weight"], t) for t in range(len(deltas_by_task))]
        merged = gta_vectors(vectors, weights, p["elect"], bool(p["normalize"]), float(p["lam"]))
        out[n] = merged.reshape(shape)
    return out


def sce(deltas: Sequence[np.ndarray], select_topk: float = 1.0) -> Array:
    """mergekit's sce of one tensor: select_topk < 1 keeps, in every task vector, the entries
    of the k = int(nz * select_topk) largest population variances across tasks (nz: entries
    where the tasks differ; ties to the lowest index; none when select_topk <= 0); weights
    w_t = mean(D_t^2) / sum (1/T each where the sum is below 1e-6); s = +1 where sum_t D_t >= 0
    else -1; M = sum over t with sign(D_t) = s of w_t D_t / max(sum of their w_t, 1e-6)."""
    ds = np.stack([d.ravel() for d in _f64(deltas)])
    shape = np.shape(deltas[0])
    tasks, n = ds.shape
    if select_topk < 1:
        keep = np.zeros(n, dtype=bool)
        if select_topk > 0:
            mean = ds[0].copy()
            for t in range(1, tasks):
                mean = mean + ds[t]
            mean = mean / tasks
            sq = (ds[0] - mean) ** 2
            for t in range(1, tasks):
                sq = sq + (ds[t] - mean) ** 2
            var = np.where(np.all(ds == ds[0], axis=0), 0.0, sq / tasks)
            k = int(np.count_nonzero(var) * select_topk)
            order = np.lexsort((np.arange(n), -var))  # variance descending, index ascending
            keep[order[:k]] = True
        ds = np.where(keep, ds, 0.0)
    w = np.mean(ds**2, axis=1)
    w = np.full(tasks, 1.0 / tasks) if abs(w.sum()) < 1e-6 else w / w.sum()
    s = np.where(ds.sum(axis=0) >= 0, 1.0, -1.0)
    mask = np.sign(ds) == s
    ew = np.where(mask, w[:, None], 0.0)
    out = (ds * ew).sum(axis=0) / np.maximum(ew.sum(axis=0), 1e-6)
    return np.asarray(out.reshape(shape), np.float64)


def sce_model(deltas_by_task: Sequence[Model], select_topk: float = 1.0) -> dict[str, Array]:
    return {n: sce([t[n] for t in deltas_by_task], select_topk) for n in _names(deltas_by_task)}
