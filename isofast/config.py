"""Merge configs: isofast's own YAML schema (the settings of `isofast.request`), and mergekit
configs (docs/MERGEKIT.md): mergekit's methods and rules, per-model parameters, gradients and
filters, onto isofast's `gta` method."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from isofast import param_schedule as sched
from isofast import slices
from isofast.errors import MergeInputError, MergeWarning, short
from isofast.io.dtypes import parse_float_dtype
from isofast.methods import get_method
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


# mergekit's generalized task arithmetic methods -> (sparsify, elect, default normalize,
# default rescale) of isofast's `gta` method, which follows mergekit's rules (docs/MERGEKIT.md).
_GTA = {
    "task_arithmetic": ("none", "none", False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", "none", False, True),
    "breadcrumbs": ("magnitude_outliers", "none", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", "none", False, True),
}
# mergekit's interpolating methods (and sce), onto isofast's methods of the same name: their
# shared parameters (mergekit's defaults; None: required).
_INTERPOLATING: dict[str, dict[str, Any]] = {
    "slerp": {"t": None},
    "model_stock": {"filter_wise": False},
    "nuslerp": {"nuslerp_row_wise": False, "nuslerp_flatten": True},
    "multislerp": {"normalize_weights": True, "eps": 1e-8},
    "karcher": {"max_iter": 10, "tol": 1e-5},
    "sce": {"select_topk": 1.0},
}
# Their per-model parameters (required by mergekit for every model besides the base).
_INTERPOLATING_PER_MODEL: dict[str, tuple[str, ...]] = {
    "nuslerp": ("weight",),
    "multislerp": ("weight",),
}
_MERGEKIT_METHODS = ("linear", *_GTA, *_INTERPOLATING)
# Parameters per method family: per model, and shared (one value, maybe scheduled).
_PER_MODEL = ("weight", "density", "gamma")
_SHARED = ("normalize", "rescale", "lambda")
_IGNORED = ("int8_mask",)  # changes only the dtype of a mask, never the result
# Top-level keys that change nothing isofast writes, or that it refuses (with why).
_REFUSED_KEYS = {
    "modules": "modules are not supported yet",
    "tokenizer": "tokenizer settings are not supported (the base model's tokenizer is copied)",
}


def from_mergekit(data: Mapping[str, Any], path: Path, root: Path) -> dict[str, Any]:
    method = data["merge_method"]
    if not isinstance(method, str):
        raise MergeInputError(f"{path}: merge_method must be a name, got {short(method)}")
    if method == "passthrough" or data.get("slices"):  # layer slices (isofast/slices.py)
        return slices.mergekit_fields(data, str(path), lambda m, w: model_path(m, w, root))
    if method not in _MERGEKIT_METHODS:
        raise MergeInputError(
            f"{path}: mergekit method {method!r} is not supported; supported: "
            f"{sorted(_MERGEKIT_METHODS)} (or use isofast's own schema for iso_c, iso_cts, ...)"
        )
    for key, why in _REFUSED_KEYS.items():
        if data.get(key):
            raise MergeInputError(f"{path}: {why}")
    if data.get("tokenizer_source") not in (None, "base"):
        raise MergeInputError(
            f"{path}: tokenizer_source {short(data['tokenizer_source'])} is not supported; "
            f"isofast copies the base model's tokenizer (tokenizer_source: base)"
        )
    entries = data.get("models") or []
    if not isinstance(entries, list):
        raise MergeInputError(f"{path}: 'models' must be a list, got {short(entries)}")
    globals_ = data.get("parameters") or {}
    if not isinstance(globals_, Mapping):
        raise MergeInputError(f"{path}: 'parameters' must be a mapping, got {short(globals_)}")
    where = f"{path}: models"
    own = [_own_parameters(e, path) for e in entries]
    if method == "linear":
        fields = _linear(data, entries, own, globals_, path, root)
    elif method in _INTERPOLATING:
        fields = _interpolating(method, data, entries, own, globals_, path, root)
    else:
        if "base_model" not in data:
            raise MergeInputError(
                f"{path}: isofast needs 'base_model' (task vectors are taken from it)"
            )
        base = model_path(data["base_model"], f"{path}: base_model", root)
        # A base listed among the models adds nothing (mergekit merges the others).
        kept = [i for i, e in enumerate(entries) if model_path(e, where, root) != base]
        sparsify, elect, normalize, rescale = _GTA[method]
        # density is taken (and unused) without sparsification, gamma by breadcrumbs only,
        # epsilon by della only.
        per_model: tuple[str, ...] = _PER_MODEL[:2]
        if sparsify == "magnitude_outliers":
            per_model = (*per_model, "gamma")
        elif sparsify == "della_magprune":
            per_model = (*per_model, "epsilon")
        used = per_model if sparsify != "none" else ("weight",)
        params: dict[str, Any] = {"sparsify": sparsify, "elect": elect}
        for name in used:
            params[name] = sched.per_model(
                sched.with_fallback(own[i].get(name), globals_.get(name)) for i in kept
            )
        params["normalize"] = globals_.get("normalize", normalize)
        params["rescale"] = globals_.get("rescale", rescale)
        params["lam"] = globals_.get("lambda", 1.0)
        fields = {
            "base": base,
            "models": tuple(model_path(entries[i], where, root) for i in kept),
            "params": _drop_defaults(params),
        }
        known = (*per_model, *_SHARED, *_IGNORED)
        _warn_unknown(globals_, [own[i] for i in kept], known, method, path)
    if not fields["models"]:
        raise MergeInputError(f"{path}: no fine-tuned models besides the base model")
    # mergekit: `dtype` is the compute dtype and `out_dtype` the one written (default: dtype).
    # isofast computes in float32 (float64 when asked), never in 16-bit.
    dtype = data.get("out_dtype") or data.get("dtype")
    compute = "float64" if data.get("dtype") in ("float64", "fp64") else "float32"
    return dict(
        fields,
        method=fields.get("method", "gta"),
        alpha=1.0,
        out_dtype=_float_dtype(dtype, path) if dtype else None,
        compute_dtype=compute,
        seed=data.get("seed", 0),
    )


def _linear(
    data: Mapping[str, Any],
    entries: list[Any],
    own: list[Mapping[str, Any]],
    globals_: Mapping[str, Any],
    path: Path,
    root: Path,
) -> dict[str, Any]:
    """mergekit's linear: sum_i w_i theta_i / sum_i w_i over the models and, when given and
    not listed, the base model (with the global weight). As base + sum_i w_i (theta_i -
    theta0) / sum_i w_i with theta0 the base, or the first model: the same result."""
    where = f"{path}: models"
    paths = [model_path(e, where, root) for e in entries]
    weights = [sched.with_fallback(o.get("weight"), globals_.get("weight")) for o in own]
    if "base_model" in data:
        base = model_path(data["base_model"], f"{path}: base_model", root)
        if base not in paths:  # mergekit adds it to the inputs
            paths.append(base)
            weights.append(globals_.get("weight"))
    elif paths:
        base = paths[0]
    else:
        raise MergeInputError(f"{path}: no models to merge")
    if any(w is None for w in weights):
        raise MergeInputError(
            f"{path}: linear needs a weight for every input (the base model included: "
            f"give 'weight' under the top-level parameters)"
        )
    normalize = globals_.get("normalize", True)
    if normalize is not True:
        raise MergeInputError(
            f"{path}: linear with normalize: {short(normalize)} (a weighted sum of models, no "
            f"base) is not supported; use normalize: true or task_arithmetic"
        )
    _warn_unknown(globals_, own, ("weight", "normalize", *_IGNORED), "linear", path)
    params = {"weight": sched.per_model(weights), "normalize": True}
    return {"base": base, "models": tuple(paths), "params": _drop_defaults(params)}


def _interpolating(
    method: str,
    data: Mapping[str, Any],
    entries: list[Any],
    own: list[Mapping[str, Any]],
    globals_: Mapping[str, Any],
    path: Path,
    root: Path,
) -> dict[str, Any]:
    """mergekit's slerp (base_model and one other model; `t`, maybe a gradient or filtered),
    model_stock (base_model and at least two others; `filter_wise`), nuslerp (base_model and
    exactly two others, a `weight` each), multislerp (base_model and one or more others, a
    `weight` each), karcher (the mean of every model, base_model included; without one the
    first model is isofast's base) and sce (base_model and one or more others;
    `select_topk`): isofast's methods of the same name, with the shared parameters from the
    top-level `parameters` and the per-model ones from each model's, else the top level's."""
    where = f"{path}: models"
    if method == "karcher" and "base_model" not in data and entries:
        base = model_path(entries[0], where, root)
    elif "base_model" not in data:
        raise MergeInputError(f"{path}: mergekit's {method} needs 'base_model'")
    else:
        base = model_path(data["base_model"], f"{path}: base_model", root)
    kept = [i for i, e in enumerate(entries) if model_path(e, where, root) != base]
    models = tuple(model_path(entries[i], where, root) for i in kept)
    if method == "slerp" and len(models) != 1:
        raise MergeInputError(
            f"{path}: slerp merges base_model with exactly one other model, got {len(models)}"
        )
    if method == "nuslerp" and len(models) != 2:
        raise MergeInputError(
            f"{path}: nuslerp merges exactly two models besides base_model, got {len(models)}"
        )
    if method == "model_stock" and len(models) < 2:
        raise MergeInputError(
            f"{path}: model_stock needs at least two models besides base_model, got {len(models)}"
        )
    if not models:
        raise MergeInputError(f"{path}: {method} needs a model besides base_model")
    params: dict[str, Any] = {}
    for name, default in _INTERPOLATING[method].items():
        value = globals_.get(name, default)
        if value is None:
            raise MergeInputError(f"{path}: mergekit's {method} needs parameter {name!r}")
        params[name] = value
    per_model = _INTERPOLATING_PER_MODEL.get(method, ())
    for name in per_model:
        values = [sched.with_fallback(own[i].get(name), globals_.get(name)) for i in kept]
        if any(v is None for v in values):
            raise MergeInputError(
                f"{path}: mergekit's {method} needs parameter {name!r} for every model"
            )
        params[name] = sched.per_model(values)
    known = (*_INTERPOLATING[method], *per_model, *_IGNORED)
    _warn_unknown(globals_, [own[i] for i in kept], known, method, path)
    return {"base": base, "models": models, "params": params, "method": method}


def _own_parameters(entry: Any, path: Path) -> Mapping[str, Any]:
    own = entry.get("parameters") if isinstance(entry, Mapping) else None
    if own is None:
        return {}
    if not isinstance(own, Mapping):
        raise MergeInputError(f"{path}: a model's 'parameters' must be a mapping")
    return own


def _drop_defaults(params: dict[str, Any]) -> dict[str, Any]:
    defaults = get_method("gta").parameters()
    return {k: v for k, v in params.items() if v is not None and v != defaults.get(k, object())}


def _warn_unknown(
    globals_: Mapping[str, Any],
    own: list[Mapping[str, Any]],
    known: tuple[str, ...],
    method: str,
    path: Path,
) -> None:
    """mergekit ignores parameters its method does not take: so does isofast, saying so."""
    unknown = sorted({str(k) for m in (globals_, *own) for k in m} - set(known))
    if unknown:
        warnings.warn(
            f"{path}: mergekit's {method} takes no parameter(s) {unknown}: ignored",
            MergeWarning,
            stacklevel=4,
        )


def _float_dtype(value: Any, path: Path) -> str:
    if not isinstance(value, str):
        raise MergeInputError(f"{path}: dtype must be a name, got {short(value)}")
    try:
        return parse_float_dtype(value, "dtype")
    except ValueError as exc:
        raise MergeInputError(f"{path}: {exc}") from None
