"""Layer slices (mergekit's `slices:` with `merge_method: passthrough`): the output's layers are
the concatenation of layer ranges taken from several models, renumbered; the tensors before the
layers (embeddings) come from the first slice's model and those after them (final norm, head)
from the last slice's, as mergekit 0.1.5 plans them; the base model gives only the side files
(config.json, tokenizer). Only a mapping of names is built here: the tensors are streamed
(copied bitwise) by the usual pipeline."""

from __future__ import annotations

import json
import re
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
    """Output name -> (model path, input name): the embeddings of the first slice's model, each
    slice's layers in turn, renumbered from 0, then the other non-layer tensors (final norm,
    head) of the last slice's model. That is mergekit's plan: pre-weights from the first
    slice's sources, post-weights from the last slice's; `base` gives no tensor (it stays in
    the signature for the callers). `names` holds each model's tensor names."""
    del base
    top, end_model = slices[0][0][0], slices[-1][0][0]
    head = {n: (top, n) for n in names[top] if layer_of(n) is None and is_pre_weight(n)}
    tail = {
        n: (end_model, n) for n in names[end_model] if layer_of(n) is None and not is_pre_weight(n)
    }
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


# mergekit's architectures name the embeddings as pre-weights (embed_tokens, wte, wpe,
# word_embeddings, embed_in, ...) and final norms and heads as post-weights; embed_out
# (GPT-NeoX's head) is the one post-weight that mentions an embedding.
_PRE_WEIGHT = re.compile(r"emb|wte|wpe|relative_pe")


def is_pre_weight(name: str) -> bool:
    """Whether a non-layer tensor comes before the layers (an embedding) in mergekit's plan."""
    return bool(_PRE_WEIGHT.search(name)) and "embed_out" not in name


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
        as_models = whole_models(data, where, model)
        if as_models is None:
            raise MergeInputError(
                f"{where}: slices merged with {method} are not supported yet (except one slice "
                f"whose sources span every layer of their models); use merge_method: "
                f"passthrough with one source per slice"
            )
        from isofast.config import from_mergekit  # config imports this module

        return from_mergekit(as_models, Path(where), Path(where).resolve().parent)
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


def whole_models(
    data: Mapping[str, Any], where: str, model: Callable[[Any, str], str]
) -> dict[str, Any] | None:
    """A config of one slice whose sources each span every layer of their model (mergekit's
    README writes slerp that way), as the same config with `models:` (absolute paths): mergekit
    plans `models:` as exactly that slice, so the results are the same. None for any other
    slices (or a model whose layer count config.json does not give)."""
    found = data.get("slices")
    if data.get("models") or not (isinstance(found, Sequence) and len(found) == 1):
        return None
    item = found[0]
    if not isinstance(item, Mapping) or set(item) != {"sources"}:
        return None  # slice-level parameters or base_model: not a plain `models:` list
    sources = item["sources"]
    if not isinstance(sources, Sequence) or isinstance(sources, str) or not sources:
        return None
    models: list[dict[str, Any]] = []
    for source in sources:
        if not isinstance(source, Mapping) or not {"model", "layer_range"} <= set(source):
            return None
        if set(source) - {"model", "layer_range", "parameters"}:
            return None
        path = model(source["model"], f"{where}: slices")
        span, layers = source["layer_range"], layers_in_config(Path(path))
        if layers is None or not isinstance(span, Sequence) or list(span) != [0, layers]:
            return None
        models.append(
            {
                "model": path,
                **({"parameters": source["parameters"]} if "parameters" in source else {}),
            }
        )
    rest = {k: v for k, v in data.items() if k != "slices"}
    if "base_model" in rest:
        rest["base_model"] = model(rest["base_model"], f"{where}: base_model")
    return {**rest, "models": models}


def layers_in_config(folder: Path) -> int | None:
    """num_hidden_layers (or n_layer / num_layers) of a model folder's config.json."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
