"""The entry points: `merge` (and `plan`) for models in memory or on disk, into memory or into
a checkpoint folder; `run` and `plan_of` for a ready `MergeRequest` (what the CLI builds)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from isofast import arrays
from isofast.errors import MergeInputError
from isofast.memory_guard import check_memory
from isofast.models import ModelSet
from isofast.pipeline import Progress, merge_in_memory, merge_to_folder
from isofast.planner import MergePlan, make_plan
from isofast.ray_executor import merge_on_ray
from isofast.request import MergeRequest, model_path

Source = str | os.PathLike[str] | Mapping[str, Any]
_FIELDS = frozenset(MergeRequest.__dataclass_fields__) - {"base", "models", "params"}


@overload
def merge(
    base: Source,
    finetuned: Sequence[Source],
    method: str = ...,
    alpha: float = ...,
    *,
    out: None = None,
    **settings: Any,
) -> dict[str, Any]: ...
@overload
def merge(
    base: Source,
    finetuned: Sequence[Source],
    method: str = ...,
    alpha: float = ...,
    *,
    out: str | os.PathLike[str],
    **settings: Any,
) -> Path: ...
def merge(
    base: Source,
    finetuned: Sequence[Source],
    method: str = MergeRequest.method,
    alpha: float = MergeRequest.alpha,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool | Progress = False,
    force: bool = False,
    resume: bool = False,
    **settings: Any,
) -> dict[str, Any] | Path:
    """Merge fine-tunes of one base model: theta = theta0 + alpha * M(theta_t - theta0).

    `base` and each of `finetuned` is a state dict in memory (a mapping of names to torch
    tensors or numpy arrays) or a checkpoint on disk (a safetensors file, a folder, a sharded
    Hugging Face folder, torch `.bin`/`.pt` files).

    Without `out`, returns a dict of merged tensors: of the base's kind for a base in memory;
    for a base on disk, torch tensors when torch is installed, else numpy arrays. With `out`, the
    merge streams into that folder (sharded safetensors, index, the base's config and tokenizer
    files, a model card and, for inputs on disk, `isofast_config.yml` that reproduces it), with
    memory flat in model size; the folder appears only when complete; returns its path.
    `overwrite` replaces an existing folder; `progress=True` shows a bar on stderr (or pass a
    function, called with each tensor's name and the bytes read for it). A merge whose
    planned peak memory exceeds what the machine has available is refused before any data is
    read (InsufficientMemory, with the ways out), unless `force`. A merge into a folder that
    is interrupted (killed, Ctrl-C) keeps its finished shards: `resume=True` with the same
    arguments reuses them and publishes bitwise what an uninterrupted merge would have.

    Settings (defaults): compute_dtype ("float32" or "float64"), out_dtype (None: each tensor
    keeps its dtype), exclude (("text_projection",): names kept out of matrix methods), seed
    (0), threads (None: every core), device ("cpu"; for state dicts on a GPU, their device),
    allow_pickle (False), max_shard_bytes ("5GiB"), executor ("local"; "ray": output
    shards written by Ray tasks, the same bytes, see isofast.ray_executor) and ray_address
    (None: a local Ray instance; "auto" or HOST:PORT: that cluster). Any other keyword is a
    parameter of the method: see `isofast.methods()`.

    `device="cuda"` (or "cuda:N") merges the 2-D keys of Iso-C, Iso-CTS and TSV-M on that GPU
    with the same method code as the CPU; everything else runs on the CPU. torch CUDA tensors
    and cupy arrays are read in place (DLPack, on the current stream) and the result comes
    back as the same kind on the same device.
    """
    request = _request(base, finetuned, method, alpha, settings)
    return run(request, out, overwrite=overwrite, progress=progress, force=force, resume=resume)


def plan(
    base: Source,
    finetuned: Sequence[Source],
    method: str = MergeRequest.method,
    alpha: float = MergeRequest.alpha,
    **settings: Any,
) -> MergePlan:
    """What `merge` with the same arguments would do, from headers alone (no tensor data is
    read): each tensor's treatment, the work batches, input and output sizes and the
    estimated peak memory (`.peak_bytes`). Raises the error the merge would raise."""
    return plan_of(_request(base, finetuned, method, alpha, settings))


def run(
    request: MergeRequest,
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool | Progress = False,
    force: bool = False,
    resume: bool = False,
) -> dict[str, Any] | Path:
    """Carry out a request (headers are opened and checked once, then data streamed). A
    request with LoRA adapters goes to isofast.adapters (its result: the folder, or the
    merged tensors / adapter state dict in memory)."""
    if request.adapters:
        from isofast.adapters import run_adapter_merge

        result = run_adapter_merge(
            request, out, overwrite=overwrite, progress=progress, force=force, resume=resume
        )
        return result.path if result.path is not None else result.tensors
    if resume and (out is None or not request.on_disk):
        raise MergeInputError(
            "resume reuses the shards of an interrupted merge into a folder: it needs out= "
            "and models given as checkpoint paths"
        )
    if request.executor == "ray" and out is None:
        raise MergeInputError("executor: ray writes its result into a folder: give out=")
    with ModelSet(request) as models:
        merge_plan = make_plan(request, models)
        check_memory(merge_plan, into_memory=out is None, force=force)
        if out is not None:
            write = merge_on_ray if request.executor == "ray" else merge_to_folder
            return write(
                merge_plan, models, out, overwrite=overwrite, progress=progress, resume=resume
            )
        return merge_in_memory(merge_plan, models, _result_kind(merge_plan))


def plan_of(request: MergeRequest) -> MergePlan:
    if request.adapters:
        raise MergeInputError(
            "an adapter merge has its own plan: isofast.plan_adapters (isofast.adapters)"
        )
    with ModelSet(request) as models:
        return make_plan(request, models)


def _request(
    base: Source, finetuned: Sequence[Source], method: str, alpha: float, settings: dict[str, Any]
) -> MergeRequest:
    if isinstance(finetuned, (str, os.PathLike, Mapping)):
        raise MergeInputError(
            "finetuned must be a list of models (paths or state dicts), got a single "
            f"{type(finetuned).__name__}; wrap it in a list"
        )
    fields = {k: v for k, v in settings.items() if k in _FIELDS}
    params = {k: v for k, v in settings.items() if k not in _FIELDS}
    if "device" not in fields and isinstance(base, Mapping) and base:
        # A state dict on a GPU merges there unless told otherwise.
        fields["device"] = arrays.device_of(next(iter(base.values())))
    # Hugging Face names are looked up (and downloaded) as a config's are.
    base = _named(base, "base model")
    finetuned = [_named(m, "fine-tuned model") for m in finetuned]
    return MergeRequest(base, tuple(finetuned), method, alpha, params, **fields)  # type: ignore[arg-type]


def _named(source: Source, what: str) -> Source:
    if isinstance(source, (str, os.PathLike)):
        return model_path(os.fspath(source), what, Path.cwd())
    return source


def _result_kind(merge_plan: MergePlan) -> str:
    """torch or numpy: the base's kind in memory; for checkpoints, torch when installed."""
    base = merge_plan.request.base
    if isinstance(base, Mapping):
        return arrays.result_kind(next(iter(base.values()), None))
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  (arrays finds it in sys.modules)

        return "torch"
    if any(t.out_dtype == "bfloat16" for t in merge_plan.tensors):
        raise MergeInputError(
            "the merged model has bfloat16 tensors, which numpy cannot hold: install torch, "
            "pass out_dtype='float32', or merge into a folder with out=..."
        )
    return "numpy"
