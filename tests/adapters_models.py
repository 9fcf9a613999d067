"""Tiny models and PEFT LoRA adapters for tests/test_adapters.py, built offline.

Factor entries are integers times 2**-8 (|k| <= 64) and every scale lora_alpha / r (or
/ sqrt(r)) is 2, so each update D_t = s B A is exact in float32 however it is computed:
PEFT's delta and isofast's agree bit for bit, and the dense and factored paths of the
elementwise methods see identical inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

GRID = 2.0**-8


@contextmanager
def quiet() -> Iterator[None]:
    """transformers and PEFT warn about deprecations and conventions the tests do not care
    about (pytest turns warnings into errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    with quiet():
        return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    torch.manual_seed(0)
    with quiet():
        return GPT2LMHeadModel(config).eval()


def save_base(model: torch.nn.Module, folder: Path) -> Path:
    with quiet():
        model.save_pretrained(folder)
    return folder


def make_adapter(
    base: torch.nn.Module,
    folder: Path,
    seed: int,
    zero_b: Sequence[str] = (),
    safetensors: bool = True,
    **config: Any,
) -> Path:
    """A PEFT LoRA adapter on a copy of `base` with random grid factors (lora_B too), saved
    to `folder`. Modules whose name contains a string of `zero_b` keep lora_B = 0."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    with quiet():
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
        for name, p in model.named_parameters():
            if "lora_" in name:
                zero = "lora_B" in name and any(z in name for z in zero_b)
                grid = torch.randint(-64, 65, tuple(p.shape), generator=gen).float() * GRID
                p.data = torch.zeros_like(p) if zero else grid
        model.save_pretrained(folder, safe_serialization=safetensors)
    return folder


def peft_deltas(base: torch.nn.Module, folder: Path) -> dict[str, np.ndarray]:
    """Weight name -> the update PEFT applies for the adapter in `folder` (its own
    get_delta_weight: scaling, rank/alpha patterns and fan_in_fan_out included)."""
    import copy

    with quiet():
        model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            with torch.no_grad():
                out[f"{name}.weight"] = module.get_delta_weight("default").numpy().copy()
    return out


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> np.ndarray:
    with torch.no_grad(), quiet():
        return np.asarray(model(tokens).logits.numpy())


def with_adapter(base_folder: Path, adapter: Path, gpt2: bool = False) -> torch.nn.Module:
    """The base model from disk with the adapter folder loaded by PEFT."""
    cls = GPT2LMHeadModel if gpt2 else LlamaForCausalLM
    with quiet():
        return PeftModel.from_pretrained(cls.from_pretrained(base_folder), adapter).eval()


def load_model(folder: Path, gpt2: bool = False) -> torch.nn.Module:
    cls = GPT2LMHeadModel if gpt2 else LlamaForCausalLM
    with quiet():
        return cls.from_pretrained(folder).eval()


def adapter_update(
    tensors: Mapping[str, Any], config: Mapping[str, Any], module: str, transposed: bool = False
) -> np.ndarray:
    """B A (scaling 1, as isofast writes) of one module of a merged adapter in memory, in the
    base weight's orientation."""
    assert config["use_rslora"] is False
    r = config["rank_pattern"].get(module, config["r"])
    assert config["alpha_pattern"].get(module, config["lora_alpha"]) == r  # scaling 1
    a = np.asarray(tensors[f"base_model.model.{module}.lora_A.weight"], dtype=np.float64)
    b = np.asarray(tensors[f"base_model.model.{module}.lora_B.weight"], dtype=np.float64)
    assert a.shape[0] == r
    return (b @ a).T if transposed else b @ a
