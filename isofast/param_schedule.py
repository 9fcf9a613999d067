"""Parameter values that vary per tensor or per model, as mergekit writes them.

A setting is one of:
- a scalar (number or bool);
- a gradient: a list of scalars, interpolated linearly over the layers (position t = layer /
  (layers - 1); t = 0 for tensors outside the layers);
- conditions: a list of ``{filter: substring, value: scalar or gradient}`` (or one such
  mapping); the first whose filter is in the tensor name (or is missing / ``"*"``) applies;
- per model: ``{"models": [setting or None, ...]}``, one setting per fine-tuned model.
A setting that matches nothing resolves to None (the parameter's default).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from isofast.errors import MergeInputError, short

Scalar = float | bool
PER_MODEL = "models"

# mergekit's layer containers: `model.layers.3.`, `transformer.h.3.`, `encoder.layer.3.`, ...
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


@functools.lru_cache(maxsize=8)
def _layer_count(names: tuple[str, ...]) -> int:
    layers = [i for i in map(layer_of, names) if i is not None]
    return max(layers) + 1 if layers else 0


def position(name: str, names: Sequence[str]) -> float:
    """mergekit's gradient position t of a tensor: layer / (layers - 1) in a model of several
    layers, 1 in a one-layer model, 0 outside the layers (embeddings, final norm, head)."""
    layer = layer_of(name)
    if layer is None:
        return 0.0
    count = _layer_count(tuple(names))
    return layer / (count - 1) if count > 1 else 1.0


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, bool))


def _is_condition(value: Any) -> bool:
    return isinstance(value, Mapping) and "value" in value


def is_per_model(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {PER_MODEL}


def varies_per_tensor(value: Any) -> bool:
    """Whether the setting can resolve differently for different tensors."""
    if is_per_model(value):
        return any(varies_per_tensor(v) for v in value[PER_MODEL])
    return not (value is None or _is_scalar(value) or isinstance(value, tuple))


def check(value: Any, what: str, leaf: Callable[[Any], None], per_model: bool) -> None:
    """Raise MergeInputError unless `value` is a valid setting whose scalars pass `leaf`."""
    if is_per_model(value):
        if not per_model:
            raise MergeInputError(f"{what}: one value for every model, not per model")
        models = value[PER_MODEL]
        if not isinstance(models, list) or not models:
            raise MergeInputError(f"{what}: 'models' must be a list with one value per model")
        for v in models:
            if v is not None:
                check(v, what, leaf, per_model=False)
        return
    if _is_scalar(value):
        leaf(value)
        return
    if isinstance(value, tuple) and per_model:  # resolved: one scalar per model
        for v in value:
            leaf(v)
        return
    items = [value] if _is_condition(value) else value
    if not isinstance(items, list) or not items:
        raise MergeInputError(
            f"{what}: expected a value, a gradient list or filter conditions, got {short(value)}"
        )
    if all(_is_scalar(v) for v in items):
        for v in items:
            leaf(v)
        return
    for cond in items:
        if not _is_condition(cond) or not set(cond) <= {"filter", "value"}:
            raise MergeInputError(
                f"{what}: a condition is {{filter: NAME_PART, value: V}}, got {short(cond)}"
            )
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise MergeInputError(f"{what}: filter must be a string, got {short(cond['filter'])}")
        inner = cond["value"]
        if not (_is_scalar(inner) or (isinstance(inner, list) and inner)) or (
            isinstance(inner, list) and not all(_is_scalar(v) for v in inner)
        ):
            raise MergeInputError(
                f"{what}: a condition's value is a scalar or a gradient, got {short(inner)}"
            )
        check(inner, what, leaf, per_model=False)


def _gradient(values: list[Any], t: float) -> Any:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]  # discrete values are picked, not mixed
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve(value: Any, name: str, t: float) -> Any:
    """The setting's scalar for tensor `name` at position `t` (None: nothing matched); per
    model: a tuple of those."""
    if is_per_model(value):
        return tuple(resolve(v, name, t) for v in value[PER_MODEL])
    if value is None or _is_scalar(value) or isinstance(value, tuple):
        return value  # a tuple: already resolved per model
    items = [value] if _is_condition(value) else value
    if all(_is_scalar(v) for v in items):
        return _gradient(items, t)
    for cond in items:
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (name and pattern in name):
            return resolve(cond["value"], name, t)
    return None


def with_fallback(own: Any, fallback: Any) -> Any:
    """A model's own setting, falling back to `fallback` where its conditions match nothing
    (mergekit's precedence: the model's parameters, then the global ones)."""
    if own is None:
        return fallback
    if fallback is None or _is_scalar(own) or not isinstance(own, (list, Mapping)):
        return own
    items = [own] if _is_condition(own) else own
    if all(_is_scalar(v) for v in items):
        return own  # a gradient always resolves
    tail = [fallback] if _is_condition(fallback) else fallback
    if _is_scalar(fallback) or all(_is_scalar(v) for v in tail):
        tail = [{"value": fallback}]
    return [*items, *tail]


def per_model(settings: Iterable[Any]) -> Any:
    """One setting per model, collapsed to a single one when every model has the same."""
    values = list(settings)
    if values and all(v == values[0] for v in values):
        return values[0]
    return {PER_MODEL: values}


def with_model_parameters(
    shared: Mapping[str, Any], own: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """`shared` parameters with the models' own ones folded in: a name some model sets
    becomes a per-model setting (the model's value, else the shared one)."""
    names = sorted({k for o in own for k in o})
    folded = {k: per_model(with_fallback(o.get(k), shared.get(k)) for o in own) for k in names}
    return {**shared, **folded}
