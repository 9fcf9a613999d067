"""The measures of one 2-D key: its task matrices, the task-arithmetic sum and each method's
update, read and computed one key at a time (docs/ALGORITHMS.md, section 9)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from isofast import arrays
from isofast.analysis import spectra
from isofast.analysis.spectra import ShapeStats
from isofast.errors import MergeInputError
from isofast.models import ModelSet


@dataclass(frozen=True)
class MethodMeasures:
    """One method's update M of one key, against each task."""

    singular_values: np.ndarray
    stats: ShapeStats
    projected: tuple[float, ...]  # ||Pi_{k_M} D_t||_F^2 per task

    def sar(self, energies: Sequence[float]) -> list[float]:
        return [spectra.alignment(p, e) for p, e in zip(self.projected, energies, strict=True)]


@dataclass(frozen=True)
class KeyMeasures:
    name: str
    shape: tuple[int, int]
    energies: tuple[float, ...]  # ||D_t||_F^2 per task
    tasks: tuple[ShapeStats, ...]  # spectrum of each D_t
    overlaps: np.ndarray  # T x T subspace overlaps of the tasks' energy-share subspaces
    sum_values: np.ndarray  # singular values of the task-arithmetic sum
    sum_stats: ShapeStats
    methods: dict[str, MethodMeasures]

    def sar(self, method: str) -> list[float]:
        return self.methods[method].sar(self.energies)


@dataclass(frozen=True)
class Settings:
    share: float  # energy share that sets k
    cut: float  # relative rank cut (the merge's tolerance, or the Gram resolution if larger)
    compute_dtype: str


class Updates(Protocol):
    """One method's merged update of a key (isofast.analysis.sources)."""

    name: str

    def update(self, name: str, deltas: Sequence[np.ndarray]) -> np.ndarray: ...


def measure_key(
    name: str, deltas: list[np.ndarray], updates: Sequence[Updates], settings: Settings
) -> KeyMeasures:
    """Every measure of key `name` from its task matrices `deltas` (compute dtype). Holds them,
    one update at a time and a few r x r float64 matrices; the task matrices are freed (the
    list emptied in place) as their own spectra are taken, at the end."""
    shape = (int(deltas[0].shape[0]), int(deltas[0].shape[1]))
    cut = max(settings.cut, spectra.resolution(min(shape)))
    energies = tuple(spectra.squared_norm(d) for d in deltas)

    def stats_of(values: np.ndarray) -> ShapeStats:
        return spectra.shape_stats(values, settings.share, cut)

    methods: dict[str, MethodMeasures] = {}
    for source in updates:
        merged = source.update(name, deltas)
        spec = spectra.spectrum(merged)
        stats = stats_of(spec.values)
        basis = spectra.left_basis(merged, spec, stats.energy_rank)
        del merged
        projected = tuple(spectra.projected_squared_norm(basis, d) for d in deltas)
        methods[source.name] = MethodMeasures(spec.values, stats, projected)

    if "task_arithmetic" in methods:  # the same sum, as the kernel formed it
        sum_values = methods["task_arithmetic"].singular_values
    else:
        total = deltas[0].copy()
        for d in deltas[1:]:
            total += d
        sum_values = spectra.spectrum(total).values
        del total

    task_stats, bases = [], []
    for t in range(len(deltas)):
        spec = spectra.spectrum(deltas[t])
        task_stats.append(stats_of(spec.values))
        k = spectra.energy_rank(spec.values, settings.share)
        # Kept in the compute dtype, in place of the task matrix it replaces.
        bases.append(spectra.left_basis(deltas[t], spec, k).astype(deltas[t].dtype))
        deltas[t] = np.empty((0, 0), deltas[t].dtype)
    overlaps = overlap_matrix(bases)
    return KeyMeasures(
        name,
        shape,
        energies,
        tuple(task_stats),
        overlaps,
        sum_values,
        stats_of(sum_values),
        methods,
    )


def overlap_matrix(bases: Sequence[np.ndarray]) -> np.ndarray:
    """Symmetric T x T task-subspace overlaps; a basis overlaps itself fully (1) unless empty."""
    tasks = len(bases)
    out = np.full((tasks, tasks), np.nan)
    for t in range(tasks):
        out[t, t] = 1.0 if bases[t].shape[1] else np.nan
        for u in range(t + 1, tasks):
            out[t, u] = out[u, t] = spectra.subspace_overlap(bases[t], bases[u])
    return out


def task_matrices(name: str, models: ModelSet, dtype: str) -> list[np.ndarray]:
    """D_t = theta_t - theta0 of key `name` in the compute dtype, formed as the kernel forms
    them (each input converted exactly, then one subtraction). Non-finite inputs raise the
    merge's error, naming the tensor and the model."""
    base, *tuned = models.views(name)
    theta0 = _finite(base, name, "the base model", dtype)
    deltas = []
    for t, view in enumerate(tuned):
        d = _finite(view, name, f"fine-tuned model {t}", dtype)
        np.subtract(d, theta0, out=d)
        deltas.append(d)
    models.release(name)
    return deltas


def _finite(view: object, name: str, label: str, dtype: str) -> np.ndarray:
    a = as_array(view, dtype)
    if not np.isfinite(a).all():
        # Worded as the core words it, so ModelSet.naming_files adds the path and file.
        raise MergeInputError(f"tensor '{name}' of {label} holds NaN or Inf")
    return a


def as_array(x: object, dtype: str) -> np.ndarray:
    """A new numpy array of `dtype` holding x (torch, numpy, or bfloat16 bits)."""
    if isinstance(x, arrays.Bf16Array):
        return (x.bits.astype(np.uint32) << 16).view(np.float32).astype(dtype, copy=False)
    if arrays.is_torch(x):
        import torch

        assert isinstance(x, torch.Tensor)
        # A copy always: the task matrix is formed in place and must not touch x.
        return x.detach().to(device="cpu", dtype=getattr(torch, dtype), copy=True).numpy()
    return np.array(x, dtype=dtype, copy=True)
