"""Runs a merge plan: batch by batch through the compiled core (or the GPU), into tensors in
memory or streamed into a checkpoint folder that is published atomically.

A streamed merge overlaps its stages: batch k+1 is merged on a worker thread (the core releases
the GIL) while the caller's thread writes batch k, the kernel reads ahead the pages of later
batches, and outputs come from a reused ring placed at the page phase the writer needs to send
them to disk without copying.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from isofast import __version__, arrays
from isofast._native import core
from isofast.io import CheckpointWriter
from isofast.io.dtypes import safetensors_name
from isofast.io.journal import ShardRecord
from isofast.io.shards import PlannedShard, PlannedShardWriter
from isofast.kernels import configure_tensor, kernel_options
from isofast.model_card import model_card
from isofast.models import ModelSet
from isofast.output_ring import OutputRing, RingToken
from isofast.planner import Batch, MergePlan, TensorPlan
from isofast.progress import ProgressBar
from isofast.ties_global import TiesTotals, global_ties_options

log = logging.getLogger(__name__)

CONFIG_NAME = "isofast_config.yml"

Progress = Callable[[str, int], None]  # (tensor name, bytes read for it)

# Merged arrays of one batch, and the tokens that give their memory back to the ring.
Outputs = tuple[list[Any], list[RingToken]]


def plain_options(plan: MergePlan, models: ModelSet) -> core.MergeOptions:
    """The kernel's options, without the whole-model statistics."""
    options = kernel_options(plan.spec, plan.params, plan.request, plan.threads, plan.request.alpha)
    core.take_route_counts()  # start counting afresh for this merge
    # Pages of mapped inputs may be dropped once converted; never those of arrays that may live
    # in anonymous memory (torch pickles, in-memory tensors).
    options.release_inputs = models.from_files
    if models.from_files:
        log.debug("input pages are dropped from memory once the core has read them")
    return options


def core_options(
    plan: MergePlan, models: ModelSet, ties: TiesTotals | None = None
) -> core.MergeOptions:
    """The kernel's options, completed by the whole-model passes a method needs (global TIES
    thresholds and majority sign: `ties` when another process found them, else one streamed
    pass over the inputs each, here)."""
    options = plain_options(plan, models)
    if not plan.uses_global_ties:
        return options
    if ties is None:
        floats = [t for t in plan.tensors if not t.copy]
        with models.naming_files():
            options = global_ties_options(
                lambda: ([models.core_item(t.name, False, None)] for t in floats),
                plan.tasks,
                sum(math.prod(t.shape) for t in floats),
                getattr(plan.params, "density", 1.0),
                options,
            )
    else:
        options = ties.apply(options)
    log.info(
        "global TIES: thresholds %s, majority sign %+d",
        ", ".join(f"{x:.3g}" for x in options.ties.thresholds),
        options.ties.majority_sign,
    )
    return options


def log_routes() -> None:
    """Log (and clear) the routes and fallbacks the core's matrix methods took."""
    counts = core.take_route_counts()
    if counts:
        log.info("core routes: %s", "; ".join(f"{what} x{n}" for what, n in counts.items()))


def merge_batch(
    plan: MergePlan, models: ModelSet, batch: Batch, outs: list[Any], options: core.MergeOptions
) -> None:
    """Merge the float tensors of `batch` into `outs` (one preallocated array each)."""
    if plan.gpu is not None and all(t.matrix for t in batch.tensors):
        for t, out in zip(batch.tensors, outs, strict=True):
            base, *tuned = models.views(t.name)
            with models.naming_files():
                plan.gpu.merge(base, tuned, out, options)
            models.release(t.name)  # read through the mapping: keep RSS flat
        return
    items = [
        models.core_item(t.name, t.matrix, o) for t, o in zip(batch.tensors, outs, strict=True)
    ]
    batch_options = core.MergeOptions(options)
    batch_options.item_threads = batch.item_threads
    # Per-tensor parameters (gradients, filters) belong to elementwise methods: one tensor
    # per batch.
    names = [t.name for t in plan.tensors]
    configure_tensor(batch_options, plan.params, batch.tensors[0].name, names)
    with models.naming_files():
        core.merge_items(batch_options, items)


def merge_in_memory(plan: MergePlan, models: ModelSet, kind: str) -> dict[str, Any]:
    """Every tensor merged into a new array of `kind` ("torch", "cupy" or "numpy"), in the
    models' order, on the device the inputs live on. Inputs on a GPU with `device: cuda`: the
    matrix keys merge there without leaving it; everything else goes through the CPU core and
    its result back to the GPU."""
    options = core_options(plan, models)
    device = models.memory_device
    merged: dict[str, Any] = {}
    for batch in plan.batches:
        if batch.tensors[0].copy:
            t = batch.tensors[0]
            merged[t.name] = arrays.copy_as(models.base.view(t.name), kind)
            continue
        if device != "cpu" and plan.gpu is not None and all(t.matrix for t in batch.tensors):
            for t in batch.tensors:
                base, *tuned = models.views(t.name)
                with models.naming_files():
                    result = plan.gpu.merge_on_device(base, tuned, options, t.out_dtype)
                merged[t.name] = arrays.from_torch(result, kind)
            continue
        outs = [arrays.empty(t.shape, t.out_dtype, kind) for t in batch.tensors]
        merge_batch(plan, models, batch, outs, options)
        merged.update(
            (t.name, arrays.to_device(o, device, kind))
            for t, o in zip(batch.tensors, outs, strict=True)
        )
    log_routes()
    return {t.name: merged[t.name] for t in plan.tensors}


def merge_to_folder(
    plan: MergePlan,
    models: ModelSet,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool | Progress = False,
    resume: bool = False,
) -> Path:
    """Stream the merge into `out_dir` (sharded safetensors, index, side files of the base,
    model card and, for checkpoints on disk, the config that reproduces it). Nothing appears
    under `out_dir` unless the whole merge succeeds."""
    options = core_options(plan, models)
    with output_writer(plan, models, out_dir, overwrite, progress, resume) as output:
        for record in write_shards(plan, models, options, output.shards, output.folder):
            output.collect(record)
        log_routes()
    return Path(os.path.abspath(out_dir))


@dataclass(frozen=True)
class Output:
    """What an executor needs of the output being written (`output_writer`)."""

    shards: list[PlannedShard]  # still to write, in order
    folder: Path  # the temporary folder they go into
    collect: Callable[[ShardRecord], None]  # takes in a shard once its file is whole


@contextlib.contextmanager
def output_writer(
    plan: MergePlan,
    models: ModelSet,
    out_dir: str | os.PathLike[str],
    overwrite: bool,
    progress: bool | Progress,
    resume: bool,
) -> Iterator[Output]:
    """A merge into a folder, opened (taking over an interrupted one's shards with `resume`):
    the shards still to write, laid out from the plan, their folder, and the function that
    takes in each shard written there (journal, progress). Once every shard is in, the side
    outputs are written and the folder is published. Every executor writes through this."""
    metadata = {"isofast_method": plan.spec.name, "isofast_alpha": repr(plan.request.alpha)}
    with (
        ProgressBar(plan.input_bytes, len(plan.tensors), disable=progress is not True) as bar,
        CheckpointWriter(
            out_dir,
            plan.request.max_shard_bytes,
            metadata,
            overwrite=overwrite,
            fingerprint=resume_key(plan, models),
            resume=resume,
        ) as writer,
    ):

        def report(names: Iterable[str]) -> None:
            for name in names:
                bar.update(name, models.nbytes[name])
                if callable(progress):
                    progress(name, models.nbytes[name])

        def collect(record: ShardRecord) -> None:
            writer.add_shard(record)
            report(e[0] for e in record.entries)

        report(t.name for t in plan.tensors if t.name in writer.resumed_names)
        shards = writer.pending(writer.plan_shards(shard_entries(write_order(plan))))
        yield Output(shards, writer.tmp_dir, collect)
        write_side_outputs(writer, plan, models)


def write_order(plan: MergePlan) -> list[TensorPlan]:
    """The tensors in the order they are written: the batches'."""
    return [t for b in plan.batches for t in b.tensors]


def write_shards(
    plan: MergePlan,
    models: ModelSet,
    options: core.MergeOptions,
    shards: Sequence[PlannedShard],
    folder: str | os.PathLike[str],
    on_tensor: Callable[[str], None] | None = None,
) -> Iterator[ShardRecord]:
    """Merge the tensors of `shards` and write each shard file into `folder` (the output's
    temporary folder), in order; yields each shard's journal line once its file is whole, and
    calls `on_tensor` with each tensor handed to the file. Every executor writes its shards
    so: the same bytes wherever they are written."""
    shard_of = {name: shard for shard in shards for name in shard.names}
    phases = {name: phase for shard in shards for name, phase in shard.page_phases().items()}
    current: PlannedShardWriter | None = None

    def written() -> None:
        if current is not None:
            current.wait_written()

    try:
        for name, out, dtype in _stream(plan.only(shard_of), models, options, phases, written):
            if current is not None and current.planned is not shard_of[name]:
                record, current = current.close(), None
                yield record
            if current is None:
                current = PlannedShardWriter(folder, shard_of[name])
            current.add(name, arrays.storage_bits(out), safetensors_name(dtype))
            if on_tensor is not None:
                on_tensor(name)
        if current is not None:
            record, current = current.close(), None
            yield record
    finally:
        if current is not None:  # failed or interrupted: no half-written shard stays
            current.discard()


def write_side_outputs(writer: CheckpointWriter, plan: MergePlan, models: ModelSet) -> None:
    """Everything of the output but the tensors: the base's side files (config, tokenizer),
    those the merge edits, the model card and the config that reproduces the merge."""
    request = plan.request
    for name, text in models.edited_side_files().items():  # before the base's: they win
        writer.write_text(name, text)
    if models.side_file_folder is not None:
        writer.copy_side_files(models.side_file_folder)
    writer.write_text("README.md", model_card(request, plan.params))
    if request.on_disk:
        writer.write_text(CONFIG_NAME, yaml.safe_dump(request.to_config(), sort_keys=False))
    else:
        log.info("in-memory models: no %s is written (it could not reproduce them)", CONFIG_NAME)


def shard_entries(tensors: Iterable[TensorPlan]) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """What the writer lays shards out from: each tensor's name, safetensors dtype and shape."""
    return ((t.name, safetensors_name(t.out_dtype), t.shape) for t in tensors)


def resume_key(plan: MergePlan, models: ModelSet) -> str | None:
    """What an interrupted merge must share with this one for its shards to be reused: every
    setting that changes the output bits (not the thread count: results do not depend on it),
    the isofast version and the identity of every input file. None for models in memory."""
    files = models.input_files()
    if files is None:
        return None
    config = plan.request.to_config()
    del config["threads"]
    text = json.dumps([__version__, config, files], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _stream(
    plan: MergePlan,
    models: ModelSet,
    options: core.MergeOptions,
    page_phase: dict[str, int],
    written: Callable[[], None],
) -> Iterator[tuple[str, Any, str]]:
    """Merged tensors in plan order. Two batches are queued ahead on the worker, so the merge
    never waits for the writer to finish a large tensor before starting on small ones."""
    batches = plan.batches
    # When a wrap wastes the end of the ring, an output gets its own array.
    ring = OutputRing(plan.ring_bytes)

    def prefetch(i: int) -> None:
        if i < len(batches):
            for t in batches[i].tensors:
                models.prefetch(t.name)

    def run(i: int) -> Outputs:
        batch = batches[i]
        if batch.tensors[0].copy:
            return [models.base.view(batch.tensors[0].name)], []
        placed = [
            ring.empty(t.shape, t.out_dtype, page_phase.get(t.name, 0)) for t in batch.tensors
        ]
        merge_batch(plan, models, batch, [out for out, _ in placed], options)
        return [out for out, _ in placed], [token for _, token in placed]

    for i in range(3):
        prefetch(i)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="isofast-merge") as pool:
        pending = deque(pool.submit(run, i) for i in range(min(2, len(batches))))
        written_tokens: list[RingToken] = []
        for i, batch in enumerate(batches):
            outs, tokens = pending.popleft().result()
            written()  # the previous batch's memory is no longer read by the writer
            for token in written_tokens:
                ring.release(token)
            written_tokens = tokens
            if i + 2 < len(batches):
                pending.append(pool.submit(run, i + 2))
            prefetch(i + 3)  # read-ahead hints (this thread would only wait otherwise)
            for t, out in zip(batch.tensors, outs, strict=True):
                yield t.name, out, t.out_dtype
