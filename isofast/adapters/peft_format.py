"""One PEFT LoRA adapter, opened from its config and its weight file's header alone.

An adapter is a folder (`adapter_config.json` and `adapter_model.safetensors`, or
`adapter_model.bin` under the usual pickle rules) or, in memory, a mapping
`{"config": <the adapter_config.json dict>, "weights": <its state dict>}`. Everything a merge
cannot honour (DoRA and the other LoRA variants, embedding or convolution LoRA, trained
biases, extra saved modules, a rank that disagrees with the config) is refused here, before
any tensor data is read; every error names the adapter, its file and the module.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from isofast import arrays
from isofast.errors import MergeInputError, short
from isofast.io import CheckpointError, CheckpointReader
from isofast.io.dtypes import FLOAT_DTYPES, name_of

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT saves the wrapped model's names under this prefix.
PREFIX = "base_model.model."

# "<prefix><module>.lora_A[.<adapter name>].weight", and the LoRA tensors isofast refuses.
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector|lora_diag)(?:\.(?P<rest>.+))?$"
)

# Config fields of LoRA variants and extras whose forward pass is not W + s * B A.
_REFUSED_IF_SET = {
    "use_dora": "DoRA (use_dora) rescales the weight's columns: not a low-rank update",
    "use_qalora": "QALoRA (use_qalora) pools the layer's inputs",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies to some tokens",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples its factors",
    "use_bdlora": "BD-LoRA (use_bdlora) uses block-diagonal factors",
    "arrow_config": "Arrow (arrow_config) routes between adapters",
    "kasa_config": "KaSA (kasa_config) rescales the base's singular values",
    "lora_bias": "a trained bias on lora_B (lora_bias)",
    "modules_to_save": "whole modules saved beside the adapter (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "replicated layers (layer_replication)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear module: W <- W + scale * B A (transposed when fan_in_fan_out)."""

    name: str  # the module's path in the base model, e.g. model.layers.0.self_attn.q_proj
    rank: int
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    a_key: str
    b_key: str
    out_features: int  # rows of B
    in_features: int  # columns of A
    dtype: str  # isofast's name of the factors' dtype


@dataclass
class Adapter:
    """A LoRA adapter: its config, its modules (from the header) and lazy access to factors."""

    label: str  # "adapter 1 (/path/to/folder)": how errors name it
    path: Path | None  # the folder, or None in memory
    weight_file: Path | None
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    _reader: CheckpointReader | None
    _weights: Mapping[str, Any] | None

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def base_model(self) -> str | None:
        name = self.config.get("base_model_name_or_path")
        return name if isinstance(name, str) and name else None

    def where(self, module: str) -> str:
        """The adapter and file holding `module`, for error messages."""
        file = f", file {self.weight_file}" if self.weight_file is not None else ""
        return f"{self.label}{file}, module '{module}'"

    def factors(self, module: str) -> tuple[np.ndarray, np.ndarray]:
        """(B, A) of `module` as float64 arrays (unscaled): the only place data is read."""
        m = self.modules[module]
        return self._float(m.b_key, m.dtype), self._float(m.a_key, m.dtype)

    def _float(self, key: str, dtype: str) -> np.ndarray:
        if self._reader is not None:
            raw = self._reader.get(key)
            x = float_array(arrays.Bf16Array(raw) if dtype == "bfloat16" else raw, np.float64)
        else:
            assert self._weights is not None
            x = float_array(self._weights[key], np.float64)
        if not np.isfinite(x).all():
            module = next(m for m in self.modules.values() if key in (m.a_key, m.b_key))
            raise MergeInputError(f"{self.where(module.name)}: tensor '{key}' holds NaN or Inf")
        return x

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def float_array(x: Any, dtype: type[np.floating[Any]]) -> np.ndarray:
    """A torch tensor, numpy array or raw bfloat16 bits (arrays.Bf16Array) as a numpy array
    of the float `dtype`."""
    if isinstance(x, arrays.Bf16Array):  # bfloat16 is the high half of a float32
        return (x.bits.astype(np.uint32) << 16).view(np.float32).astype(dtype)
    if arrays.is_torch(x):
        x = x.detach().cpu()
        return np.asarray((x.double() if dtype is np.float64 else x.float()).numpy())
    return np.asarray(x, dtype=dtype)


def open_adapter(source: str | Mapping[str, Any], label: str, allow_pickle: bool) -> Adapter:
    """Open an adapter folder (or an in-memory adapter) and check it from headers alone."""
    if isinstance(source, str):
        return _open_folder(Path(source), f"{label} ({source})", allow_pickle)
    config, weights = source.get("config"), source.get("weights")
    if not isinstance(config, Mapping) or not isinstance(weights, Mapping):
        raise MergeInputError(
            f"{label}: an adapter in memory is a mapping with 'config' (the adapter_config.json "
            f"dict) and 'weights' (its state dict), got keys {sorted(map(str, source))}"
        )
    _check_config(dict(config), label)
    headers = {}
    for key, x in weights.items():
        try:
            headers[str(key)] = (arrays.shape_of(x), arrays.dtype_name(x))
        except (TypeError, AttributeError):
            raise MergeInputError(
                f"{label}: tensor '{key}' is not a torch tensor or numpy array"
            ) from None
    modules = _modules(dict(config), headers, label)
    return Adapter(label, None, None, dict(config), modules, None, weights)


def _open_folder(folder: Path, label: str, allow_pickle: bool) -> Adapter:
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise MergeInputError(f"{label}: {folder} {what} (an adapter is a PEFT adapter folder)")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise MergeInputError(
            f"{label}: {config_file} is missing (not a PEFT adapter folder: it needs "
            f"{CONFIG_FILE} and {' or '.join(WEIGHT_FILES)})"
        )
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MergeInputError(f"{label}: {config_file}: cannot read it as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise MergeInputError(f"{label}: {config_file}: expected a JSON object")
    _check_config(config, f"{label}: {config_file}")
    weight_file = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weight_file is None:
        raise MergeInputError(f"{label}: no weights: neither {' nor '.join(WEIGHT_FILES)} exists")
    try:
        reader = CheckpointReader(weight_file, allow_pickle=allow_pickle)
    except (CheckpointError, OSError) as exc:
        raise MergeInputError(f"{label}: {exc}") from None
    try:
        headers = {n: (tuple(i.shape), name_of(i.dtype)) for n, i in reader.infos().items()}
        modules = _modules(config, headers, f"{label}, file {weight_file}")
    except BaseException:
        reader.close()
        raise
    return Adapter(label, folder, weight_file, config, modules, reader, None)


def _check_config(config: dict[str, Any], where: str) -> None:
    """Refuse adapters whose update is not W + s * B A on linear modules."""
    peft_type = config.get("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)  # PEFT's own configs hold an enum
    if str(peft_type).upper() != "LORA":
        raise MergeInputError(f"{where}: peft_type {short(peft_type)}: only LoRA adapters merge")
    for key, what in _REFUSED_IF_SET.items():
        if config.get(key):
            raise MergeInputError(f"{where}: {what} is not supported ({key} is set)")
    if config.get("bias") not in (None, "none"):
        raise MergeInputError(
            f"{where}: trained biases (bias = {short(config['bias'])}) are not supported"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise MergeInputError(f"{where}: {key} must be a positive number, got {short(value)}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, Mapping):
            raise MergeInputError(f"{where}: {key} must be a mapping, got {short(config[key])}")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern matching `module`, as PEFT's get_pattern_key decides
    (a key matches the module's whole name or a dot-separated suffix of it, as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(configured rank, scale) of `module` under an adapter's config."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return int(r), float(alpha) / math.sqrt(r)
    return int(r), float(alpha) / r


def _modules(
    config: dict[str, Any], headers: Mapping[str, tuple[tuple[int, ...], str]], where: str
) -> dict[str, LoraModule]:
    """The adapted modules a weight file's header describes, checked against the config."""
    parts: dict[str, dict[str, str]] = {}
    found_keys = [(key, _KEY.match(key)) for key in headers]
    # A LoRA variant's own tensors say more than the full weights it may save beside them.
    found_keys.sort(key=lambda kf: kf[1] is None)
    for key, found in found_keys:
        if found is None:
            raise MergeInputError(
                f"{where}: tensor '{key}' is not a LoRA factor (only lora_A / lora_B weights of "
                f"linear modules merge; full weights saved beside an adapter are not supported)"
            )
        module, kind = found["module"].removeprefix(PREFIX), found["kind"]
        if kind.startswith("lora_embedding"):
            raise MergeInputError(f"{where}, module '{module}': embedding LoRA is not supported")
        if kind == "lora_magnitude_vector":
            raise MergeInputError(f"{where}, module '{module}': DoRA is not supported")
        if kind == "lora_diag":
            raise MergeInputError(f"{where}, module '{module}': KaSA is not supported")
        if (found["rest"] or "weight").split(".")[-1] != "weight":
            raise MergeInputError(
                f"{where}, module '{module}': tensor '{key}' (a LoRA bias) is not supported"
            )
        if kind in parts.get(module, {}):
            raise MergeInputError(f"{where}, module '{module}': two {kind} tensors")
        parts.setdefault(module, {})[kind] = key
    if not parts:
        raise MergeInputError(f"{where}: holds no LoRA factors")
    modules = {}
    for module, keys in sorted(parts.items()):
        here = f"{where}, module '{module}'"
        if set(keys) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in keys else "lora_A"
            raise MergeInputError(f"{here}: {missing} is missing")
        (a_shape, a_dtype), (b_shape, b_dtype) = headers[keys["lora_A"]], headers[keys["lora_B"]]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise MergeInputError(
                f"{here}: factors of shapes {a_shape} and {b_shape}: only LoRA on linear "
                f"modules is supported (not convolutions)"
            )
        if a_shape[0] != b_shape[1]:
            raise MergeInputError(
                f"{here}: lora_A {a_shape} and lora_B {b_shape} disagree on the rank"
            )
        for dtype in (a_dtype, b_dtype):
            if dtype not in FLOAT_DTYPES:
                raise MergeInputError(f"{here}: factors of dtype {dtype} are not supported")
        if a_dtype != b_dtype:
            raise MergeInputError(f"{here}: lora_A is {a_dtype} but lora_B is {b_dtype}")
        rank, scale = module_scale(config, module)
        if rank != a_shape[0]:
            raise MergeInputError(
                f"{here}: the factors have rank {a_shape[0]} but the config (r / rank_pattern) "
                f"says {rank}"
            )
        modules[module] = LoraModule(
            module, rank, scale, keys["lora_A"], keys["lora_B"], b_shape[0], a_shape[1], a_dtype
        )
    return modules
