"""Writing a merged LoRA adapter as a PEFT adapter folder, published atomically.

The folder holds `adapter_model.safetensors`, `adapter_config.json`, a model card and, when
the inputs are on disk, `isofast_config.yml`. It is written under a hidden temporary name
beside the output, fsynced and renamed into place, so a folder under the output's name is
always complete. Every module gets scaling 1 (lora_alpha = r through `alpha_pattern`), so
B A is exactly the merged update alpha * M; per-module ranks go into `rank_pattern`.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isofast.adapters.peft_format import CONFIG_FILE, PREFIX
from isofast.io.safetensors_format import encode_header, pack_header_length

WEIGHT_FILE = "adapter_model.safetensors"


def to_storage(x: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """A float array as the bytes of `dtype` (bfloat16 rounded to nearest even) and the
    safetensors name of that dtype."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN stays NaN (the rounding could carry its payload into the exponent).
        nan = np.isnan(x)
        return np.where(nan, 0x7FC0, rounded).astype(np.uint16), "BF16"
    names = {"float32": "F32", "float16": "F16", "float64": "F64"}
    return np.ascontiguousarray(x, dtype=dtype), names[dtype]


def adapter_keys(module: str) -> tuple[str, str]:
    """(lora_A key, lora_B key) of a module, as PEFT saves them."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def adapter_config(
    ranks: Mapping[str, int],
    *,
    base_model: str | None,
    task_type: str | None,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """A LoRA config that PEFT loads: the listed modules, each with its own rank and
    scaling lora_alpha / r = 1."""
    common = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model,
        "task_type": task_type,
        "inference_mode": True,
        "r": common,
        "lora_alpha": common,
        "use_rslora": False,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: r for m, r in ranks.items() if r != common},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != common},
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def safetensors_bytes(
    tensors: Sequence[tuple[str, np.ndarray, str]], metadata: Mapping[str, str]
) -> list[bytes | memoryview]:
    """The pieces of a safetensors file holding (name, array, dtype name) in this order."""
    entries, offset = [], 0
    for name, array, dtype in tensors:
        entries.append((name, dtype, array.shape, offset, offset + array.nbytes))
        offset += array.nbytes
    header = encode_header(entries, {"format": "pt", **metadata})
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
    pieces: list[bytes | memoryview] = [pack_header_length(len(header)), header]
    pieces += [np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for _, a, _ in tensors]
    return pieces


def publish_folder(
    out_dir: str | os.PathLike[str], files: Mapping[str, Any], overwrite: bool
) -> Path:
    """Write `files` (name -> str, or a list of byte pieces) into a new folder and rename it
    to `out_dir` once complete and synced; an existing non-empty `out_dir` is replaced only
    when `overwrite`."""
    out = Path(os.path.abspath(out_dir))
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.isofast-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for name, content in files.items():
            with open(tmp / name, "wb") as f:
                for piece in [content.encode("utf-8")] if isinstance(content, str) else content:
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
        _fsync(tmp)
        _swap_in(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(
            errno.EEXIST,
            "output path exists and is not an empty folder (pass overwrite=True)",
            str(out),
        )


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    _check_target(out, overwrite)
    old = None
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = out.parent / f".{out.name}.isofast-old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    _fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def config_text(config: Mapping[str, Any]) -> str:
    return json.dumps(config, indent=2) + "\n"


__all__ = [
    "CONFIG_FILE",
    "WEIGHT_FILE",
    "adapter_config",
    "adapter_keys",
    "config_text",
    "publish_folder",
    "safetensors_bytes",
    "to_storage",
]
