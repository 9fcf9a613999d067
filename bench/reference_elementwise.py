"""Plain PyTorch loops of the elementwise merging methods, to time isofast against.

The math is docs/CONTRACT.md's (tests/reference.py is its float64 NumPy ground truth), written
the way the published code does it: whole tensors at a time, in the dtype of the inputs
(float32 in the benchmarks), and TIES on the model flattened into one vector per task, with
`torch.kthvalue` for the trim threshold. DARE's keep masks come from the contract's
counter-based RNG (`tests.reference.dare_mask`, NumPy), so that both sides drop the same
entries; drawing them is part of the reference's time, as it is part of isofast's.

Every function takes the task vectors (name -> D_t) and returns the merged update M per name;
the defaults are isofast's (`isofast.methods()`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from ground_truth import dare_mask

TaskVectors = Sequence[Mapping[str, torch.Tensor]]
Update = dict[str, torch.Tensor]


def _stack(task_vectors: TaskVectors, name: str) -> torch.Tensor:
    return torch.stack([tv[name] for tv in task_vectors])


def weight_average(task_vectors: TaskVectors) -> Update:
    return {name: _stack(task_vectors, name).mean(0) for name in task_vectors[0]}


def task_arithmetic(task_vectors: TaskVectors) -> Update:
    return {name: _stack(task_vectors, name).sum(0) for name in task_vectors[0]}


def _trim(vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries with |x| >= the kth smallest |x|, kth = floor(n (1 - density))."""
    kth = math.floor(vector.numel() * (1.0 - density))
    if kth < 1:
        return vector
    magnitude = vector.abs()
    threshold = magnitude.kthvalue(kth).values
    return torch.where(magnitude >= threshold, vector, 0.0)


def _elect_and_mean(trimmed: torch.Tensor) -> torch.Tensor:
    """TIES on a (T, n) stack: the sign of the sum wins; the mean of the entries that agree."""
    sign = torch.sign(trimmed.sum(0))
    sign = torch.where(sign == 0, torch.sign(sign.sum()), sign)  # the majority sign for ties
    agree = (trimmed != 0) & (torch.sign(trimmed) == sign)
    total = torch.where(agree, trimmed, 0.0).sum(0)
    return total / agree.sum(0).clamp(min=1)


def ties(task_vectors: TaskVectors, density: float = 0.2) -> Update:
    """TIES with global trim: each task vector is the whole model, flattened."""
    names = list(task_vectors[0])
    flat = [torch.cat([tv[name].reshape(-1) for name in names]) for tv in task_vectors]
    merged = _elect_and_mean(torch.stack([_trim(vector, density) for vector in flat]))
    sizes = [task_vectors[0][name].numel() for name in names]
    pieces = merged.split(sizes)
    return {
        name: piece.view_as(task_vectors[0][name])
        for name, piece in zip(names, pieces, strict=True)
    }


def dare(task_vectors: TaskVectors, drop_rate: float = 0.5, seed: int = 0) -> list[Update]:
    """Every entry dropped with probability `drop_rate`, the kept ones rescaled."""
    rescaled: list[Update] = []
    for t, tv in enumerate(task_vectors):
        kept: Update = {}
        for name, x in tv.items():
            keep = torch.from_numpy(dare_mask(seed, name, t, tuple(x.shape), drop_rate))
            kept[name] = torch.where(keep, x / (1.0 - drop_rate), 0.0)
        rescaled.append(kept)
    return rescaled


def dare_linear(task_vectors: TaskVectors) -> Update:
    return task_arithmetic(dare(task_vectors))


def dare_ties(task_vectors: TaskVectors) -> Update:
    return ties(dare(task_vectors), density=1.0)


def consensus(task_vectors: TaskVectors, lam: float = 0.4, min_agree: int = 2) -> Update:
    """Task arithmetic, kept where at least `min_agree` TALL masks select the entry."""
    merged: Update = {}
    for name in task_vectors[0]:
        stacked = _stack(task_vectors, name)
        total = stacked.sum(0)
        masks = stacked.abs() >= lam * (total - stacked).abs()
        merged[name] = torch.where(masks.sum(0) >= min_agree, total, 0.0)
    return merged


ELEMENTWISE: dict[str, Callable[[TaskVectors], Update]] = {
    "weight_average": weight_average,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "consensus": consensus,
}


def reference_update(method: str, task_vectors: TaskVectors) -> Update:
    """Dispatch by isofast method name."""
    try:
        rule = ELEMENTWISE[method]
    except KeyError:
        raise ValueError(
            f"no elementwise reference for {method!r}; choose from {sorted(ELEMENTWISE)}"
        ) from None
    return rule(task_vectors)
