"""Out-of-core merging of checkpoints on disk: read memory-mapped tensors lazily, merge one work
item at a time in the core while the next item is prefetched and the previous one written, and
publish the output folder atomically."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isofast import arrays
from isofast._native import core
from isofast.batching import make_batches
from isofast.cuda_merge import CudaIsoC, gpu_for
from isofast.errors import MergeInputError
from isofast.io import CheckpointReader, CheckpointWriter
from isofast.merge_plan import (
    TensorPlan,
    check_alpha,
    check_models,
    core_options,
    plan_tensors,
)
from isofast.methods import get_method
from isofast.model_card import merge_config_yaml, model_card
from isofast.output_ring import OutputRing, RingToken
from isofast.ties_global import CoreItem, global_ties_options

Progress = Callable[[str, int], None]  # (tensor name, bytes read for it)

# Merged arrays of one batch, and the tokens that give their memory back to the ring.
Outputs = tuple[list[Any], list[RingToken]]

# Extra bytes small matrices merged side by side may take beyond the one-at-a-time peak.
BATCH_ALLOWANCE = 256 * 2**20


@dataclass(frozen=True)
class MergeRequest:
    """Everything one checkpoint merge needs (what a YAML config describes)."""

    base: str
    models: tuple[str, ...]
    method: str = "iso_cts"
    alpha: float = 1.0
    params: Mapping[str, Any] | None = None
    compute_dtype: str = "float32"
    out_dtype: str | None = None
    exclude: tuple[str, ...] = ("text_projection",)
    seed: int = 0
    threads: int | None = None
    max_shard_bytes: int = 5 * 2**30
    allow_pickle: bool = False
    device: str = "cpu"


class OpenModels:
    """The base and fine-tuned checkpoints, opened lazily and validated from headers."""

    def __init__(self, request: MergeRequest) -> None:
        paths = [request.base, *request.models]
        for p in paths:
            if not os.path.exists(p):
                raise MergeInputError(f"model path does not exist: {p}")
        self.labels = [f"base model {request.base}"] + [f"model {p}" for p in request.models]
        self.readers: list[CheckpointReader] = []
        try:
            for p in paths:
                self.readers.append(CheckpointReader(p, allow_pickle=request.allow_pickle))
            self._check()
        except BaseException:
            self.close()  # the readers hold open files
            raise

    def _check(self) -> None:
        infos = [r.infos() for r in self.readers]
        self.names = list(self.readers[0].names())
        self.shapes = {n: tuple(infos[0][n].shape) for n in self.names}
        self.dtypes = {
            n: arrays.SAFETENSORS_TO_NAME.get(infos[0][n].dtype, infos[0][n].dtype)
            for n in self.names
        }
        check_models(
            self.names,
            self.shapes,
            self.dtypes,
            [
                (
                    list(info),
                    {n: tuple(i.shape) for n, i in info.items()},
                    {n: arrays.SAFETENSORS_TO_NAME.get(i.dtype, i.dtype) for n, i in info.items()},
                )
                for info in infos[1:]
            ],
            self.labels[1:],
        )
        self.nbytes = {n: sum(info[n].nbytes for info in infos) for n in self.names}
        self.base_nbytes = {n: infos[0][n].nbytes for n in self.names}

    def all_safetensors(self) -> bool:
        return all(f.suffix == ".safetensors" for r in self.readers for f in r.files)

    def view(self, model: int, name: str) -> Any:
        arr = self.readers[model].get(name)
        return arrays.Bf16Array(arr) if self.dtypes[name] == "bfloat16" else arr

    def core_input(self, model: int, name: str) -> Any:
        """What the core reads tensor `name` of `model` from: for safetensors, the open file
        itself (the core reads it in cache-sized chunks, which costs about what `cat` does;
        touching a mapping of it cost page faults and as much again); else the array."""
        source = self.readers[model].source(name)
        if source is None:
            return arrays.core_arg(self.view(model, name))
        fd, offset = source
        return ("file", fd, offset, self.dtypes[name], self.shapes[name])

    def prefetch(self, name: str) -> None:
        for r in self.readers:
            r.prefetch([name])

    def release(self, name: str) -> None:
        for r in self.readers:
            r.release([name])

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _core_item(models: OpenModels, plan: TensorPlan, out: Any) -> CoreItem:
    return (
        plan.name,
        models.core_input(0, plan.name),
        [models.core_input(i, plan.name) for i in range(1, len(models.readers))],
        None if out is None else arrays.core_arg(out),
        plan.matrix,
    )


def merge_checkpoints(
    request: MergeRequest,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    config_text: str | None = None,
) -> Path:
    """Merge checkpoints on disk into `out_dir` (sharded safetensors + index + model card)."""
    spec = get_method(request.method)
    params = spec.make_params(dict(request.params or {}))
    alpha = check_alpha(request.alpha)
    gpu = gpu_for(request.device, spec.kernel, spec.name)
    options = core_options(params, request.compute_dtype, request.seed, request.threads)
    models = OpenModels(request)
    # The core reads safetensors from their files (core_input); should any of their tensors
    # reach it as mapped arrays, their pages may be dropped once converted. Never torch
    # pickles' arrays, which may live in anonymous memory.
    options["release_inputs"] = models.all_safetensors()
    try:
        plans = plan_tensors(
            spec, models.names, models.shapes, models.dtypes, request.exclude, request.out_dtype
        )
        float_plans = [p for p in plans if not p.copy]
        if spec.uses_global_ties(params):
            total = sum(_numel(models.shapes[p.name]) for p in float_plans)
            options = global_ties_options(
                lambda: ([_core_item(models, p, None)] for p in float_plans),
                len(request.models),
                total,
                getattr(params, "density", 1.0),
                options,
            )
        metadata = {"isofast_method": spec.name, "isofast_alpha": repr(alpha)}
        batches = plan_batches(models, plans, options)
        with CheckpointWriter(
            out_dir, request.max_shard_bytes, metadata, overwrite=overwrite
        ) as writer:
            order = [p for batch, _ in batches for p in batch]
            phases = writer.page_phases(_stored_bytes(models, p) for p in order)
            page_phase = {p.name: phase for p, phase in zip(order, phases, strict=True)}
            stream = _stream(
                models, batches, spec.kernel, alpha, options, progress, page_phase, gpu,
                writer.wait_written,
            )  # fmt: skip
            for name, out, dtype in stream:
                writer.add(name, arrays.storage_bits(out), arrays.NAME_TO_SAFETENSORS[dtype])
            base_dir = Path(request.base)
            writer.copy_side_files(base_dir if base_dir.is_dir() else base_dir.parent)
            writer.write_text("README.md", model_card(request, spec.name, params))
            writer.write_text("isofast_config.yml", config_text or merge_config_yaml(request))
        return Path(os.path.abspath(out_dir))
    finally:
        models.close()


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def memory_budget(models: OpenModels, tasks: int, compute_bytes: int) -> int:
    """Bytes that matrices merged side by side may use: the (T + 4) x largest-tensor bound of
    a one-at-a-time merge plus a fixed allowance, so batching never lifts the peak past the
    bound the memory benchmark checks ((T + 4) x largest in fp32 + 500 MB)."""
    largest = max((_numel(models.shapes[n]) for n in models.names), default=0)
    return (tasks + 4) * largest * compute_bytes + BATCH_ALLOWANCE


def plan_batches(
    models: OpenModels, plans: Sequence[TensorPlan], options: Mapping[str, Any]
) -> list[tuple[list[TensorPlan], int]]:
    """Work items in merge (and write) order: copied tensors first, then the float ones."""
    tasks = len(models.readers) - 1
    compute_bytes = 8 if options["compute64"] else 4
    float_plans = [p for p in plans if not p.copy]
    return [([p], 1) for p in plans if p.copy] + make_batches(
        float_plans,
        models.shapes,
        tasks,
        compute_bytes,
        options["threads"],
        memory_budget(models, tasks, compute_bytes),
    )


def _stored_bytes(models: OpenModels, plan: TensorPlan) -> int:
    """Bytes the writer gets for this tensor."""
    if plan.copy:
        return models.base_nbytes[plan.name]
    return _numel(models.shapes[plan.name]) * arrays.itemsize(plan.out_dtype)


def _stream(
    models: OpenModels,
    batches: Sequence[tuple[list[TensorPlan], int]],
    kernel: str,
    alpha: float,
    options: dict[str, Any],
    progress: Progress | None,
    page_phase: Mapping[str, int],
    gpu: CudaIsoC | None = None,
    written: Callable[[], None] | None = None,
) -> Iterator[tuple[str, Any, str]]:
    """Merged tensors, batch by batch. Batch k+1 is merged on a worker thread (the core releases
    the GIL) while the caller writes batch k (two batches are queued ahead), after asking the
    kernel to read ahead the pages of batch k+3. Outputs start at `page_phase[name]` within a
    page of memory (the writer then sends them to disk without copying them)."""

    def prefetch(i: int) -> None:
        if i < len(batches):
            for p in batches[i][0]:
                models.prefetch(p.name)

    # Three batches' outputs are alive at once: one being written, one waiting for the writer,
    # one being merged. When a wrap wastes the end of the ring, an output gets its own array.
    ring = OutputRing(3 * max((_out_bytes(models, b) for b, _ in batches), default=0))

    def run(i: int) -> Outputs:
        batch, width = batches[i]
        if batch[0].copy:
            return [models.view(0, batch[0].name)], []
        placed = [ring.empty(models.shapes[p.name], p.out_dtype, page_phase[p.name]) for p in batch]
        outs = [out for out, _ in placed]
        if gpu is not None and all(p.matrix for p in batch):
            fts = range(1, len(models.readers))
            for p, o in zip(batch, outs, strict=True):
                base = models.view(0, p.name)
                tuned = [models.view(t, p.name) for t in fts]
                gpu.merge(base, tuned, o, alpha, options.get("rank_tol"))
                models.release(p.name)  # read through the mapping: keep RSS flat
        else:
            items = [_core_item(models, p, o) for p, o in zip(batch, outs, strict=True)]
            core.merge_items(kernel, items, alpha, {**options, "item_threads": width})
        return outs, [token for _, token in placed]

    if not batches:
        return
    for i in range(3):
        prefetch(i)
    # Two batches queued ahead: the merge never waits for the writer to finish a big tensor
    # (the embedding) before starting on the small ones after it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="isofast-merge") as pool:
        pending = deque(pool.submit(run, i) for i in range(min(2, len(batches))))
        written_tokens: list[RingToken] = []
        for i, (batch, _) in enumerate(batches):
            outs, tokens = pending.popleft().result()
            if written is not None:
                written()  # the previous batch's memory is no longer read by the writer
            for token in written_tokens:
                ring.release(token)
            written_tokens = tokens
            if i + 2 < len(batches):
                pending.append(pool.submit(run, i + 2))
            prefetch(i + 3)  # read-ahead hints (this thread would only wait otherwise)
            for plan, out in zip(batch, outs, strict=True):
                if progress is not None:
                    progress(plan.name, models.nbytes[plan.name])
                yield plan.name, out, plan.out_dtype


def _out_bytes(models: OpenModels, batch: Sequence[TensorPlan]) -> int:
    """Ring bytes a batch's outputs take, page-phase padding included."""
    if batch[0].copy:
        return 0
    return sum(OutputRing.slot_bytes(_stored_bytes(models, p)) for p in batch)
