"""The README.md model card written beside a merged adapter or a model merged from adapters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import yaml

from isofast.adapters.plan import AdapterPlan


def _name(source: object) -> str:
    return source if isinstance(source, str) else "(in memory)"


def adapter_card(
    plan: AdapterPlan,
    base_name: str | None,
    ranks: Mapping[str, int],
    truncation: Mapping[str, float],
) -> str:
    request = plan.request
    adapter_out = plan.output == "adapter"
    front = {
        "base_model": base_name or (_name(request.base) if request.has_base else None),
        "tags": ["merge", "isofast", "lora", "peft"],
        "library_name": "peft" if adapter_out else "transformers",
        "merge_method": plan.spec.name,
        "merge_parameters": {
            "alpha": request.alpha,
            **dataclasses.asdict(plan.params),
            "output": plan.output,
            "max_rank": request.max_rank,
        },
    }
    adapters = "\n".join(f"- `{_name(a)}`" for a in request.adapters)
    what = "LoRA adapter" if adapter_out else "model (base + merged LoRA update)"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# Merged {what}",
        "",
        f"Merged with isofast using **{plan.spec.pretty_name}** ([paper]({plan.spec.reference})) "
        f"on the factored LoRA updates, alpha = {request.alpha}, compute dtype "
        f"{request.compute_dtype}.",
        "",
        f"Adapters:\n{adapters}",
        "",
    ]
    if adapter_out:
        worst = max(truncation.values(), default=0.0)
        cap = f"at most {request.max_rank}" if request.max_rank else "exact"
        lines += [
            f"Rank per module: {cap} (largest relative truncation error {worst:.3g}). B A is "
            f"alpha * M exactly up to that error: every module has scaling lora_alpha / r = 1.",
            "",
            "| module | rank | relative truncation error |",
            "| --- | --- | --- |",
            *[f"| {m} | {ranks[m]} | {truncation.get(m, 0.0):.3g} |" for m in ranks],
            "",
        ]
    lines.append(
        "The exact configuration is in `isofast_config.yml`; `isofast merge isofast_config.yml "
        "OUT` reproduces this merge."
        if request.on_disk
        else "The adapters were merged from memory."
    )
    return "\n".join(lines) + "\n"
