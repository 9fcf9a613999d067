"""Merge configs: isofast's own YAML schema (the settings of `isofast.request`), and mergekit
configs for the methods both share."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from isofast.errors import MergeInputError, short
from isofast.io.dtypes import parse_float_dtype
from isofast.request import MergeRequest, model_path
from isofast.request import config_fields as isofast_fields


def load_config(path: str | Path, **overrides: Any) -> MergeRequest:
    """Read a YAML config (isofast's schema or mergekit's) into a MergeRequest, with
    `overrides` (request fields, e.g. from command-line flags) replacing what it sets; the
    method's `params` are merged. Relative model paths are relative to the config's folder."""
    fields = config_fields(path)
    if "params" in overrides:
        overrides = {**overrides, "params": {**fields.get("params", {}), **overrides["params"]}}
    return MergeRequest.make({**fields, **overrides}, str(path))


def config_fields(path: str | Path) -> dict[str, Any]:
    """The request fields a YAML config (isofast's schema or mergekit's) sets."""
    path = Path(path)
    if not path.is_file():
        raise MergeInputError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MergeInputError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise MergeInputError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeInputError(f"{path}: not valid YAML: {exc}") from None
    except (ValueError, TypeError, IndexError, OverflowError, RecursionError) as exc:
        # PyYAML's own constructors fail like this on some values (dates, huge numbers, deep
        # nesting): still a config that is not valid YAML for us.
        raise MergeInputError(f"{path}: not valid YAML: {short(exc)}") from None
    if not isinstance(data, dict):
        raise MergeInputError(f"{path}: expected a mapping at the top level")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise MergeInputError(f"{path}: config keys must be names, got {short(bad_keys[0])}")
    root = path.resolve().parent
    if "merge_method" in data:
        return from_mergekit(data, path, root)
    return isofast_fields(data, str(path), root)


# mergekit method -> isofast method. Differences in semantics are listed in docs/MERGEKIT.md.
_MERGEKIT_METHODS = {
    "linear": "weight_average",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
}


def _same(values: list[Any], what: str, path: Path) -> Any:
    distinct = {short(v) for v in values}
    if len(distinct) > 1:
        raise MergeInputError(
            f"{path}: per-model '{what}' values differ ({sorted(distinct)}); isofast applies one "
            f"value to every model"
        )
    return values[0]


def from_mergekit(data: Mapping[str, Any], path: Path, root: Path) -> dict[str, Any]:
    method = data["merge_method"]
    if not isinstance(method, str):
        raise MergeInputError(f"{path}: merge_method must be a name, got {short(method)}")
    if method not in _MERGEKIT_METHODS:
        raise MergeInputError(
            f"{path}: mergekit method {method!r} is not supported; supported: "
            f"{sorted(_MERGEKIT_METHODS)} (or use isofast's own schema for iso_c, iso_cts, ...)"
        )
    entries = data.get("models") or []
    if not isinstance(entries, list):
        raise MergeInputError(f"{path}: 'models' must be a list, got {short(entries)}")
    if "base_model" in data:
        base = model_path(data["base_model"], f"{path}: base_model", root)
    elif method == "linear" and entries:
        # The mean of the models does not depend on the base: the first model serves as theta0
        # and stays among the averaged ones.
        base = model_path(entries[0], f"{path}: models", root)
    else:
        raise MergeInputError(
            f"{path}: isofast needs 'base_model' (task vectors are taken from it)"
        )
    if "base_model" in data:  # a base listed among the models adds nothing to average over
        entries = [e for e in entries if model_path(e, f"{path}: models", root) != base]
    if not entries:
        raise MergeInputError(f"{path}: no fine-tuned models besides the base model")
    globals_ = data.get("parameters") or {}
    if not isinstance(globals_, Mapping):
        raise MergeInputError(f"{path}: 'parameters' must be a mapping, got {short(globals_)}")

    def param(entry: Any, name: str, default: Any) -> Any:
        own = entry.get("parameters", {}) if isinstance(entry, Mapping) else {}
        if not isinstance(own, Mapping):
            raise MergeInputError(f"{path}: a model's 'parameters' must be a mapping")
        value = own.get(name, globals_.get(name, default))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise MergeInputError(
                f"{path}: parameter '{name}' = {short(value)}: isofast takes one number per "
                f"model (gradients and filtered values are not supported)"
            )
        try:
            return float(value)
        except OverflowError:
            raise MergeInputError(
                f"{path}: parameter '{name}' = {short(value)} is too large"
            ) from None

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
    compute = "float64" if data.get("dtype") in ("float64", "fp64") else "float32"
    return dict(
        base=base,
        models=tuple(model_path(e, f"{path}: models", root) for e in entries),
        method=_MERGEKIT_METHODS[method],
        alpha=alpha,
        params=params,
        out_dtype=_float_dtype(dtype, path) if dtype else None,
        compute_dtype=compute,
        seed=data.get("seed", 0),
    )


def _float_dtype(value: Any, path: Path) -> str:
    if not isinstance(value, str):
        raise MergeInputError(f"{path}: dtype must be a name, got {short(value)}")
    try:
        return parse_float_dtype(value, "dtype")
    except ValueError as exc:
        raise MergeInputError(f"{path}: {exc}") from None
