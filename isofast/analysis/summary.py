"""The analysis as plain data (what the JSON file holds): every key's measures, and their
summaries per layer, per task and per method.

Aggregates of SAR over several keys weigh each key by the task's energy there: the SAR of the
task's whole update (restricted to the analysed keys) against the merged update's subspaces,
sqrt(sum_keys ||Pi D_t||^2 / sum_keys ||D_t||^2). Spectrum measures (flatness, effective
rank) are plain means over keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from isofast.analysis.keys import KeyMeasures
from isofast.analysis.spectra import ShapeStats

_NUMBERED = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(name: str) -> str:
    """The layer a key belongs to: its name up to the first numbered part
    ('encoder.layer.3.attention.self.query.weight' -> 'encoder.layer.3'), else its first part
    ('embeddings.word_embeddings.weight' -> 'embeddings')."""
    found = _NUMBERED.match(name)
    return found.group(1) if found else name.split(".", 1)[0]


def build(
    keys: Sequence[KeyMeasures],
    tasks: Sequence[str],
    methods: Mapping[str, Mapping[str, Any]],
    header: Mapping[str, Any],
) -> dict[str, Any]:
    """Everything the report, the plots and the JSON file show."""
    names = list(methods)
    layers: dict[str, list[KeyMeasures]] = {}
    for key in keys:
        layers.setdefault(layer_of(key.name), []).append(key)
    task_sar = {m: _pooled_sar(keys, m, len(tasks)) for m in names}
    data: dict[str, Any] = {
        **header,
        "tasks": list(tasks),
        "methods": {m: {"parameters": dict(methods[m])} for m in names},
        "summary": {m: _method_summary(keys, m, task_sar[m], tasks) for m in names},
        "before": {
            "mean_flatness": _mean(k.sum_stats.flatness for k in keys),
            "mean_effective_rank": _mean(k.sum_stats.effective_rank for k in keys),
        },
        "per_task": [
            {
                "task": task,
                "norm_share": _norm_share(keys, t),
                "sar": {m: task_sar[m][t] for m in names},
                "mean_key_sar": {m: _mean(k.sar(m)[t] for k in keys) for m in names},
                "lowest_key": {m: _lowest_key(keys, m, t) for m in names},
            }
            for t, task in enumerate(tasks)
        ],
        "overlaps": _mean_matrix(k.overlaps for k in keys).tolist(),
        "per_layer": [
            {
                "layer": layer,
                "keys": [k.name for k in members],
                "sar": {m: _pooled_sar(members, m, len(tasks)) for m in names},
                "min_sar": {m: _nanmin(_pooled_sar(members, m, len(tasks))) for m in names},
                "mean_sar": {m: _mean(_pooled_sar(members, m, len(tasks))) for m in names},
                "flatness": {
                    "task_arithmetic_sum": _mean(k.sum_stats.flatness for k in members),
                    **{m: _mean(k.methods[m].stats.flatness for k in members) for m in names},
                },
                "mean_overlap": _off_diagonal_mean(_mean_matrix(k.overlaps for k in members)),
            }
            for layer, members in layers.items()
        ],
        "keys": [_key_entry(k, tasks, names) for k in keys],
    }
    cleaned: dict[str, Any] = clean(data)
    return cleaned


def _method_summary(
    keys: Sequence[KeyMeasures], method: str, sar: Sequence[float], tasks: Sequence[str]
) -> dict[str, Any]:
    finite = [(s, t) for s, t in zip(sar, tasks, strict=True) if math.isfinite(s)]
    worst = min(finite) if finite else (math.nan, None)
    stats = [k.methods[method].stats for k in keys]
    return {
        "min_task_sar": worst[0],
        "least_aligned_task": worst[1],
        "mean_task_sar": _mean(s for s, _ in finite),
        "mean_flatness": _mean(s.flatness for s in stats),
        "mean_effective_rank": _mean(s.effective_rank for s in stats),
        "mean_energy_rank_fraction": _mean(
            s.energy_rank / min(k.shape) for s, k in zip(stats, keys, strict=True)
        ),
    }


def _pooled_sar(keys: Sequence[KeyMeasures], method: str, tasks: int) -> list[float]:
    """Per task: sqrt(sum over keys of ||Pi D_t||^2 / sum over keys of ||D_t||^2)."""
    out = []
    for t in range(tasks):
        projected = sum(k.methods[method].projected[t] for k in keys)
        energy = sum(k.energies[t] for k in keys)
        out.append(math.sqrt(min(1.0, projected / energy)) if energy > 0 else math.nan)
    return out


def _norm_share(keys: Sequence[KeyMeasures], t: int) -> float:
    """Task t's share of the summed Frobenius norms of all tasks, over the analysed keys."""
    norms = [sum(math.sqrt(e) for e in k.energies) for k in keys]
    own = sum(math.sqrt(k.energies[t]) for k in keys)
    total = sum(norms)
    return own / total if total > 0 else math.nan


def _lowest_key(keys: Sequence[KeyMeasures], method: str, t: int) -> dict[str, Any]:
    scored = [(k.sar(method)[t], k.name) for k in keys if math.isfinite(k.sar(method)[t])]
    if not scored:
        return {"key": None, "sar": math.nan}
    value, name = min(scored)
    return {"key": name, "sar": value}


def _key_entry(key: KeyMeasures, tasks: Sequence[str], methods: Sequence[str]) -> dict[str, Any]:
    norms = [math.sqrt(e) for e in key.energies]
    total = sum(norms)
    return {
        "name": key.name,
        "shape": list(key.shape),
        "layer": layer_of(key.name),
        "task_norm": norms,
        "norm_share": [n / total if total > 0 else math.nan for n in norms],
        "task_spectra": [_stats(s) for s in key.tasks],
        "overlaps": key.overlaps.tolist(),
        "task_arithmetic_sum": {**_stats(key.sum_stats), "singular_values": key.sum_values},
        "methods": {
            m: {
                **_stats(key.methods[m].stats),
                "sar": key.sar(m),
                "singular_values": key.methods[m].singular_values,
            }
            for m in methods
        },
    }


def _stats(stats: ShapeStats) -> dict[str, Any]:
    return asdict(stats)


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _nanmin(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else math.nan


def _mean_matrix(matrices: Iterable[np.ndarray]) -> np.ndarray:
    stack = np.array(list(matrices), dtype=np.float64)
    if stack.size == 0:
        return np.zeros((0, 0))
    finite = np.isfinite(stack)
    counts = finite.sum(axis=0)
    sums = np.where(finite, stack, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _off_diagonal_mean(matrix: np.ndarray) -> float:
    n = matrix.shape[0]
    return _mean(float(matrix[i, j]) for i in range(n) for j in range(n) if i != j)


def clean(value: Any) -> Any:
    """JSON-ready: arrays become lists, floats keep 6 significant digits, NaN and infinities
    become null (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return (
            [clean(float(v)) for v in value.ravel()] if value.ndim <= 1 else clean(value.tolist())
        )
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return float(f"{number:.6g}") if math.isfinite(number) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
