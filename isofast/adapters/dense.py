"""Elementwise methods (weight averaging and task arithmetic on request, TIES, DARE,
consensus) on adapters: the dense update of one module at a time, merged by the same compiled
kernels and options as a dense merge of full checkpoints.

Each module is merged as a tensor named like its base weight (DARE's mask is keyed by the
name) whose task vectors are the adapters' updates D_t (zero for an adapter that does not
touch the module). A whole-model TIES trim spans the adapted modules: the tensors the
adapters leave alone have zero task vectors and no part in the merge.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from isofast._native import core
from isofast.adapters.adapter_set import Module
from isofast.errors import LinAlgError, MergeInputError
from isofast.kernels import kernel_options
from isofast.methods import MethodSpec, Params
from isofast.models import CoreItem
from isofast.request import MergeRequest
from isofast.ties_global import global_ties_options

_TASK = re.compile(r"fine-tuned model (\d+)")


def dense_options(spec: MethodSpec, params: Params, request: MergeRequest, threads: int) -> Any:
    """The compiled kernel's options as a dense merge sets them, with alpha = 1: alpha is
    applied to the factors or the weights later."""
    options = kernel_options(spec, params, request, threads, alpha=1.0)
    options.release_inputs = False  # the updates are arrays of ours, not mapped files
    return options


class DenseMerge:
    """Dense updates of modules, formed on demand in the compute dtype and merged."""

    def __init__(
        self,
        spec: MethodSpec,
        params: Params,
        request: MergeRequest,
        threads: int,
        modules: Sequence[Module],
        tasks: int,
    ) -> None:
        self.tasks = tasks
        self.dtype = np.float64 if request.compute_dtype == "float64" else np.float32
        self.options = dense_options(spec, params, request, threads)
        if spec.uses_global_ties(params):
            self.options = global_ties_options(
                lambda: ([self._item(m, None)] for m in modules),
                tasks,
                sum(math.prod(m.shape) for m in modules),
                getattr(params, "density", 1.0),
                self.options,
            )

    def updates(self, module: Module) -> list[np.ndarray]:
        """D_1 .. D_T of `module` (zeros where an adapter does not touch it)."""
        return module.dense_updates(self.tasks, self.dtype)

    def _item(self, module: Module, out: np.ndarray | None) -> CoreItem:
        # The base is zero, so the kernel's task vectors are exactly the updates.
        zeros = np.zeros(module.shape, self.dtype)
        return (module.weight, zeros, self.updates(module), out, False)

    def merge(self, module: Module) -> np.ndarray:
        """The merged update M of `module` (alpha = 1), in the compute dtype."""
        out = np.empty(module.shape, self.dtype)
        with _naming(module):
            core.merge_items(self.options, [self._item(module, out)])
        return out


@contextlib.contextmanager
def _naming(module: Module) -> Iterator[None]:
    """The core names a task by its position: name the adapter, its file and the module."""
    try:
        yield
    except (MergeInputError, LinAlgError) as exc:
        labels = {p.task: p.adapter.where(module.name) for p in module.parts}
        text = _TASK.sub(lambda m: labels.get(int(m[1]), m[0]), str(exc))
        if text == str(exc):
            raise
        raise type(exc)(text) from exc
