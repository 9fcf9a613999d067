"""The README.md model card written beside every merged model."""

from __future__ import annotations

import dataclasses

import yaml

from isofast.methods import Params, get_method
from isofast.request import MergeRequest


def _name(source: object) -> str:
    return source if isinstance(source, str) else "(in memory)"


def model_card(request: MergeRequest, params: Params) -> str:
    spec = get_method(request.method)
    front = {
        "base_model": [_name(m) for m in (request.base, *request.models)],
        "tags": ["merge", "isofast"],
        "library_name": "isofast",
        "merge_method": spec.name,
        "merge_parameters": {"alpha": request.alpha, **dataclasses.asdict(params)},
    }
    models = "\n".join(f"- `{_name(m)}`" for m in request.models)
    reproduce = (
        "The exact configuration is in `isofast_config.yml`; `isofast merge isofast_config.yml "
        "OUT` reproduces this merge.\n"
        if request.on_disk
        else "The models were merged from memory.\n"
    )
    return (
        "---\n"
        + str(yaml.safe_dump(front, sort_keys=False))
        + "---\n\n"
        + f"# Merged model\n\nMerged with isofast using **{spec.pretty_name}** "
        + f"([paper]({spec.reference})), alpha = {request.alpha}, "
        + f"compute dtype {request.compute_dtype}.\n\n"
        + f"Base model: `{_name(request.base)}`\n\nFine-tuned models:\n{models}\n\n"
        + reproduce
    )
