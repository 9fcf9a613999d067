"""Where the analysis reads a merge's inputs: full checkpoints (or state dicts), read with the
merge's ModelSet, or LoRA adapters, read with the adapter merge's AdapterSet. Both give the
same things: the 2-D keys to analyse, a key's task matrices D_t in the compute dtype, and,
per method, a key's merged update M as that merge computes it."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from isofast.analysis import keys
from isofast.analysis.keys import task_matrices
from isofast.analysis.updates import MethodUpdates
from isofast.errors import MergeInputError
from isofast.io.dtypes import FLOAT_DTYPES
from isofast.models import ModelSet
from isofast.planner import is_matrix_key
from isofast.request import MergeRequest


class Updates(keys.Updates, Protocol):
    @property
    def params(self) -> dict[str, Any]: ...


class Inputs(Protocol):
    names: list[str]
    tasks: int

    def shape(self, name: str) -> tuple[int, int]: ...
    def nbytes(self, name: str) -> int: ...
    def task_matrices(self, name: str) -> list[np.ndarray]: ...
    def updates(self, method: str, params: Mapping[str, Any]) -> Updates: ...
    def naming(self) -> contextlib.AbstractContextManager[None]: ...
    def close(self) -> None: ...


def open_source(request: MergeRequest, include: Sequence[str]) -> Inputs:
    """The inputs of `request`, opened and checked as its merge checks them."""
    if request.adapters:
        return AdapterSource(request, include)
    return CheckpointSource(request, include)


def analysed_keys(
    candidates: Sequence[tuple[str, tuple[int, ...], str]],
    exclude: Sequence[str],
    include: Sequence[str],
) -> list[str]:
    """The float 2-D keys outside `exclude` (and inside `include` when given), in order."""
    names = [
        name
        for name, shape, dtype in candidates
        if dtype in FLOAT_DTYPES
        and is_matrix_key(name, shape, exclude)
        and (not include or any(p in name for p in include))
    ]
    if not names:
        raise MergeInputError(
            "nothing to analyse: no float 2-D tensor "
            + (f"outside the exclude patterns {list(exclude)}" if exclude else "in the models")
            + (f" whose name contains one of {list(include)}" if include else "")
        )
    return names


class CheckpointSource:
    """Full checkpoints or state dicts: theta0 and theta_1 .. theta_T."""

    def __init__(self, request: MergeRequest, include: Sequence[str]) -> None:
        self.request = request
        self.models = ModelSet(request)
        try:
            meta = self.models.meta
            self.names = analysed_keys(
                [(n, meta[n].shape, meta[n].dtype) for n in self.models.names],
                request.exclude,
                include,
            )
        except BaseException:
            self.models.close()
            raise
        self.tasks = self.models.tasks

    def shape(self, name: str) -> tuple[int, int]:
        m, n = self.models.meta[name].shape
        return m, n

    def nbytes(self, name: str) -> int:
        return self.models.nbytes[name]

    def task_matrices(self, name: str) -> list[np.ndarray]:
        return task_matrices(name, self.models, self.request.compute_dtype)

    def updates(self, method: str, params: Mapping[str, Any]) -> Updates:
        return MethodUpdates(self.request, method, params, self.models)

    def naming(self) -> contextlib.AbstractContextManager[None]:
        return self.models.naming_files()

    def close(self) -> None:
        self.models.close()


class AdapterSource:
    """LoRA adapters: D_t = scale_t B_t A_t of each adapted module (zero where an adapter
    leaves the module alone); M as the adapter merge computes it (factored or dense)."""

    def __init__(self, request: MergeRequest, include: Sequence[str]) -> None:
        from isofast.adapters.adapter_set import AdapterSet
        from isofast.adapters.plan import check_request

        check_request(request)
        self.request = request
        self.adapter_set = AdapterSet(request)
        try:
            self.modules = {m.weight: m for m in self.adapter_set.modules}
            self.names = analysed_keys(
                [(m.weight, m.shape, "float32") for m in self.modules.values()],
                request.exclude,
                include,
            )
        except BaseException:
            self.adapter_set.close()
            raise
        self.tasks = self.adapter_set.tasks
        self.dtype = np.dtype(request.compute_dtype)

    def shape(self, name: str) -> tuple[int, int]:
        return self.modules[name].shape

    def nbytes(self, name: str) -> int:
        """Bytes of the factors read for the module."""
        return sum(
            (p.lora.out_features + p.lora.in_features) * p.lora.rank * 4
            for p in self.modules[name].parts
        )

    def task_matrices(self, name: str) -> list[np.ndarray]:
        return self.modules[name].dense_updates(self.tasks, self.dtype)

    def updates(self, method: str, params: Mapping[str, Any]) -> Updates:
        return AdapterUpdates(self.request, method, params, self.adapter_set)

    @contextlib.contextmanager
    def naming(self) -> Iterator[None]:
        yield  # the adapter reader's errors name the adapter, its file and the module

    def close(self) -> None:
        self.adapter_set.close()


class AdapterUpdates:
    """One method's merged update of each module, by the adapter merge's own code."""

    def __init__(
        self, request: MergeRequest, method: str, params: Mapping[str, Any], adapter_set: Any
    ) -> None:
        from isofast.adapters.plan import make_adapter_plan
        from isofast.adapters.updates import Merger
        from isofast.methods import get_method

        spec = get_method(method)
        self.request = request.replace(method=spec.name, params=params, alpha=1.0)
        self.name = spec.name
        self.plan = make_adapter_plan(self.request, adapter_set)
        self._modules = {m.module.weight: m for m in self.plan.modules}
        self._merger = Merger(self.plan)

    @property
    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.plan.params)

    def update(self, name: str, deltas: Sequence[np.ndarray]) -> np.ndarray:
        merged = self._merger.update(self._modules[name])
        dense = merged if isinstance(merged, np.ndarray) else merged.dense(np.float64)
        return np.asarray(dense, dtype=deltas[0].dtype)
