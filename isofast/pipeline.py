"""Runs a merge plan: batch by batch through the compiled core (or the GPU), into tensors in
memory or streamed into a checkpoint folder that is published atomically.

A streamed merge overlaps its stages: batch k+1 is merged on a worker thread (the core releases
the GIL) while the caller's thread writes batch k, the kernel reads ahead the pages of later
batches, and outputs come from a reused ring placed at the page phase the writer needs to send
them to disk without copying.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from isofast import __version__, arrays
from isofast._native import core
from isofast.io import CheckpointWriter
from isofast.io.dtypes import safetensors_name
from isofast.kernels import configure_tensor, kernel_options
from isofast.model_card import model_card
from isofast.models import ModelSet
from isofast.output_ring import OutputRing, RingToken
from isofast.planner import Batch, MergePlan
from isofast.progress import ProgressBar
from isofast.ties_global import global_ties_options

log = logging.getLogger(__name__)

CONFIG_NAME = "isofast_config.yml"

Progress = Callable[[str, int], None]  # (tensor name, bytes read for it)

# Merged arrays of one batch, and the tokens that give their memory back to the ring.
Outputs = tuple[list[Any], list[RingToken]]


def core_options(plan: MergePlan, models: ModelSet) -> core.MergeOptions:
    """The kernel's options, completed by the whole-model passes a method needs (global TIES
    thresholds and majority sign, from one streamed pass over the inputs each)."""
    options = kernel_options(plan.spec, plan.params, plan.request, plan.threads, plan.request.alpha)
    core.take_route_counts()  # start counting afresh for this merge
    # Pages of mapped inputs may be dropped once converted; never those of arrays that may live
    # in anonymous memory (torch pickles, in-memory tensors).
    options.release_inputs = models.from_files
    if models.from_files:
        log.debug("input pages are dropped from memory once the core has read them")
    if plan.uses_global_ties:
        floats = [t for t in plan.tensors if not t.copy]
        with models.naming_files():
            options = global_ties_options(
                lambda: ([models.core_item(t.name, False, None)] for t in floats),
                plan.tasks,
                sum(math.prod(t.shape) for t in floats),
                getattr(plan.params, "density", 1.0),
                options,
            )
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
    request = plan.request
    options = core_options(plan, models)
    metadata = {"isofast_method": plan.spec.name, "isofast_alpha": repr(request.alpha)}
    with (
        ProgressBar(plan.input_bytes, len(plan.tensors), disable=progress is not True) as bar,
        CheckpointWriter(
            out_dir,
            request.max_shard_bytes,
            metadata,
            overwrite=overwrite,
            fingerprint=resume_key(plan, models),
            resume=resume,
        ) as writer,
    ):

        def report(name: str) -> None:
            bar.update(name, models.nbytes[name])
            if callable(progress):
                progress(name, models.nbytes[name])

        done = writer.resumed_names
        order = [t for b in plan.batches for t in b.tensors if t.name not in done]
        phases = writer.page_phases(t.out_bytes for t in order)
        page_phase = {t.name: phase for t, phase in zip(order, phases, strict=True)}
        for name in (t.name for t in plan.tensors if t.name in done):  # resumed: already written
            report(name)
        stream = _stream(plan, models, options, page_phase, writer.wait_written, done)
        for name, out, dtype in stream:
            writer.add(name, arrays.storage_bits(out), safetensors_name(dtype))
            report(name)
        log_routes()
        for name, text in models.edited_side_files().items():  # before the base's: they win
            writer.write_text(name, text)
        if models.side_file_folder is not None:
            writer.copy_side_files(models.side_file_folder)
        writer.write_text("README.md", model_card(request, plan.params))
        if request.on_disk:
            writer.write_text(CONFIG_NAME, yaml.safe_dump(request.to_config(), sort_keys=False))
        else:
            log.info(
                "in-memory models: no %s is written (it could not reproduce them)", CONFIG_NAME
            )
    return Path(os.path.abspath(out_dir))


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
    done: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, Any, str]]:
    """Merged tensors in plan order, except those `done` already (a batch holding some of
    them is merged whole: merges are deterministic). Two batches are queued ahead on the
    worker, so the merge never waits for the writer to finish a large tensor before starting
    on small ones."""
    batches = [b for b in plan.batches if not all(t.name in done for t in b.tensors)]
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
                if t.name not in done:
                    yield t.name, out, t.out_dtype
