"""The merged update of each adapted module, by the plan's treatment: Iso-C, Iso-CTS and
TSV-M on the factored cores, task arithmetic and weight averaging as concatenations, the
elementwise methods through the compiled kernels on dense updates (alpha not applied)."""

from __future__ import annotations

import numpy as np

from isofast.adapters.dense import DenseMerge
from isofast.adapters.factored import (
    Factors,
    concatenate,
    iso_c,
    iso_cts,
    one_blas_thread,
    task_space,
    tsv_m,
)
from isofast.adapters.plan import AdapterPlan, ModulePlan
from isofast.methods import IsoCtsParams


class Merger:
    """The merged update of each module: factors, or a dense array (elementwise methods)."""

    def __init__(self, plan: AdapterPlan) -> None:
        self.plan = plan
        self.dense: DenseMerge | None = None
        dense_modules = [m.module for m in plan.modules if m.treatment == "dense"]
        if dense_modules:
            self.dense = DenseMerge(
                plan.spec, plan.params, plan.request, plan.threads, dense_modules, plan.tasks
            )

    def update(self, m: ModulePlan) -> Factors | np.ndarray:
        """M of one module (alpha not applied)."""
        if m.treatment == "dense":
            assert self.dense is not None
            return self.dense.merge(m.module)
        parts = m.module.factors()
        if m.treatment != "factored":
            task_sum = self.plan.spec.name == "task_arithmetic"
            return concatenate(parts, 1.0 if task_sum else 1.0 / self.plan.tasks)
        name, tol = self.plan.spec.name, self.plan.tol
        with one_blas_thread():  # small matrices: see isofast/adapters/factored.py
            space = task_space(parts)
            if name == "iso_c":
                return iso_c(space, tol)
            if name == "iso_cts":
                assert isinstance(self.plan.params, IsoCtsParams)
                return iso_cts(space, self.plan.tasks, self.plan.params, tol)
            return tsv_m(space, self.plan.tasks, m.module.shape, tol)
