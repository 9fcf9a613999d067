"""Layer slices (mergekit's `slices:` with `merge_method: passthrough`): the output's layers are
the concatenation of layer ranges taken from several models, renumbered; every tensor outside
the layers comes from the base model. Only a mapping of names is built here: the tensors are
streamed (copied bitwise) by the usual pipeline."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from isofast.errors import MergeInputError, short
from isofast.param_schedule import _LAYER, layer_of

# One source of a slice: (model path, first layer, end layer (exclusive)).
Source = tuple[str, int, int]
Slice = tuple[Source, ...]
# The isofast method a slice merge records: over a slice's one source it is that source.
METHOD = "weight_average"


def parse(value: Any, where: str, model: Callable[[Any, str], str]) -> tuple[Slice, ...]:
    """`slices:` as a config writes it ([{sources: [{model, layer_range: [a, b]}]}]), with
    each model entry made a path by `model`; slices already parsed pass through."""
    if isinstance(value, str):  # the command line: MODEL:FIRST:END,...
        value = [_spelled(item, where) for item in value.split(",")]
    if not isinstance(value, Sequence) or not value:
        raise MergeInputError(f"{where}: slices must be a non-empty list, got {short(value)}")
    parsed = []
    for k, item in enumerate(value):
        sources = item.get("sources") if isinstance(item, Mapping) else item
        if not isinstance(sources, Sequence) or isinstance(sources, str) or not sources:
            raise MergeInputError(f"{where}: slice {k} needs a non-empty list of sources")
        if len(sources) != 1:
            raise MergeInputError(
                f"{where}: slice {k} has {len(sources)} sources; merging the sources of a slice "
                f"is not supported yet (passthrough: one source per slice)"
            )
        parsed.append(tuple(_source(s, f"{where}: slice {k}", model) for s in sources))
    return tuple(parsed)


def _spelled(item: str, where: str) -> list[dict[str, Any]]:
    model, _, span = item.strip().rpartition(":")
    model, _, first = model.rpartition(":")
    if not (model and first.isdigit() and span.isdigit()):
        raise MergeInputError(f"{where}: expected MODEL:FIRST:END, got {short(item)}")
    return [{"model": model, "layer_range": [int(first), int(span)]}]


def _source(source: Any, where: str, model: Callable[[Any, str], str]) -> Source:
    if isinstance(source, tuple) and len(source) == 3:  # already parsed
        path, first, end = source
    else:
        if not isinstance(source, Mapping) or "model" not in source:
            raise MergeInputError(f"{where}: each source needs 'model' and 'layer_range'")
        extra = sorted(str(k) for k in source if k not in ("model", "layer_range"))
        if extra:
            raise MergeInputError(f"{where}: source keys {extra} are not supported")
        span = source.get("layer_range")
        if not (isinstance(span, Sequence) and len(span) == 2):
            raise MergeInputError(f"{where}: layer_range must be [first, end], got {short(span)}")
        path, (first, end) = model(source["model"], where), span
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (first, end)):
        raise MergeInputError(f"{where}: layer_range must be whole numbers")
    if not 0 <= first < end:
        raise MergeInputError(f"{where}: layer_range [{first}, {end}] is empty or negative")
    return str(path), first, end


def to_config(slices: Sequence[Slice]) -> list[dict[str, Any]]:
    return [{"sources": [{"model": p, "layer_range": [a, b]} for p, a, b in s]} for s in slices]


def models_of(slices: Sequence[Slice]) -> list[str]:
    """The distinct models of the slices, in order of appearance."""
    return list(dict.fromkeys(p for s in slices for p, _, _ in s))


def layer_count(slices: Sequence[Slice]) -> int:
    return sum(end - first for s in slices for _, first, end in s[:1])


def renumbered(name: str, layer: int) -> str:
    """`name` with its layer index (the first `layers.i.`-like part) replaced by `layer`."""
    found = _LAYER.search(name)
    assert found is not None
    return f"{name[: found.start(1)]}{layer}{name[found.end(1) :]}"


def layout(
    slices: Sequence[Slice], base: str, names: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, str]]:
    """Output name -> (model path, input name): the base's non-layer tensors (those before its
    first layer tensor, then the layers, then the rest, as checkpoints order them) and each
    slice's layers in turn, renumbered from 0. `names` holds each model's tensor names."""
    head: dict[str, tuple[str, str]] = {}
    tail: dict[str, tuple[str, str]] = {}
    seen_layer = False
    for name in names[base]:
        if layer_of(name) is not None:
            seen_layer = True
        else:
            (tail if seen_layer else head)[name] = (base, name)
    layers: dict[str, tuple[str, str]] = {}
    out = 0
    for k, ((path, first, end),) in enumerate(slices):
        by_layer: dict[int, list[str]] = {}
        for name in names[path]:
            i = layer_of(name)
            if i is not None:
                by_layer.setdefault(i, []).append(name)
        for i in range(first, end):
            if i not in by_layer:
                have = max(by_layer, default=-1) + 1
                raise MergeInputError(
                    f"slice {k}: model {path} has no layer {i} (it has {have} layers; "
                    f"layer_range [{first}, {end}])"
                )
            for name in by_layer[i]:
                layers[renumbered(name, out)] = (path, name)
            out += 1
    return {**head, **layers, **tail}


def config_json(folder: Path | None, layers: int) -> str | None:
    """The base's config.json with `num_hidden_layers` (or its other names) set to `layers`;
    None without a config.json."""
    path = folder / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeInputError(f"{path}: cannot read it: {short(exc)}") from None
    if not isinstance(config, dict):
        raise MergeInputError(f"{path}: expected a JSON object")
    keys = [k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config]
    for key in keys or ["num_hidden_layers"]:
        config[key] = layers
    text_config = config.get("text_config")  # multimodal configs nest the language model's
    if isinstance(text_config, dict) and "num_hidden_layers" in text_config:
        text_config["num_hidden_layers"] = layers
    return json.dumps(config, indent=2) + "\n"


def mergekit_fields(
    data: Mapping[str, Any], where: str, model: Callable[[Any, str], str]
) -> dict[str, Any]:
    """The request fields of a mergekit config with `slices:` (or `merge_method:
    passthrough`); `model` makes a config's model entry a path."""
    method = data["merge_method"]
    if method != "passthrough":
        raise MergeInputError(
            f"{where}: slices merged with {method} are not supported yet; use merge_method: "
            f"passthrough with one source per slice"
        )
    if not data.get("slices"):
        raise MergeInputError(f"{where}: passthrough needs 'slices' (layer ranges to stack)")
    for key in ("models", "parameters", "modules", "tokenizer"):
        if data.get(key):
            raise MergeInputError(f"{where}: passthrough with '{key}' is not supported")
    if data.get("tokenizer_source") not in (None, "base"):
        raise MergeInputError(f"{where}: tokenizer_source other than base is not supported")
    found = parse(data["slices"], f"{where}: slices", model)
    base = data.get("base_model")
    return {
        "base": model(base, f"{where}: base_model") if base is not None else found[0][0][0],
        "models": tuple(models_of(found)),
        "slices": found,
        "method": METHOD,
    }
