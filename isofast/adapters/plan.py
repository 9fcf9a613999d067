"""The plan of an adapter merge, from configs and headers alone: how each adapted module is
merged, the rank tolerance, and the memory the merge will need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from isofast import arrays
from isofast.adapters.adapter_set import AdapterSet, Module
from isofast.errors import MergeInputError
from isofast.methods import MethodSpec, Params, RankParams, get_method
from isofast.planner import FIXED_OVERHEAD_BYTES, default_threads, is_matrix_key, mib
from isofast.request import MergeRequest

# factored: Iso-C / Iso-CTS / TSV-M on the QR cores; concatenated: task arithmetic or weight
# averaging, exact; mean: a matrix method's excluded module (weight averaging); dense: an
# elementwise method on the module's dense updates.
Treatment = Literal["factored", "concatenated", "mean", "dense"]


@dataclass(frozen=True)
class ModulePlan:
    module: Module
    treatment: Treatment
    work_bytes: int  # memory the merge of this module holds (estimate)

    @property
    def stacked_rank(self) -> int:
        """R: the sum of the adapters' ranks on this module."""
        return sum(self.module.ranks.values())


@dataclass(frozen=True)
class AdapterPlan:
    request: MergeRequest
    spec: MethodSpec
    params: Params
    tasks: int
    modules: tuple[ModulePlan, ...]
    tol: float  # rank tolerance, relative to sigma_max
    threads: int
    input_bytes: int

    @property
    def peak_bytes(self) -> int:
        return max((m.work_bytes for m in self.modules), default=0) + FIXED_OVERHEAD_BYTES

    @property
    def output(self) -> str:
        return self.request.output or "adapter"


def rank_tolerance(params: Params, compute_dtype: str) -> float:
    """docs/CONTRACT.md "Rank tolerance": rank_tol, else 4 eps32 for float32 compute and
    16 eps64 for float64 (what the dense kernels cut at)."""
    if isinstance(params, RankParams) and params.rank_tol is not None:
        return params.rank_tol
    factor = 4.0 if compute_dtype == "float32" else 16.0
    return factor * float(np.finfo(np.dtype(compute_dtype)).eps)


def check_request(request: MergeRequest) -> None:
    """What the adapter merge itself cannot do, before anything is opened."""
    if request.device != "cpu":
        raise MergeInputError(
            f"adapter merges run on the CPU (their matrices are small); device "
            f"{request.device!r} is not supported for them"
        )


def make_adapter_plan(request: MergeRequest, adapters: AdapterSet) -> AdapterPlan:
    spec = get_method(request.method)
    params = request.method_params
    tasks = adapters.tasks
    compute = 8 if request.compute_dtype == "float64" else 4
    into_model = request.output == "model"
    modules = []
    for module in adapters.modules:
        rows, cols = module.shape
        rank = sum(module.ranks.values())
        if spec.kind == "matrix":
            matrix = is_matrix_key(module.weight, module.shape, request.exclude)
            treatment: Treatment = "factored" if matrix else "mean"
        elif spec.name in ("task_arithmetic", "weight_average"):
            treatment = "concatenated"
        else:
            treatment = "dense"
        if treatment == "dense":
            work = (tasks + 2) * rows * cols * compute  # T updates, a zero base, M
            if not into_model:
                work += 3 * rows * cols * 8  # the float64 SVD of M for the adapter's factors
        else:
            work = 6 * (rows + cols) * rank * 8 + 4 * rank * rank * 8
        if into_model:
            work += rows * cols * (compute + 8)  # the merged weight and its output copy
        modules.append(ModulePlan(module, treatment, work))
    return AdapterPlan(
        request=request,
        spec=spec,
        params=params,
        tasks=tasks,
        modules=tuple(modules),
        tol=rank_tolerance(params, request.compute_dtype),
        threads=request.threads or default_threads(),
        input_bytes=sum(
            (m.out_features + m.in_features) * m.rank * arrays.itemsize(m.dtype)
            for a in adapters.adapters
            for m in a.modules.values()
        ),
    )


def format_adapter_plan(plan: AdapterPlan) -> str:
    """What `isofast plan` prints for an adapter merge."""
    r = plan.request
    limit = f", max_rank {r.max_rank}" if r.max_rank is not None else ", exact rank"
    counts: dict[str, int] = {}
    for m in plan.modules:
        counts[m.treatment] = counts.get(m.treatment, 0) + 1
    base = r.base if isinstance(r.base, str) else "(in memory)" if r.has_base else "-"
    lines = [
        f"method      {r.method} on {plan.tasks} LoRA adapters (alpha {r.alpha}, compute "
        f"{r.compute_dtype}, rank tolerance {plan.tol:.3g})",
        f"output      {plan.output}" + (limit if plan.output == "adapter" else ""),
        f"base        {base}",
        *[
            f"adapter {k:<3d} {a if isinstance(a, str) else '(in memory)'}"
            for k, a in enumerate(r.adapters)
        ],
        f"modules     {len(plan.modules)}: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        f"input       {mib(plan.input_bytes)} of factors to read",
        f"peak memory about {mib(plan.peak_bytes)} (estimate)",
        "",
        f"{'module':48s} {'shape':>14s} {'ranks':>16s} {'R':>5s} {'treatment':>12s}",
    ]
    for m in plan.modules:
        ranks = ",".join(str(m.module.ranks.get(t, "-")) for t in range(plan.tasks))
        lines.append(
            f"{m.module.name[:48]:48s} {m.module.shape!s:>14s} {ranks[:16]:>16s} "
            f"{m.stacked_rank:>5d} {m.treatment:>12s}"
        )
    return "\n".join(lines)
