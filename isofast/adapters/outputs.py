"""The result of an adapter merge: a LoRA adapter (in memory or a PEFT adapter folder) or a
full model (in memory or a checkpoint folder written by isofast's atomic writer)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from isofast import arrays
from isofast.adapters.adapter_set import AdapterSet, Module
from isofast.adapters.card import adapter_card
from isofast.adapters.factored import Factors, dense_factors, truncate
from isofast.adapters.peft_format import float_array
from isofast.adapters.plan import AdapterPlan, ModulePlan
from isofast.adapters.updates import Merger
from isofast.adapters.writer import (
    CONFIG_FILE,
    WEIGHT_FILE,
    adapter_config,
    adapter_keys,
    config_text,
    publish_folder,
    safetensors_bytes,
    to_storage,
)
from isofast.errors import MergeInputError
from isofast.io import CheckpointWriter
from isofast.io.dtypes import FLOAT_DTYPES, safetensors_name

log = logging.getLogger(__name__)

CONFIG_NAME = "isofast_config.yml"  # as beside a dense merge (isofast.pipeline)
Report = Callable[[ModulePlan], None]


@dataclass
class AdapterResult:
    """What an adapter merge produced.

    `output` is "adapter" or "model". `path` is the folder written (None for a merge into
    memory). In memory, `tensors` holds the merged adapter's state dict (PEFT's key names,
    ready for `peft.set_peft_model_state_dict`) or the merged model's tensors; it is empty
    when the result went to a folder. `config` is the adapter's `adapter_config.json`
    (output adapter). `ranks` is each module's rank as written and `truncation` the relative
    Frobenius error ||alpha M - B A||_F / ||alpha M||_F of that rank (0 when exact).
    """

    output: str
    path: Path | None = None
    tensors: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    ranks: dict[str, int] = field(default_factory=dict)
    truncation: dict[str, float] = field(default_factory=dict)


def _adapter_dtype(plan: AdapterPlan, adapter_set: AdapterSet) -> str:
    """out_dtype, else the adapters' common factor dtype (float32 when they differ)."""
    if plan.request.out_dtype:
        return plan.request.out_dtype
    dtypes = {m.dtype for a in adapter_set.adapters for m in a.modules.values()}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _peft_factors(module: Module, factors: Factors) -> tuple[np.ndarray, np.ndarray]:
    """(B, A) as PEFT stores them; a zero update keeps one zero direction (PEFT needs r >= 1)."""
    if factors.rank == 0:
        rows, cols = module.shape
        factors = Factors(np.zeros((rows, 1)), np.zeros((1, cols)))
    if module.transposed:  # the weight is (in, out): B A is M^T
        return factors.right.T, factors.left.T
    return factors.left, factors.right


def to_adapter(
    plan: AdapterPlan,
    adapter_set: AdapterSet,
    merger: Merger,
    out: str | os.PathLike[str] | None,
    overwrite: bool,
    report: Report,
) -> AdapterResult:
    request, alpha = plan.request, plan.request.alpha
    dtype = _adapter_dtype(plan, adapter_set)
    result = AdapterResult("adapter")
    tensors: list[tuple[str, np.ndarray, str]] = []
    for m in plan.modules:
        update = merger.update(m)
        if isinstance(update, np.ndarray):
            factors, error = dense_factors(alpha * update, request.max_rank, plan.tol)
        else:
            factors, error = update.scaled(alpha), 0.0
            if request.max_rank is not None and factors.rank > request.max_rank:
                factors, error = truncate(factors, request.max_rank, plan.tol)
        if error > 0:
            log.info(
                "%s: rank %d, relative truncation error %.3g", m.module.name, factors.rank, error
            )
        result.ranks[m.module.name] = max(factors.rank, 1)
        result.truncation[m.module.name] = error
        b, a = _peft_factors(m.module, factors)
        a_key, b_key = adapter_keys(m.module.name)
        for key, x in ((a_key, a), (b_key, b)):
            tensors.append((key, *to_storage(x, dtype)))
        report(m)
    base_name = adapter_set.base_model_name or (
        request.base if isinstance(request.base, str) else None
    )
    result.config = adapter_config(
        result.ranks,
        base_model=base_name,
        task_type=adapter_set.task_type,
        fan_in_fan_out=adapter_set.fan_in_fan_out,
    )
    if out is None:
        kind = _result_kind(None)
        result.tensors = {k: arrays.copy_as(_stored(x, st), kind) for k, x, st in tensors}
        return result
    files: dict[str, Any] = {
        WEIGHT_FILE: safetensors_bytes(tensors, {"isofast_method": plan.spec.name}),
        CONFIG_FILE: config_text(result.config),
        "README.md": adapter_card(plan, base_name, result.ranks, result.truncation),
    }
    if request.on_disk:
        files[CONFIG_NAME] = yaml.safe_dump(request.to_config(), sort_keys=False)
    result.path = publish_folder(out, files, overwrite)
    return result


def to_model(
    plan: AdapterPlan,
    adapter_set: AdapterSet,
    merger: Merger,
    out: str | os.PathLike[str] | None,
    overwrite: bool,
    report: Report,
) -> AdapterResult:
    request, base = plan.request, adapter_set.base
    if base is None:
        raise MergeInputError("output: model needs base_model")
    compute = np.float64 if request.compute_dtype == "float64" else np.float32
    by_weight = {m.module.weight: m for m in plan.modules}

    def merged() -> Iterator[tuple[str, Any, str]]:
        """(name, tensor as stored, dtype name) of every base tensor, in the base's order."""
        for name, (_, dtype) in base.meta.items():
            m = by_weight.get(name)
            out_dtype = request.out_dtype or dtype
            if m is None and (dtype == out_dtype or dtype not in FLOAT_DTYPES):
                yield name, base.view(name), dtype  # copied as stored
                continue
            # A copy: the view may be a read-only mapping or the caller's own tensor.
            weight = np.array(float_array(base.view(name), compute), copy=True)
            if m is not None:
                update = merger.update(m)
                if isinstance(update, Factors):
                    weight += update.scaled(request.alpha).dense(compute)
                else:
                    weight += compute(request.alpha) * update
                report(m)
            yield name, _stored(*to_storage(weight, out_dtype)), out_dtype

    result = AdapterResult("model", ranks={m.module.name: m.stacked_rank for m in plan.modules})
    if out is None:
        kind = _result_kind(request.base)
        result.tensors = {name: arrays.copy_as(x, kind) for name, x, _ in merged()}
        return result
    metadata = {"isofast_method": plan.spec.name, "isofast_alpha": repr(request.alpha)}
    with CheckpointWriter(out, request.max_shard_bytes, metadata, overwrite=overwrite) as writer:
        for name, x, dtype in merged():
            writer.add(name, arrays.storage_bits(x), safetensors_name(dtype))
            writer.wait_written()  # x is freed next: its bytes must be on their way
        if base.side_file_folder is not None:
            writer.copy_side_files(base.side_file_folder)
        writer.write_text("README.md", adapter_card(plan, adapter_set.base_model_name, {}, {}))
        if request.on_disk:
            writer.write_text(CONFIG_NAME, yaml.safe_dump(request.to_config(), sort_keys=False))
    result.path = Path(os.path.abspath(out))
    return result


def _stored(x: np.ndarray, safetensors_dtype: str) -> Any:
    """Bytes from `to_storage` as an array isofast.arrays knows (bfloat16 bits tagged)."""
    return arrays.Bf16Array(x) if safetensors_dtype == "BF16" else x


def _result_kind(base: Any) -> str:
    """torch or numpy: the base's kind in memory; otherwise torch when installed."""
    if isinstance(base, Mapping) and base:
        return arrays.result_kind(next(iter(base.values())))
    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  (arrays finds it in sys.modules)

        return "torch"
    return "numpy"
