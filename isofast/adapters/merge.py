"""Merging LoRA adapters: `merge_adapters` and `plan_adapters` (adapters in memory or on disk,
result in memory or in a folder), and `run_adapter_merge` for a ready `MergeRequest` (what
`isofast merge CONFIG OUT` builds from a config with `adapters:`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from isofast.adapters.adapter_set import AdapterSet
from isofast.adapters.outputs import AdapterResult, to_adapter, to_model
from isofast.adapters.plan import AdapterPlan, ModulePlan, check_request, make_adapter_plan
from isofast.adapters.updates import Merger
from isofast.errors import InsufficientMemory, MergeInputError
from isofast.memory_guard import available_bytes
from isofast.planner import mib
from isofast.progress import ProgressBar
from isofast.request import MergeRequest

log = logging.getLogger(__name__)

Progress = Callable[[str, int], None]
_NOT_SETTINGS = frozenset({"base", "models", "params", "adapters", "output", "max_rank"})
_FIELDS = frozenset(MergeRequest.__dataclass_fields__) - _NOT_SETTINGS


AdapterSource = str | os.PathLike[str] | Mapping[str, Any] | Any  # Any: a peft.PeftModel


def merge_adapters(
    adapters: Sequence[AdapterSource],
    method: str = "iso_c",
    alpha: float = 1.0,
    *,
    base: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    output: str | None = None,
    max_rank: int | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool | Progress = False,
    force: bool = False,
    **settings: Any,
) -> AdapterResult:
    """Merge T LoRA adapters of one base model without forming their dense updates.

    Each adapter is a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`
    or `.bin`), a `peft.PeftModel` (its active adapter), or a mapping `{"config": <the
    adapter_config.json dict>, "weights": <its state dict>}`. Adapter t's update of a module
    is D_t = s_t B_t A_t (s_t = lora_alpha / r, or / sqrt(r) with use_rslora, per module
    through rank_pattern / alpha_pattern); a module it does not touch has D_t = 0. The method
    merges D_1 .. D_T into M exactly as `isofast.merge` would merge full checkpoints
    (docs/ALGORITHMS.md), Iso-C, Iso-CTS and TSV-M in factored form (docs/CONTRACT.md, "LoRA
    adapters").

    `output="adapter"` (the default) gives a LoRA adapter with B A = alpha * M: at its exact
    rank, or truncated to `max_rank` per module (the relative error of each module is in the
    result's `truncation`). `output="model"` gives base + alpha * M for every adapted weight
    (needs `base`; every other tensor is the base's). `base` (a checkpoint path or a state
    dict) is otherwise optional and, when given, checks the modules' names and shapes.

    With `out`, the result is written to that folder (a PEFT adapter folder, or a checkpoint
    folder as `isofast.merge` writes it), which appears only when complete; with inputs on
    disk, `isofast_config.yml` beside it reproduces the merge. Without `out`, the result is
    returned in memory. Other keywords: the settings of `isofast.merge` (compute_dtype,
    out_dtype, exclude, seed, threads, allow_pickle, max_shard_bytes) and the method's
    parameters. Everything is checked from configs and headers before any data is read.
    """
    request = adapter_request(adapters, method, alpha, base, output, max_rank, settings)
    return run_adapter_merge(request, out, overwrite=overwrite, progress=progress, force=force)


def plan_adapters(
    adapters: Sequence[AdapterSource],
    method: str = "iso_c",
    alpha: float = 1.0,
    *,
    base: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    output: str | None = None,
    max_rank: int | None = None,
    **settings: Any,
) -> AdapterPlan:
    """What `merge_adapters` with the same arguments would do, from configs and headers
    alone; raises the error the merge would raise."""
    request = adapter_request(adapters, method, alpha, base, output, max_rank, settings)
    return plan_of_adapters(request)


def plan_of_adapters(request: MergeRequest) -> AdapterPlan:
    check_request(request)
    with AdapterSet(request) as adapter_set:
        return make_adapter_plan(request, adapter_set)


def adapter_request(
    adapters: Sequence[AdapterSource],
    method: str,
    alpha: float,
    base: str | os.PathLike[str] | Mapping[str, Any] | None,
    output: str | None,
    max_rank: int | None,
    settings: Mapping[str, Any],
) -> MergeRequest:
    if isinstance(adapters, (str, os.PathLike, Mapping)) or hasattr(adapters, "peft_config"):
        raise MergeInputError("adapters must be a list of adapters; wrap a single one in a list")
    fields = {k: v for k, v in settings.items() if k in _FIELDS}
    params = {k: v for k, v in settings.items() if k not in _FIELDS}
    return MergeRequest(
        base if base is not None else {},  # type: ignore[arg-type]
        (),
        method,
        alpha,
        params,
        adapters=tuple(_from_peft(a) for a in adapters),
        output=output,
        max_rank=max_rank,
        **fields,
    )


def _from_peft(adapter: Any) -> Any:
    """A peft.PeftModel as an in-memory adapter (its active adapter); anything else as is."""
    if not hasattr(adapter, "peft_config") or isinstance(adapter, Mapping):
        return adapter
    from peft import get_peft_model_state_dict

    name = adapter.active_adapter
    name = name if isinstance(name, str) else name[0]
    config = adapter.peft_config[name].to_dict()
    return {"config": config, "weights": get_peft_model_state_dict(adapter, adapter_name=name)}


def run_adapter_merge(
    request: MergeRequest,
    out: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
    progress: bool | Progress = False,
    force: bool = False,
    resume: bool = False,
) -> AdapterResult:
    """Carry out an adapter merge request (configs and headers checked first)."""
    if resume:
        raise MergeInputError(
            "resume is not supported for adapter merges (they are quick to redo): "
            "merge again without it"
        )
    check_request(request)
    with AdapterSet(request) as adapter_set:
        plan = make_adapter_plan(request, adapter_set)
        _check_memory(plan, force)
        log.info(
            "plan: %s on %d adapters, %d modules, output %s, peak about %s",
            plan.spec.name,
            plan.tasks,
            len(plan.modules),
            plan.output,
            mib(plan.peak_bytes),
        )
        merger = Merger(plan)
        total = sum(m.work_bytes for m in plan.modules)
        with ProgressBar(total, len(plan.modules), disable=progress is not True) as bar:

            def report(m: ModulePlan) -> None:
                bar.update(m.module.name, m.work_bytes)
                if callable(progress):
                    progress(m.module.name, m.work_bytes)

            if plan.output == "adapter":
                return to_adapter(plan, adapter_set, merger, out, overwrite, report)
            return to_model(plan, adapter_set, merger, out, overwrite, report)


def _check_memory(plan: AdapterPlan, force: bool) -> None:
    available = available_bytes()
    if available is None or plan.peak_bytes <= available or force:
        return
    raise InsufficientMemory(
        f"this adapter merge needs about {mib(plan.peak_bytes)} of memory (plan estimate) and "
        f"{mib(available)} is available; --force (force=True) tries anyway"
    )
