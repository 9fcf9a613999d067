"""`isofast plan`: everything a merge will do, checked from file headers alone (no tensor data
is read), with the work items, the estimated peak memory and the output size."""

from __future__ import annotations

from dataclasses import dataclass

from isofast.cuda_merge import gpu_for
from isofast.io import DTYPE_ITEMSIZE
from isofast.merge_plan import TensorPlan, check_alpha, core_options, plan_tensors
from isofast.methods import get_method
from isofast.pipeline import MergeRequest, OpenModels

_OUT_SIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
# Interpreter, numpy/torch, thread stacks, the core's small buffers and the pages of memory-
# mapped inputs in flight (bench/bench_memory.py measured up to 170 MiB of those).
FIXED_OVERHEAD_BYTES = 400 * 2**20


@dataclass(frozen=True)
class WorkItem:
    name: str
    shape: tuple[int, ...]
    dtype: str
    treatment: str  # copy | elementwise | matrix | mean
    work_bytes: int  # compute-dtype memory the core holds for it
    out_bytes: int


@dataclass(frozen=True)
class MergePlan:
    request: MergeRequest
    items: list[WorkItem]
    total_input_bytes: int
    output_bytes: int
    peak_bytes: int


def _treatment(plan: TensorPlan, kind: str) -> str:
    if plan.copy:
        return "copy"
    if plan.matrix:
        return "matrix"
    return "mean" if kind == "matrix" else "elementwise"


def make_plan(request: MergeRequest) -> MergePlan:
    spec = get_method(request.method)
    params = spec.make_params(dict(request.params or {}))
    check_alpha(request.alpha)
    gpu_for(request.device, spec.kernel, spec.name)  # fails here, before reading data
    core_options(params, request.compute_dtype, request.seed, request.threads)
    models = OpenModels(request)
    try:
        plans = plan_tensors(
            spec, models.names, models.shapes, models.dtypes, request.exclude, request.out_dtype
        )
        tasks = len(request.models)
        csize = 8 if request.compute_dtype == "float64" else 4
        items = []
        for p in plans:
            shape = models.shapes[p.name]
            n = 1
            for s in shape:
                n *= s
            treatment = _treatment(p, spec.kind)
            # T task vectors + merged update (the base is read in place); matrix methods add
            # their workspace (sum, factors, concatenations: about 3 more copies, the task
            # vectors being freed before the polar stage). bench/bench_memory.py checks this.
            copies = 0 if treatment == "copy" else tasks + 1 + (3 if treatment == "matrix" else 0)
            out_size = _OUT_SIZE.get(p.out_dtype) or DTYPE_ITEMSIZE.get(p.out_dtype.upper(), 8)
            items.append(
                WorkItem(
                    p.name,
                    shape,
                    models.dtypes[p.name],
                    treatment,
                    copies * n * csize,
                    n * out_size,
                )
            )
        total_in = sum(models.nbytes.values())
    finally:
        models.close()
    out_bytes = sum(i.out_bytes for i in items)
    # One item in the core, the previous item's output being written, the next one's output.
    biggest_out = max((i.out_bytes for i in items), default=0)
    peak = max((i.work_bytes for i in items), default=0) + 2 * biggest_out + FIXED_OVERHEAD_BYTES
    return MergePlan(request, items, total_in, out_bytes, peak)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_plan(plan: MergePlan) -> str:
    r = plan.request
    counts: dict[str, int] = {}
    for i in plan.items:
        counts[i.treatment] = counts.get(i.treatment, 0) + 1
    lines = [
        f"method      {r.method} (alpha {r.alpha}, compute {r.compute_dtype})",
        f"base        {r.base}",
        *[f"model {k:<5d} {m}" for k, m in enumerate(r.models)],
        f"tensors     {len(plan.items)}: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        f"input       {_mb(plan.total_input_bytes)} to read",
        f"output      {_mb(plan.output_bytes)} to write",
        f"peak memory about {_mb(plan.peak_bytes)} (estimate)",
        "",
        f"{'tensor':48s} {'shape':>18s} {'dtype':>9s} {'treatment':>11s} {'work':>12s}",
    ]
    for i in plan.items:
        lines.append(
            f"{i.name[:48]:48s} {i.shape!s:>18s} {i.dtype:>9s} {i.treatment:>11s} "
            f"{_mb(i.work_bytes):>12s}"
        )
    return "\n".join(lines)
