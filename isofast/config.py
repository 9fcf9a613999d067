"""Merge configs: isofast's own YAML schema, and mergekit configs for the methods both share."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from isofast.errors import MergeInputError
from isofast.pipeline import MergeRequest

_OWN_KEYS = {
    "base_model",
    "models",
    "method",
    "alpha",
    "parameters",
    "dtype",
    "out_dtype",
    "exclude",
    "seed",
    "threads",
    "out_shard_size",
    "allow_pickle",
    "device",
}
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(value: str | int) -> int:
    """'5GB', '500MiB', 1000000 -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise MergeInputError(f"cannot read size {value!r} (examples: 5GB, 500MiB, 1000000)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])


def load_config(path: str | Path) -> MergeRequest:
    """Read a YAML config (isofast's schema or mergekit's) into a MergeRequest."""
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MergeInputError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise MergeInputError(f"{path}: expected a mapping at the top level")
    request = from_mergekit(data, path) if "merge_method" in data else from_isofast(data, path)
    return _resolve_paths(request, path.parent)


def _resolve_paths(request: MergeRequest, root: Path) -> MergeRequest:
    """Relative model paths are relative to the config file's folder."""

    def fix(p: str) -> str:
        return p if Path(p).is_absolute() else str((root / p).resolve())

    from dataclasses import replace

    return replace(request, base=fix(request.base), models=tuple(fix(m) for m in request.models))


def _model_path(entry: Any, where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and isinstance(entry.get("model"), str):
        return str(entry["model"])
    raise MergeInputError(f"{where}: each model must be a path or {{model: path}}, got {entry!r}")


def from_isofast(data: Mapping[str, Any], path: Path) -> MergeRequest:
    unknown = sorted(set(data) - _OWN_KEYS)
    if unknown:
        raise MergeInputError(
            f"{path}: unknown config key(s) {unknown}; known: {sorted(_OWN_KEYS)}"
        )
    for key in ("base_model", "models"):
        if key not in data:
            raise MergeInputError(f"{path}: missing required key '{key}'")
    models = data["models"]
    if not isinstance(models, list) or not models:
        raise MergeInputError(f"{path}: 'models' must be a non-empty list")
    return MergeRequest(
        base=_model_path(data["base_model"], f"{path}: base_model"),
        models=tuple(_model_path(m, f"{path}: models") for m in models),
        method=str(data.get("method", "iso_cts")),
        alpha=data.get("alpha", 1.0),
        params=dict(data.get("parameters") or {}),
        compute_dtype=str(data.get("dtype", "float32")),
        out_dtype=data.get("out_dtype"),
        exclude=tuple(data.get("exclude", ("text_projection",))),
        seed=int(data.get("seed", 0)),
        threads=data.get("threads"),
        max_shard_bytes=parse_size(data.get("out_shard_size", 5 * 2**30)),
        allow_pickle=bool(data.get("allow_pickle", False)),
        device=str(data.get("device", "cpu")),
    )


# mergekit method -> isofast method. Differences in semantics are listed in docs/MERGEKIT.md.
_MERGEKIT_METHODS = {
    "linear": "weight_average",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
}
_MERGEKIT_DTYPES = {
    "float64": "float64",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
}


def _same(values: list[Any], what: str, path: Path) -> Any:
    distinct = {repr(v) for v in values}
    if len(distinct) > 1:
        raise MergeInputError(
            f"{path}: per-model '{what}' values differ ({sorted(distinct)}); isofast applies one "
            f"value to every model"
        )
    return values[0]


def from_mergekit(data: Mapping[str, Any], path: Path) -> MergeRequest:
    method = str(data["merge_method"])
    if method not in _MERGEKIT_METHODS:
        raise MergeInputError(
            f"{path}: mergekit method {method!r} is not supported; supported: "
            f"{sorted(_MERGEKIT_METHODS)} (or use isofast's own schema for iso_c, iso_cts, ...)"
        )
    entries = data.get("models") or []
    if "base_model" in data:
        base = _model_path(data["base_model"], f"{path}: base_model")
    elif method == "linear" and entries:
        # The mean of the models does not depend on the base: the first model serves as theta0
        # and stays among the averaged ones.
        base = _model_path(entries[0], f"{path}: models")
    else:
        raise MergeInputError(
            f"{path}: isofast needs 'base_model' (task vectors are taken from it)"
        )
    if "base_model" in data:  # a base listed among the models adds nothing to average over
        entries = [e for e in entries if _model_path(e, f"{path}: models") != base]
    if not entries:
        raise MergeInputError(f"{path}: no fine-tuned models besides the base model")
    globals_ = dict(data.get("parameters") or {})

    def param(entry: Any, name: str, default: Any) -> Any:
        own = entry.get("parameters", {}) if isinstance(entry, Mapping) else {}
        value = own.get(name, globals_.get(name, default))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise MergeInputError(
                f"{path}: parameter '{name}' = {value!r}: isofast takes one number per model "
                f"(gradients and filtered values are not supported)"
            )
        return value

    weight = float(_same([param(e, "weight", 1.0) for e in entries], "weight", path))
    density = float(_same([param(e, "density", 1.0) for e in entries], "density", path))
    # mergekit's defaults: normalize is on for ties and linear only.
    normalize = bool(globals_.get("normalize", method in ("ties", "linear")))
    params: dict[str, Any] = {}
    alpha = weight
    if method == "linear":
        if not normalize:
            raise MergeInputError(
                f"{path}: linear with normalize: false (sum of weighted models, no base) is "
                f"not supported; use normalize: true or task_arithmetic"
            )
        # Without base_model the first model is theta0 and stays among the averaged ones.
        alpha = 1.0
    elif method == "ties":
        params = {"density": density, "trim": "tensor", "merge": "mean" if normalize else "sum"}
        alpha = 1.0 if normalize else weight
    elif method == "dare_ties":
        params = {
            "drop_rate": 1.0 - density,
            "density": 1.0,
            "trim": "tensor",
            "merge": "mean" if normalize else "sum",
        }
        alpha = 1.0 if normalize else weight
    elif method == "dare_linear":
        params = {"drop_rate": 1.0 - density}
        # normalize divides by the sum of the (equal) weights: the mean of the task vectors.
        alpha = 1.0 / len(entries) if normalize else weight
    elif method == "task_arithmetic" and normalize:
        alpha = 1.0 / len(entries)
    # mergekit: `dtype` is the compute dtype and `out_dtype` the one written (default: dtype).
    # isofast computes in float32 (float64 when asked), never in 16-bit.
    dtype = data.get("out_dtype") or data.get("dtype")
    compute = "float64" if str(data.get("dtype")) in ("float64", "fp64") else "float32"
    return MergeRequest(
        base=base,
        models=tuple(_model_path(e, f"{path}: models") for e in entries),
        method=_MERGEKIT_METHODS[method],
        alpha=alpha,
        params=params,
        out_dtype=_MERGEKIT_DTYPES.get(str(dtype)) if dtype else None,
        compute_dtype=compute,
        seed=int(data.get("seed", 0)),
    )
