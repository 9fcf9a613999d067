"""The README.md model card and the exact merge config written beside every merged model."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import yaml

from isofast.methods import Params, get_method

if TYPE_CHECKING:
    from isofast.pipeline import MergeRequest


def request_dict(request: MergeRequest) -> dict[str, Any]:
    """The config that reproduces this merge (the YAML schema `isofast merge` reads)."""
    out: dict[str, Any] = {
        "base_model": request.base,
        "models": list(request.models),
        "method": request.method,
        "alpha": request.alpha,
        "parameters": dict(request.params or {}),
        "dtype": request.compute_dtype,
        "out_dtype": request.out_dtype,
        "exclude": list(request.exclude),
        "seed": request.seed,
        "threads": request.threads,
        "out_shard_size": request.max_shard_bytes,
        "device": request.device,
    }
    return out


def merge_config_yaml(request: MergeRequest) -> str:
    return str(yaml.safe_dump(request_dict(request), sort_keys=False))


def model_card(request: MergeRequest, method: str, params: Params) -> str:
    spec = get_method(method)
    front = {
        "base_model": [request.base, *request.models],
        "tags": ["merge", "isofast"],
        "library_name": "isofast",
        "merge_method": spec.name,
        "merge_parameters": {"alpha": request.alpha, **dataclasses.asdict(params)},
    }
    models = "\n".join(f"- `{m}`" for m in request.models)
    return (
        "---\n"
        + str(yaml.safe_dump(front, sort_keys=False))
        + "---\n\n"
        + f"# Merged model\n\nMerged with isofast using **{spec.pretty_name}** "
        + f"([paper]({spec.reference})), alpha = {request.alpha}, "
        + f"compute dtype {request.compute_dtype}.\n\n"
        + f"Base model: `{request.base}`\n\nFine-tuned models:\n{models}\n\n"
        + "The exact configuration is in `isofast_config.yml`; `isofast merge isofast_config.yml "
        + "OUT` reproduces this merge.\n"
    )
