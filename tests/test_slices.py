"""Layer slices with passthrough (issue 13, item 3): a frankenmerge of two tiny Llama-like
models of 4 layers into 6 layers, streamed as a bitwise copy with renamed layers and
config.json's num_hidden_layers rewritten; the written isofast_config.yml reproduces it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from isofast import cli
from isofast.config import load_config
from isofast.errors import MergeInputError

LAYER = ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")


def _llama(folder: Path, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (32, 8), "model.norm.weight": (8,)}
    for i in range(4):
        for part, shape in zip(LAYER, ((8, 8), (16, 8), (8,)), strict=True):
            shapes[f"model.layers.{i}.{part}"] = shape
    shapes["lm_head.weight"] = (32, 8)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 8}
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "./a", "layer_range": [0, 3]}]},
            {"sources": [{"model": "./b", "layer_range": [1, 4]}]},
        ],
        **extra,
    }


def test_passthrough_frankenmerge(tmp_path: Path) -> None:
    a, b = _llama(tmp_path / "a", 0), _llama(tmp_path / "b", 1)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump(_config(dtype="float32")))
    out = tmp_path / "out"
    assert cli.main(["merge", str(cfg), str(out), "-q"]) == 0
    got = load_file(str(out / "model.safetensors"))
    # layers 0-2 of a, then layers 1-3 of b as 3-5; the embeddings from the first slice's
    # model, the final norm and head from the last slice's (mergekit's plan)
    want = {"model.embed_tokens.weight": a["model.embed_tokens.weight"]}
    want |= {n: b[n] for n in ("model.norm.weight", "lm_head.weight")}
    for out_layer, (model, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        for part in LAYER:
            want[f"model.layers.{out_layer}.{part}"] = model[f"model.layers.{layer}.{part}"]
    assert sorted(got) == sorted(want)
    for name, x in want.items():
        assert got[name].dtype == x.dtype and got[name].tobytes() == x.tobytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["hidden_size"] == 8
    # the written config reproduces the merge bit for bit
    again = tmp_path / "again"
    assert cli.main(["merge", str(out / "isofast_config.yml"), str(again), "-q"]) == 0
    redo = load_file(str(again / "model.safetensors"))
    assert sorted(redo) == sorted(got)
    assert all(redo[n].tobytes() == got[n].tobytes() for n in got)
    assert json.loads((again / "config.json").read_text())["num_hidden_layers"] == 6


def test_base_model_gives_no_tensors(tmp_path: Path) -> None:
    """mergekit 0.1.5 takes the embeddings from the first slice's model and the final norm and
    head from the last slice's, also with a base_model (it gives config.json only)."""
    a, b = _llama(tmp_path / "a", 0), _llama(tmp_path / "b", 1)
    _llama(tmp_path / "base", 2)
    (tmp_path / "base" / "config.json").write_text(
        json.dumps({"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 8, "x": 1})
    )
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump(_config(base_model="./base")))
    out = tmp_path / "out"
    assert cli.main(["merge", str(cfg), str(out), "-q"]) == 0
    got = load_file(str(out / "model.safetensors"))
    for name, model in (
        ("model.embed_tokens.weight", a),
        ("model.norm.weight", b),
        ("lm_head.weight", b),
    ):
        assert got[name].tobytes() == model[name].tobytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["x"] == 1 and config["num_hidden_layers"] == 6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_method": "slerp"}, "slices merged with slerp are not supported yet"),
        (
            {"slices": [{"sources": [{"model": "./a", "layer_range": [2, 6]}]}]},
            "has no layer 4",
        ),
        (
            {"slices": [{"sources": [{"model": "./a", "layer_range": [0, 2]}] * 2}]},
            "one source per slice",
        ),
        ({"slices": [{"sources": [{"model": "./a", "layer_range": [3, 1]}]}]}, "empty"),
        ({"slices": None}, "passthrough needs 'slices'"),
    ],
)
def test_refusals(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    _llama(tmp_path / "a", 0)
    _llama(tmp_path / "b", 1)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump({**_config(), **change}))
    with pytest.raises(MergeInputError, match=message):
        request = load_config(cfg)
        cli.main(["plan", str(cfg)])  # layer ranges are checked when the models are opened
        from isofast.api import plan_of

        plan_of(request)


@pytest.mark.parametrize(
    ("name", "pre"),
    [
        ("model.embed_tokens.weight", True),
        ("transformer.wte.weight", True),
        ("transformer.wpe.weight", True),
        ("transformer.word_embeddings.weight", True),
        ("gpt_neox.embed_in.weight", True),
        ("model.norm.weight", False),
        ("lm_head.weight", False),
        ("transformer.ln_f.weight", False),
        ("embed_out.weight", False),
        ("model.final_layernorm.weight", False),
    ],
)
def test_pre_weights_as_mergekit_names_them(name: str, pre: bool) -> None:
    """mergekit's architectures: embeddings before the layers, norms and heads after them."""
    from isofast.slices import is_pre_weight

    assert is_pre_weight(name) is pre


def test_one_slice_over_every_layer_is_a_models_list(tmp_path: Path) -> None:
    """mergekit README's slerp (one slice, both models' full layer range, a t gradient per
    filter) gives the same bits as the same config with `models:`."""
    _llama(tmp_path / "a", 0)
    _llama(tmp_path / "b", 1)
    t = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]
    sliced = {
        "merge_method": "slerp",
        "base_model": "./a",
        "slices": [
            {
                "sources": [
                    {"model": "./a", "layer_range": [0, 4]},
                    {"model": "./b", "layer_range": [0, 4]},
                ]
            }
        ],
        "parameters": {"t": t},
        "dtype": "float32",
    }
    listed = {**sliced, "models": [{"model": "./a"}, {"model": "./b"}]}
    del listed["slices"]
    outs = []
    for name, config in (("sliced", sliced), ("listed", listed)):
        cfg = tmp_path / f"{name}.yml"
        cfg.write_text(yaml.safe_dump(config))
        assert cli.main(["merge", str(cfg), str(tmp_path / name), "-q"]) == 0
        outs.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert sorted(outs[0]) == sorted(outs[1])
    assert all(outs[0][n].tobytes() == outs[1][n].tobytes() for n in outs[0])


@pytest.mark.parametrize(
    "sources",
    [
        [{"model": "./a", "layer_range": [0, 3]}, {"model": "./b", "layer_range": [0, 3]}],
        [{"model": "./a", "layer_range": [1, 4]}, {"model": "./b", "layer_range": [1, 4]}],
    ],
    ids=["short", "shifted"],
)
def test_slices_of_part_of_the_layers_stay_refused(tmp_path: Path, sources: Any) -> None:
    _llama(tmp_path / "a", 0)
    _llama(tmp_path / "b", 1)
    cfg = tmp_path / "merge.yml"
    config = {"merge_method": "slerp", "base_model": "./a", "slices": [{"sources": sources}]}
    cfg.write_text(yaml.safe_dump({**config, "parameters": {"t": 0.5}}))
    with pytest.raises(MergeInputError, match="slices merged with slerp are not supported yet"):
        load_config(cfg)
