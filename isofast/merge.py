"""In-memory merging: validate the models, plan each tensor's treatment, and run the compiled
core batch by batch, writing into freshly allocated outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from isofast import arrays
from isofast._native import core
from isofast.batching import make_batches
from isofast.errors import MergeInputError
from isofast.merge_plan import (
    TensorPlan,
    check_alpha,
    check_models,
    core_options,
    plan_tensors,
)
from isofast.methods import get_method
from isofast.ties_global import CoreItem, global_ties_options

# Memory the in-memory merge may spend on matrices merged side by side.
IN_MEMORY_BATCH_BUDGET = 2 * 2**30


def merge(
    base: Mapping[str, Any],
    finetuned: Sequence[Mapping[str, Any]],
    method: str = "iso_cts",
    alpha: float = 1.0,
    *,
    compute_dtype: str = "float32",
    out_dtype: str | None = None,
    exclude: Sequence[str] = ("text_projection",),
    seed: int = 0,
    threads: int | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Merge fine-tuned state dicts into one: theta = theta0 + alpha * M(theta_t - theta0).

    `base` and each of `finetuned` map tensor names to torch tensors or numpy arrays (all of
    one kind). Returns a new dict of the same kind. Integer/bool tensors are copied from the
    base; float tensors are read in their own dtype (bf16/fp16/fp32/fp64) and merged in
    `compute_dtype`; outputs keep the base dtype unless `out_dtype` is given. See
    `isofast.methods()` for every method's parameters.
    """
    spec = get_method(method)
    method_params = spec.make_params(params)
    alpha = check_alpha(alpha)
    if out_dtype is not None and out_dtype not in arrays.FLOAT_DTYPES:
        raise MergeInputError(f"out_dtype must be one of {arrays.FLOAT_DTYPES}, got {out_dtype!r}")
    options = core_options(method_params, compute_dtype, seed, threads)

    names = list(base)
    shapes = {n: arrays.shape_of(base[n]) for n in names}
    dtypes = {n: arrays.dtype_name(base[n]) for n in names}
    labels = [f"fine-tuned model {i}" for i in range(len(finetuned))]
    check_models(
        names,
        shapes,
        dtypes,
        [
            (
                list(m),
                {n: arrays.shape_of(m[n]) for n in m},
                {n: arrays.dtype_name(m[n]) for n in m},
            )
            for m in finetuned
        ],
        labels,
    )
    plans = plan_tensors(spec, names, shapes, dtypes, exclude, out_dtype)

    def core_item(plan: TensorPlan, out: Any) -> CoreItem:
        return (
            plan.name,
            arrays.core_arg(base[plan.name]),
            [arrays.core_arg(m[plan.name]) for m in finetuned],
            None if out is None else arrays.core_arg(out),
            plan.matrix,
        )

    float_plans = [p for p in plans if not p.copy]
    if spec.uses_global_ties(method_params):
        total = sum(arrays.numel(base[p.name]) for p in float_plans)
        density = getattr(method_params, "density", 1.0)
        options = global_ties_options(
            lambda: ([core_item(p, None)] for p in float_plans),
            len(finetuned),
            total,
            density,
            options,
        )

    merged: dict[str, Any] = {p.name: arrays.copy_of(base[p.name]) for p in plans if p.copy}
    compute_bytes = 8 if options["compute64"] else 4
    for batch, width in make_batches(
        float_plans,
        shapes,
        len(finetuned),
        compute_bytes,
        options["threads"],
        IN_MEMORY_BATCH_BUDGET,
    ):
        outs = [arrays.empty_like(base[p.name], p.out_dtype) for p in batch]
        items = [core_item(p, o) for p, o in zip(batch, outs, strict=True)]
        core.merge_items(spec.kernel, items, alpha, {**options, "item_threads": width})
        merged.update((p.name, o) for p, o in zip(batch, outs, strict=True))
    return {name: merged[name] for name in names}
