"""Merging PEFT LoRA adapters without forming their dense updates.

`merge_adapters` merges T adapters of one base model with any isofast method, into a LoRA
adapter (exact rank or truncated) or into a full model; `plan_adapters` checks such a merge
from configs and headers alone. Modules, one job each: `peft_format` (one adapter: reading
and refusals), `adapter_set` (the adapters and base together), `factored` (Iso-C, Iso-CTS,
TSV-M on the QR cores), `dense` (elementwise methods, one module at a time), `plan`,
`updates` (each module's merged update), `outputs` (an adapter or a model, in memory or a
folder), `writer` (a PEFT adapter folder), `card`, and `merge` (the entry points).
"""

from isofast.adapters.merge import (
    merge_adapters,
    plan_adapters,
    plan_of_adapters,
    run_adapter_merge,
)
from isofast.adapters.outputs import AdapterResult
from isofast.adapters.plan import AdapterPlan, format_adapter_plan

__all__ = [
    "AdapterPlan",
    "AdapterResult",
    "format_adapter_plan",
    "merge_adapters",
    "plan_adapters",
    "plan_of_adapters",
    "run_adapter_merge",
]
