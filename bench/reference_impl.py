"""The published reference merging loops, re-implemented in PyTorch for benchmarking.

Written from docs/ALGORITHMS.md (and the Iso-CTS size rule of docs/CONTRACT.md),
not from anyone's code. The point is to cost what the reference implementations do, so the
structure is theirs, not the fastest one:

- every fine-tune is already in memory as a task-vector dict (name -> D_t);
- the loop runs key by key; every SVD is a full thin `torch.linalg.svd(..., full_matrices=False)`
  (LAPACK gesdd on the CPU), even where only a few leading triplets are used;
- Iso-CTS projects each task matrix with the m x m projector, `D_t - U_k @ U_k.T @ D_t`
  evaluated left to right, so `U_k @ U_k.T` is formed again inside the task loop;
- polar factors are taken through an SVD: polar(A) = P Q^T for A = P Sigma Q^T.

Per 2-D key (two dims, no `exclude` substring in the name) the SVD counts are:
Iso-C 1, Iso-CTS 1 + T + 2, TSV-M T + 2. Every other tensor is merged by the plain mean over
tasks. Computation happens in the dtype of the inputs: float32 inputs give the "reference
fp32" run, float64 inputs the float64 ground truth used for error measurements.

Each `reference_*` function returns the merged update M per key; the merged weights are
theta = theta0 + alpha * M (`apply_update`). These functions are for full-rank inputs (the
reference flattens zero singular values too; see docs/ALGORITHMS.md, Iso-C note).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

TaskVector = Mapping[str, torch.Tensor]
EXCLUDE_DEFAULT: tuple[str, ...] = ("text_projection",)


def is_matrix_key(name: str, tensor: torch.Tensor, exclude: Sequence[str]) -> bool:
    """A "2-D key": exactly two dimensions and none of the `exclude` substrings in the name."""
    return tensor.dim() == 2 and not any(pattern in name for pattern in exclude)


def iso_cts_sizes(r: int, num_tasks: int, common_space_fraction: float = 0.8) -> tuple[int, int]:
    """(k, s): common and per-task sizes (docs/ALGORITHMS.md step 1, docs/CONTRACT.md)."""
    k0 = math.floor(common_space_fraction * r)
    total_task_specific = round((r - k0) / num_tasks) * num_tasks  # round(): halves to even
    if total_task_specific > r:
        total_task_specific = (r // num_tasks) * num_tasks
    return r - total_task_specific, total_task_specific // num_tasks


def task_vectors_from(
    base: TaskVector, finetuned: Sequence[TaskVector]
) -> list[dict[str, torch.Tensor]]:
    """D_t = theta_t - theta0 for every tensor of every fine-tune (all held in memory)."""
    return [{name: model[name] - base[name] for name in base} for model in finetuned]


def apply_update(
    base: TaskVector, update: Mapping[str, torch.Tensor], alpha: float = 1.0
) -> dict[str, torch.Tensor]:
    """theta = theta0 + alpha * M, per tensor."""
    return {name: base[name] + alpha * update[name] for name in base}


def _check(task_vectors: Sequence[TaskVector]) -> list[str]:
    if len(task_vectors) == 0:
        raise ValueError("need at least one task vector")
    names = list(task_vectors[0])
    for tv in task_vectors[1:]:
        if list(tv) != names:
            raise ValueError("every task vector must have the same tensor names")
    return names


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


def _mean(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return _sum(tensors) / len(tensors)


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u, s, vh


def _polar(a: torch.Tensor) -> torch.Tensor:
    """polar(A) = P Q^T from the thin SVD A = P Sigma Q^T."""
    p, _, qh = _svd(a)
    return p @ qh


def iso_c_matrix(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Iso-C on one 2-D key: sigma_bar * U V^T of the task sum, sigma_bar = mean(S)."""
    u, s, vh = _svd(_sum(tensors))
    return s.mean() * (u @ vh)


def iso_cts_matrix(
    tensors: Sequence[torch.Tensor], common_space_fraction: float = 0.8
) -> torch.Tensor:
    """Iso-CTS on one 2-D key (docs/ALGORITHMS.md steps 1-7), reference-style."""
    num_tasks = len(tensors)
    m, n = tensors[0].shape
    k, s = iso_cts_sizes(min(m, n), num_tasks, common_space_fraction)
    u, sv, vh = _svd(_sum(tensors))
    u_k = u[:, :k]
    u_blocks, s_blocks, vh_blocks = [u_k], [sv[:k]], [vh[:k, :]]
    for delta in tensors:
        # Left-to-right evaluation forms the m x m projector U_k U_k^T for every task.
        projected = delta - u_k @ u_k.T @ delta
        u_t, s_t, vh_t = _svd(projected)  # full thin SVD, of which s triplets are kept
        u_blocks.append(u_t[:, :s])
        s_blocks.append(s_t[:s])
        vh_blocks.append(vh_t[:s, :])
    u_cat = torch.cat(u_blocks, dim=1)  # m x r
    vh_cat = torch.cat(vh_blocks, dim=0)  # r x n, i.e. V_cat^T
    s_cat = torch.cat(s_blocks)
    # polar(V_cat^T) = polar(V_cat)^T, so the product below is sigma_bar * U* V*^T.
    return s_cat.mean() * (_polar(u_cat) @ _polar(vh_cat))


def tsv_m_matrix(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """TSV-M on one 2-D key: per-task top floor(r / T) triplets, both factors orthogonalized."""
    num_tasks = len(tensors)
    m, n = tensors[0].shape
    r = min(m, n)
    d = r // num_tasks
    like = tensors[0]
    u_cat = torch.zeros(m, r, dtype=like.dtype, device=like.device)
    s_cat = torch.zeros(r, dtype=like.dtype, device=like.device)
    vh_cat = torch.zeros(r, n, dtype=like.dtype, device=like.device)  # V_cat^T
    for t, delta in enumerate(tensors):
        u_t, s_t, vh_t = _svd(delta)  # full thin SVD, of which d triplets are kept
        cols = slice(t * d, (t + 1) * d)
        u_cat[:, cols] = u_t[:, :d]
        s_cat[cols] = s_t[:d]
        vh_cat[cols, :] = vh_t[:d, :]
    merged: torch.Tensor = torch.linalg.multi_dot(
        [_polar(u_cat), torch.diag(s_cat), _polar(vh_cat)]
    )
    return merged


def _merge(
    task_vectors: Sequence[TaskVector],
    exclude: Sequence[str],
    matrix_rule: str,
    common_space_fraction: float = 0.8,
) -> dict[str, torch.Tensor]:
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in _check(task_vectors):
            tensors = [tv[name] for tv in task_vectors]
            if not is_matrix_key(name, tensors[0], exclude):
                merged[name] = _mean(tensors)
            elif matrix_rule == "iso_c":
                merged[name] = iso_c_matrix(tensors)
            elif matrix_rule == "iso_cts":
                merged[name] = iso_cts_matrix(tensors, common_space_fraction)
            elif matrix_rule == "tsv_m":
                merged[name] = tsv_m_matrix(tensors)
            else:
                raise ValueError(f"unknown matrix rule {matrix_rule!r}")
    return merged


def reference_iso_c(
    task_vectors: Sequence[TaskVector], exclude: Sequence[str] = EXCLUDE_DEFAULT
) -> dict[str, torch.Tensor]:
    """Merged update M of Iso-C (one SVD per 2-D key)."""
    return _merge(task_vectors, exclude, "iso_c")


def reference_iso_cts(
    task_vectors: Sequence[TaskVector],
    common_space_fraction: float = 0.8,
    exclude: Sequence[str] = EXCLUDE_DEFAULT,
) -> dict[str, torch.Tensor]:
    """Merged update M of Iso-CTS (1 + T + 2 SVDs per 2-D key)."""
    return _merge(task_vectors, exclude, "iso_cts", common_space_fraction)


def reference_tsv_m(
    task_vectors: Sequence[TaskVector], exclude: Sequence[str] = EXCLUDE_DEFAULT
) -> dict[str, torch.Tensor]:
    """Merged update M of TSV-M (T + 2 SVDs per 2-D key)."""
    return _merge(task_vectors, exclude, "tsv_m")


REFERENCE_METHODS = ("iso_c", "iso_cts", "tsv_m")


def reference_update(
    method: str,
    task_vectors: Sequence[TaskVector],
    common_space_fraction: float = 0.8,
    exclude: Sequence[str] = EXCLUDE_DEFAULT,
) -> dict[str, torch.Tensor]:
    """Dispatch by isofast method name."""
    if method == "iso_c":
        return reference_iso_c(task_vectors, exclude)
    if method == "iso_cts":
        return reference_iso_cts(task_vectors, common_space_fraction, exclude)
    if method == "tsv_m":
        return reference_tsv_m(task_vectors, exclude)
    raise ValueError(f"no reference for method {method!r}; choose from {REFERENCE_METHODS}")
