"""The merged update M of one key, computed by the merge's own kernels.

Each method is planned over the real models exactly as a merge is (treatments, whole-model
passes such as global TIES thresholds), with alpha = 1. A key's update is then computed by the
pipeline's `merge_batch` on a zero base and the task matrices themselves: the kernel forms
D_t = theta_t - 0 = D_t and writes theta = 0 + M = M, so M carries no rounding of theta0 and
equals, bit for bit, the update the merge computes before it adds theta0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from isofast._native import core
from isofast.cuda_merge import GPU_KERNELS
from isofast.methods import get_method
from isofast.models import ModelSet
from isofast.pipeline import core_options, merge_batch
from isofast.planner import Batch, MergePlan, make_plan
from isofast.request import MergeRequest


class MethodUpdates:
    """One method, planned over the models of a request; `update` gives a key's M."""

    def __init__(
        self, request: MergeRequest, method: str, params: Mapping[str, Any], models: ModelSet
    ) -> None:
        spec = get_method(method)
        # Only the GPU's own kernels go there; the others are compared on the CPU.
        device = request.device if spec.kernel in GPU_KERNELS else "cpu"
        self.request = request.replace(method=spec.name, params=params, alpha=1.0, device=device)
        self.name = spec.name
        self.plan: MergePlan = make_plan(self.request, models)
        self._tensors = {t.name: t for t in self.plan.tensors}
        self._options = core.MergeOptions(core_options(self.plan, models))
        # The task matrices handed to the kernel live in anonymous memory: never drop pages.
        self._options.release_inputs = False

    @property
    def params(self) -> dict[str, Any]:
        """The method's parameters, defaults spelled out."""
        return dataclasses.asdict(self.plan.params)

    def update(self, name: str, deltas: Sequence[np.ndarray]) -> np.ndarray:
        """M of key `name` from its task matrices (compute dtype), as the merge computes it."""
        first = deltas[0]
        # calloc'd zeros: pages the kernel only reads map the shared zero page, not memory.
        zeros = np.zeros(first.shape, first.dtype)
        key_request = MergeRequest(
            base={name: zeros},
            models=tuple({name: d} for d in deltas),
            method=self.request.method,
            params=self.request.params,
            compute_dtype=self.request.compute_dtype,
        )
        out = np.empty(first.shape, first.dtype)
        with ModelSet(key_request) as key_models:
            merge_batch(
                self.plan, key_models, Batch((self._tensors[name],), 1), [out], self._options
            )
        return out
