"""Regenerate the fuzz seed corpus (tests/test_fuzz.py mutates these files).

    python tests/fuzz_corpus/make_corpus.py

One folder per target, each file a small valid input (< 4 KB): safetensors files written by
the safetensors library and by hand (padded header, zero-size and scalar tensors, every
byte-sized dtype), torch state dicts (zip and legacy format), sharded-index JSON, isofast and
mergekit YAML configs. The files are committed; rerunning this rewrites them (torch files
differ in their random serialization id only).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def _raw_safetensors(path: Path, header: dict[str, Any], data: bytes, pad: int = 0) -> None:
    raw = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def safetensors_seeds(out: Path) -> None:
    from safetensors.numpy import save_file

    out.mkdir(exist_ok=True)
    save_file(
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)},
        str(out / "two_f32.safetensors"),
        metadata={"format": "pt"},
    )
    save_file(
        {
            "i64": np.array([1, -2], np.int64),
            "mask": np.array([True, False, True]),
            "empty": np.zeros((0, 3), np.uint8),
            "scalar": np.array(1.5, np.float16),
            "i16": np.array([[1, 2], [3, 4]], np.int16),
        },
        str(out / "mixed.safetensors"),
    )
    _raw_safetensors(out / "empty.safetensors", {}, b"")
    # By hand: the dtypes numpy lacks (raw bits), a header padded with spaces as isofast's
    # writer pads it, a zero-size tensor at the very end.
    entries: list[tuple[str, str, list[int], int]] = [
        ("bf16", "BF16", [2, 2], 2),
        ("f8", "F8_E4M3", [3], 1),
        ("f64", "F64", [1], 8),
        ("c64", "C64", [1], 8),
        ("u32", "U32", [2], 4),
        ("z", "F32", [0], 4),
    ]
    header: dict[str, Any] = {"__metadata__": {"format": "np", "note": "seed"}}
    cursor = 0
    for name, dtype, shape, itemsize in entries:
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + n]}
        cursor += n
    _raw_safetensors(out / "padded.safetensors", header, bytes(range(cursor)), pad=13)


def torch_seeds(out: Path) -> None:
    import torch

    out.mkdir(exist_ok=True)
    plain = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2).half()}
    torch.save(plain, out / "plain.pt")
    base = torch.arange(8, dtype=torch.bfloat16)
    views = {
        "all": base,
        "half": base[4:],  # shares the storage, at an offset
        "strided": base.view(2, 4)[:, ::2],
        "ids": torch.tensor([3, -1], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    torch.save(views, out / "views.pt")
    torch.save({"state_dict": plain, "epoch": 3, "note": "x"}, out / "wrapped.pt")
    torch.save(plain, out / "legacy.pt", _use_new_zipfile_serialization=False)


# The index target puts these shards beside the index it reads.
INDEX_SHARDS = {
    "model-00001-of-00002.safetensors": ("a.weight", "a.bias"),
    "model-00002-of-00002.safetensors": ("b.weight",),
}


def index_seeds(out: Path) -> None:
    out.mkdir(exist_ok=True)
    weight_map = {name: shard for shard, names in INDEX_SHARDS.items() for name in names}
    doc = {"metadata": {"total_size": 40}, "weight_map": weight_map}
    (out / "two_shards.json").write_text(json.dumps(doc, indent=2) + "\n")
    first = next(iter(INDEX_SHARDS))
    (out / "one_shard.json").write_text(json.dumps({"weight_map": {"a.bias": first}}) + "\n")


def config_seeds(out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / "isofast_minimal.yaml").write_text(
        "base_model: ./base\nmodels:\n  - ./ft0\n  - ./ft1\nmethod: iso_cts\n"
    )
    (out / "isofast_full.yaml").write_text(
        "base_model: /models/base\n"
        "models:\n  - ./ft0\n  - {model: ./ft1}\n"
        "method: ties\n"
        "alpha: 0.5\n"
        "parameters:\n  density: 0.3\n  trim: tensor\n  merge: sum\n"
        "dtype: float64\n"
        "out_dtype: bf16\n"
        "exclude: [text_projection, lm_head]\n"
        "seed: 7\n"
        "threads: 2\n"
        "out_shard_size: 500MiB\n"
        "allow_pickle: false\n"
        "device: cpu\n"
    )
    (out / "mergekit_ties.yaml").write_text(
        "models:\n"
        "  - model: ./base\n"
        "  - model: ./ft0\n    parameters:\n      weight: 0.5\n      density: 0.6\n"
        "  - model: ./ft1\n    parameters:\n      weight: 0.5\n      density: 0.6\n"
        "merge_method: ties\n"
        "base_model: ./base\n"
        "parameters:\n  int8_mask: true\n  normalize: true\n"
        "dtype: bfloat16\n"
    )
    (out / "mergekit_linear.yaml").write_text(
        "models:\n  - model: ./ft0\n  - model: ./ft1\n"
        "merge_method: linear\nparameters:\n  normalize: true\n  weight: 1.0\ndtype: float16\n"
    )
    (out / "mergekit_dare.yaml").write_text(
        "merge_method: dare_linear\nbase_model: ./base\nmodels: [./ft0, ./ft1]\n"
        "parameters: {density: 0.5, weight: 0.3}\nout_dtype: float32\nseed: 3\n"
    )


if __name__ == "__main__":
    safetensors_seeds(HERE / "safetensors")
    torch_seeds(HERE / "torch")
    index_seeds(HERE / "index")
    config_seeds(HERE / "config")
    for f in sorted(HERE.rglob("*")):
        if f.is_file() and f.suffix != ".py":
            assert f.stat().st_size < 4096, f
            print(f.relative_to(HERE), f.stat().st_size)
