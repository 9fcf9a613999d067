"""The plan of a merge, from headers alone: each tensor's treatment, the work batches, and the
one memory model that sizes both the batches and the estimate `isofast plan` prints.

Memory model (compute-dtype copies of a tensor the core holds while merging it): T task
vectors and the merged update (the base is read in place); matrix methods add about three
more for the task sum, factors and concatenations (the task vectors are freed before the
polar stage). bench/bench_memory.py measures peaks against this.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Literal

from isofast.cuda_merge import CudaMatrixMerge, gpu_for, gpu_work_bytes
from isofast.errors import MergeWarning
from isofast.io.dtypes import FLOAT_DTYPES, by_name
from isofast.methods import MethodSpec, Params, get_method
from isofast.models import ModelSet
from isofast.output_ring import OutputRing
from isofast.request import MergeRequest

log = logging.getLogger(__name__)

Treatment = Literal["copy", "elementwise", "matrix", "mean"]

MATRIX_EXTRA_COPIES = 3
# Extra bytes that small matrices merged side by side may take beyond the largest item.
BATCH_ALLOWANCE = 256 * 2**20
# Interpreter, numpy/torch, thread stacks, the core's small buffers and the pages of inputs in
# flight (bench/bench_memory.py measured up to 170 MiB of those).
FIXED_OVERHEAD_BYTES = 400 * 2**20
# Batches whose outputs are alive at once in a streamed merge: one being written, one waiting
# for the writer, one being merged.
RING_BATCHES = 3


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # as stored in the inputs
    treatment: Treatment
    out_dtype: str
    work_bytes: int  # compute-dtype memory the core holds while merging it
    out_bytes: int  # bytes of the merged tensor (of a copied one: as stored)

    @property
    def copy(self) -> bool:
        return self.treatment == "copy"

    @property
    def matrix(self) -> bool:
        return self.treatment == "matrix"


@dataclass(frozen=True)
class Batch:
    """Tensors merged in one call of the core; same-shape matrices side by side, each on
    `item_threads` threads."""

    tensors: tuple[TensorPlan, ...]
    item_threads: int

    @property
    def work_bytes(self) -> int:
        return sum(t.work_bytes for t in self.tensors)

    @property
    def ring_bytes(self) -> int:
        """Output-ring bytes its merged tensors take (copied tensors are views of inputs)."""
        return sum(OutputRing.slot_bytes(t.out_bytes) for t in self.tensors if not t.copy)


@dataclass(frozen=True)
class MergePlan:
    request: MergeRequest
    spec: MethodSpec
    params: Params
    tasks: int
    tensors: tuple[TensorPlan, ...]  # in the models' order
    batches: tuple[Batch, ...]  # in merge and write order: copied tensors first
    input_bytes: int
    threads: int
    gpu: CudaMatrixMerge | None

    @property
    def output_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tensors)

    @property
    def gpu_bytes(self) -> int:
        """GPU memory of the largest matrix key merged on the GPU (keys go one at a time)."""
        if self.gpu is None:
            return 0
        return max((self._gpu_work(t) for t in self.tensors if t.matrix), default=0)

    def _gpu_work(self, t: TensorPlan) -> int:
        return gpu_work_bytes(t.shape, self.tasks, self.spec.kernel, by_name(t.dtype).itemsize)

    @property
    def ring_bytes(self) -> int:
        return RING_BATCHES * max((b.ring_bytes for b in self.batches), default=0)

    @property
    def peak_bytes(self) -> int:
        """Estimated peak memory of a streamed merge: the largest batch in the core, the
        output ring, and the fixed overhead."""
        work = max((b.work_bytes for b in self.batches), default=0)
        return work + self.ring_bytes + FIXED_OVERHEAD_BYTES

    @property
    def uses_global_ties(self) -> bool:
        return self.spec.uses_global_ties(self.params)

    def only(self, names: Container[str]) -> MergePlan:
        """This plan with its batches cut down to `names` (the same order): a part of the merge
        to run on its own. The tensor list stays whole (per-tensor parameters depend on a
        tensor's place in it)."""
        batches = []
        for batch in self.batches:
            kept = tuple(t for t in batch.tensors if t.name in names)
            if kept:
                batches.append(Batch(kept, batch.item_threads))
        return dataclasses.replace(self, batches=tuple(batches))


def default_threads() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def is_matrix_key(name: str, shape: Sequence[int], exclude: Sequence[str]) -> bool:
    return len(shape) == 2 and not any(pattern in name for pattern in exclude)


def make_plan(request: MergeRequest, models: ModelSet) -> MergePlan:
    """Plan `request` over its opened `models` (nothing but headers is read). Raises before
    any data is read if the device cannot run the method."""
    spec = get_method(request.method)
    gpu = gpu_for(request.device, spec.kernel, spec.name)
    compute_bytes = 8 if request.compute_dtype == "float64" else 4
    tasks = models.tasks
    tensors = []
    for name in models.names:
        meta = models.meta[name]
        numel = math.prod(meta.shape)
        treatment: Treatment = "copy"  # layer slices are copied (isofast.slices)
        if not request.slices:
            treatment = _treatment(spec, name, meta.shape, meta.dtype, request.exclude)
        out_dtype = meta.dtype if treatment == "copy" else (request.out_dtype or meta.dtype)
        copies = 0 if treatment == "copy" else tasks + 1
        copies += MATRIX_EXTRA_COPIES if treatment == "matrix" else 0
        out_bytes = meta.nbytes if treatment == "copy" else numel * by_name(out_dtype).itemsize
        tensors.append(
            TensorPlan(
                name,
                meta.shape,
                meta.dtype,
                treatment,
                out_dtype,
                copies * numel * compute_bytes,
                out_bytes,
            )
        )
    _warn_if_nothing_is_a_matrix(spec, tensors, request.exclude)
    threads = request.threads or default_threads()
    plan = MergePlan(
        request=request,
        spec=spec,
        params=request.method_params,
        tasks=tasks,
        tensors=tuple(tensors),
        batches=tuple(make_batches(tensors, threads)),
        input_bytes=sum(models.nbytes.values()),
        threads=threads,
        gpu=gpu,
    )
    if gpu is not None:
        for t in tensors:
            if t.matrix:
                gpu.check_fits(t.name, t.shape, plan._gpu_work(t))
        matrices = sum(t.matrix for t in tensors)
        log.info(
            "%s: %d matrices on the GPU (about %s at most), the other tensors on the CPU",
            request.device,
            matrices,
            mib(plan.gpu_bytes),
        )
    for b in plan.batches:
        if len(b.tensors) > 1:
            log.debug(
                "%d x %s merged side by side, one thread each", len(b.tensors), b.tensors[0].shape
            )
    log.info(
        "plan: %s over %d tensors in %d batches, %s to read, peak about %s",
        spec.name,
        len(tensors),
        len(plan.batches),
        mib(plan.input_bytes),
        mib(plan.peak_bytes),
    )
    return plan


def _warn_if_nothing_is_a_matrix(
    spec: MethodSpec, tensors: Sequence[TensorPlan], exclude: Sequence[str]
) -> None:
    excluded = [t.name for t in tensors if t.treatment == "mean" and len(t.shape) == 2]
    if excluded and not any(t.matrix for t in tensors):
        warnings.warn(
            f"{spec.name}: every 2-D tensor matches an exclude pattern {list(exclude)}, so "
            f"none is merged as a matrix (they take the mean of the task vectors)",
            MergeWarning,
            stacklevel=4,
        )


def _treatment(
    spec: MethodSpec, name: str, shape: Sequence[int], dtype: str, exclude: Sequence[str]
) -> Treatment:
    if dtype not in FLOAT_DTYPES:
        return "copy"  # integer / bool buffers are copied from the base model
    if spec.kind != "matrix":
        return "elementwise"
    return "matrix" if is_matrix_key(name, shape, exclude) else "mean"


def make_batches(tensors: Sequence[TensorPlan], threads: int) -> list[Batch]:
    """Copied tensors one by one first; then every float tensor alone with all threads inside
    it, except same-shape matrices, which go side by side (one thread each) as far as the
    memory of the largest single item plus BATCH_ALLOWANCE allows, so batching never lifts
    the peak past what merging one tensor at a time needs."""
    budget = max((t.work_bytes for t in tensors), default=0) + BATCH_ALLOWANCE
    batches = [Batch((t,), 1) for t in tensors if t.copy]
    groups: dict[tuple[tuple[int, ...], str], list[TensorPlan]] = {}
    for t in tensors:
        if t.matrix:
            groups.setdefault((t.shape, t.out_dtype), []).append(t)
        elif not t.copy:
            batches.append(Batch((t,), 1))
    for members in groups.values():
        width = max(1, min(threads, budget // max(1, members[0].work_bytes)))
        for i in range(0, len(members), width):
            batches.append(Batch(tuple(members[i : i + width]), width))
    return batches


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_plan(plan: MergePlan) -> str:
    """What `isofast plan` prints."""
    r = plan.request
    counts: dict[str, int] = {}
    for t in plan.tensors:
        counts[t.treatment] = counts.get(t.treatment, 0) + 1
    lines = [
        f"method      {r.method} (alpha {r.alpha}, compute {r.compute_dtype}, device {r.device})",
        f"base        {r.base if isinstance(r.base, str) else '(in memory)'}",
        *[
            f"model {k:<5d} {m if isinstance(m, str) else '(in memory)'}"
            for k, m in enumerate(r.models)
        ],
        f"tensors     {len(plan.tensors)}: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        f"batches     {len(plan.batches)} on {plan.threads} threads",
        f"executor    {r.executor}" + (f" (Ray at {r.ray_address})" if r.ray_address else ""),
        f"input       {mib(plan.input_bytes)} to read",
        f"output      {mib(plan.output_bytes)} to write",
        f"peak memory about {mib(plan.peak_bytes)} (estimate)",
        *(
            [f"GPU memory  about {mib(plan.gpu_bytes)} (largest key on {r.device})"]
            if plan.gpu
            else []
        ),
        "",
        f"{'tensor':48s} {'shape':>18s} {'dtype':>9s} {'treatment':>11s} {'work':>12s}",
    ]
    for t in plan.tensors:
        lines.append(
            f"{t.name[:48]:48s} {t.shape!s:>18s} {t.dtype:>9s} {t.treatment:>11s} "
            f"{mib(t.work_bytes):>12s}"
        )
    return "\n".join(lines)
