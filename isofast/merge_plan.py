"""Validation and planning shared by in-memory and on-disk merges: model consistency checks,
which treatment each tensor gets, and the core options of a method."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from isofast import arrays
from isofast.errors import MergeInputError
from isofast.methods import MethodSpec, Params

COMPUTE_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor name."""

    name: str
    copy: bool  # integer/bool tensors are copied from the base model
    matrix: bool  # a 2-D key under a matrix method
    out_dtype: str


def is_matrix_key(name: str, shape: Sequence[int], exclude: Sequence[str]) -> bool:
    return len(shape) == 2 and not any(pattern in name for pattern in exclude)


def plan_tensors(
    spec: MethodSpec,
    names: Iterable[str],
    shapes: Mapping[str, Sequence[int]],
    dtypes: Mapping[str, str],
    exclude: Sequence[str],
    out_dtype: str | None,
) -> list[TensorPlan]:
    plans = []
    for name in names:
        dtype = dtypes[name]
        is_float = dtype in arrays.FLOAT_DTYPES
        matrix = is_float and spec.kind == "matrix" and is_matrix_key(name, shapes[name], exclude)
        target = (out_dtype or dtype) if is_float else dtype
        plans.append(TensorPlan(name, not is_float, matrix, target))
    return plans


def check_models(
    names_base: Sequence[str],
    shapes: Mapping[str, Sequence[int]],
    dtypes: Mapping[str, str],
    models: Sequence[tuple[Sequence[str], Mapping[str, Sequence[int]], Mapping[str, str]]],
    labels: Sequence[str],
) -> None:
    """Every fine-tune must have exactly the base's tensor names, shapes and dtypes."""
    if not models:
        raise MergeInputError("no fine-tuned models given (T = 0): need at least one")
    base_set = set(names_base)
    for label, (names, m_shapes, m_dtypes) in zip(labels, models, strict=True):
        missing, extra = sorted(base_set - set(names)), sorted(set(names) - base_set)
        if missing:
            raise MergeInputError(
                f"{label} lacks tensor '{missing[0]}' of the base model"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if extra:
            raise MergeInputError(
                f"{label} has tensor '{extra[0]}' that the base model lacks"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
        for name in names_base:
            if tuple(m_shapes[name]) != tuple(shapes[name]):
                raise MergeInputError(
                    f"tensor '{name}': {label} has shape {tuple(m_shapes[name])}, "
                    f"the base model {tuple(shapes[name])}"
                )
            if m_dtypes[name] != dtypes[name]:
                raise MergeInputError(
                    f"tensor '{name}': {label} has dtype {m_dtypes[name]}, "
                    f"the base model {dtypes[name]}"
                )


def core_options(
    params: Params, compute_dtype: str, seed: int, threads: int | None
) -> dict[str, Any]:
    if compute_dtype not in COMPUTE_DTYPES:
        raise MergeInputError(
            f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}"
        )
    return {
        **params.core_options(),
        "compute64": compute_dtype == "float64",
        "seed": int(seed) % 2**64,
        "threads": threads or default_threads(),
    }


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def check_alpha(alpha: float) -> float:
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise MergeInputError(f"alpha must be a number, got {alpha!r}") from None
    if not math.isfinite(value):
        raise MergeInputError(f"alpha must be finite, got {alpha!r}")
    return value
