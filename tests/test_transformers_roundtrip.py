"""Merged folders are Hugging Face models: `transformers` loads them (issue 3, item 2).

A tiny Llama (hidden 64, 2 layers, vocab 128; fp32 and bf16) and a tiny CLIP vision tower are
built with random weights, saved with `save_pretrained(safe_serialization=True)` as the base,
and fine-tunes = base + small noise are saved the same way. `isofast merge` then must give:

* alpha = 0: the base model exactly (logits / last hidden state bit for bit);
* alpha = 1: a model that loads with no missing or unexpected keys and runs;
* config.json and the tokenizer files copied, a model card with `base_model` and the tags
  [merge, isofast], and an `isofast_config.yml` that re-runs the same merge bit for bit.

Nothing is downloaded (HF_HUB_OFFLINE=1, models are built from configs in code).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open

from isofast import cli
from isofast.io import INDEX_NAME, SINGLE_NAME

from conftest import fresh_seed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

TASKS = 3
THREADS = 2
TOKENIZER_FILES = {
    "tokenizer_config.json": {"model_max_length": 64, "tokenizer_class": "PreTrainedTokenizer"},
    "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
}


@dataclass(frozen=True)
class Family:
    name: str
    base: Path
    models: tuple[Path, ...]
    load: Callable[[Path], Any]  # folder -> (model, loading info)
    run: Callable[[Any], torch.Tensor]  # model -> logits / last hidden state
    dtype: torch.dtype


def _quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _save_family(
    root: Path, model: Any, seed: int, noise: float = 0.01
) -> tuple[Path, tuple[Path, ...]]:
    base = root / "base"
    model.save_pretrained(base, safe_serialization=True)
    for name, content in TOKENIZER_FILES.items():
        (base / name).write_text(json.dumps(content))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    models = []
    for t in range(TASKS):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    delta = noise * torch.randn(p.shape, generator=gen)
                    p.copy_((state[k].float() + delta).to(p.dtype))
        folder = root / f"ft{t}"
        model.save_pretrained(folder, safe_serialization=True)
        models.append(folder)
    with torch.no_grad():  # leave the module as the base model
        for k, p in model.state_dict().items():
            p.copy_(state[k])
    return base, tuple(models)


def _llama(root: Path, dtype: torch.dtype) -> Family:
    seed = fresh_seed() % 2**63
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    base, models = _save_family(root, model, seed)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))

    def load(path: Path) -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True
        )

    def run(m: Any) -> torch.Tensor:
        with torch.no_grad():
            logits: torch.Tensor = m(input_ids=ids).logits
        return logits

    return Family(f"llama-{dtype}", base, models, load, run, dtype)


def _clip(root: Path) -> Family:
    seed = fresh_seed() % 2**63
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    model = transformers.CLIPVisionModel(config).eval()
    base, models = _save_family(root, model, seed)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    def load(path: Path) -> Any:
        return transformers.AutoModel.from_pretrained(
            path, dtype=torch.float32, output_loading_info=True
        )

    def run(m: Any) -> torch.Tensor:
        with torch.no_grad():
            hidden: torch.Tensor = m(pixel_values=pixels).last_hidden_state
        return hidden

    return Family("clip-vision", base, models, load, run, torch.float32)


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    _quiet_transformers()
    out = {}
    for fam in (
        _llama(tmp_path_factory.mktemp("llama32"), torch.float32),
        _llama(tmp_path_factory.mktemp("llama16"), torch.bfloat16),
        _clip(tmp_path_factory.mktemp("clip")),
    ):
        out[fam.name] = fam
    return out


def _merge(fam: Family, out: Path, method: str, alpha: float, *extra: str) -> Path:
    argv = ["merge", str(out), "--base", str(fam.base)]
    for m in fam.models:
        argv += ["--model", str(m)]
    argv += ["--method", method, "--alpha", str(alpha), "--threads", str(THREADS), "-q", *extra]
    assert cli.main(argv) == 0
    return out


def _loaded(fam: Family, path: Path) -> Any:
    model, info = fam.load(path)
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), f"{fam.name} {path.name}: {key} {info[key]}"
    assert next(model.parameters()).dtype == fam.dtype
    return model.eval()


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


FAMILIES = ["llama-torch.float32", "llama-torch.bfloat16", "clip-vision"]


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_gives_the_base_model_exactly(
    families: dict[str, Family], tmp_path: Path, family: str
) -> None:
    fam = families[family]
    # a sharded output for the Llamas (transformers reads the index), one file for CLIP
    extra = ("--out-shard-size", "40KB") if family.startswith("llama") else ()
    out = _merge(fam, tmp_path / "merged", "iso_cts", 0.0, *extra)
    assert (out / INDEX_NAME).exists() == family.startswith("llama")
    base_model, merged = _loaded(fam, fam.base), _loaded(fam, out)
    assert torch.equal(fam.run(merged), fam.run(base_model))
    base_params = dict(base_model.named_parameters())
    for name, p in merged.named_parameters():
        assert torch.equal(p, base_params[name]), name

    # side files, model card, reproducing config
    for name in ("config.json", *TOKENIZER_FILES):
        assert (out / name).read_bytes() == (fam.base / name).read_bytes(), name
    if (fam.base / "generation_config.json").exists():
        assert (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == [str(fam.base), *map(str, fam.models)]
    assert front["tags"] == ["merge", "isofast"]
    again = tmp_path / "again"
    assert cli.main(["merge", str(out / "isofast_config.yml"), str(again), "-q"]) == 0
    assert _weights(again) == _weights(out)


@pytest.mark.parametrize(
    ("family", "method"),
    [
        ("llama-torch.float32", "iso_cts"),
        ("llama-torch.float32", "ties"),
        ("llama-torch.bfloat16", "tsv_m"),
        ("llama-torch.bfloat16", "dare_ties"),
        ("clip-vision", "iso_c"),
        ("clip-vision", "consensus"),
    ],
)
def test_alpha_one_loads_and_runs(
    families: dict[str, Family], tmp_path: Path, family: str, method: str
) -> None:
    fam = families[family]
    out = _merge(fam, tmp_path / "merged", method, 1.0)
    merged = _loaded(fam, out)
    y = fam.run(merged)
    y0 = fam.run(_loaded(fam, fam.base))
    assert y.shape == y0.shape
    assert torch.isfinite(y).all()
    assert not torch.equal(y, y0), "the merge changed nothing"
    # the files are plain safetensors with the metadata transformers expects
    with safe_open(str(out / SINGLE_NAME), framework="pt") as f:
        assert f.metadata()["format"] == "pt"
        assert f.metadata()["isofast_method"] == method
    # the merged update is bounded by the fine-tunes' updates (a sanity check on scale)
    (model_ft, _) = fam.load(fam.models[0])
    base_params = dict(_loaded(fam, fam.base).named_parameters())
    for name, p in merged.named_parameters():
        b = base_params[name].float()
        step = (p.float() - b).norm().item()
        ft_step = (dict(model_ft.named_parameters())[name].float() - b).norm().item()
        assert step <= 10 * TASKS * ft_step + 1e-6, (name, step, ft_step)
