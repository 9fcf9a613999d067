"""`isofast demo`: build a small base model and fine-tunes on disk, merge them with every
method, and print how far the merged model lies from each fine-tune."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from isofast.api import merge
from isofast.io import CheckpointReader, CheckpointWriter
from isofast.methods import METHODS

# alpha per method for the demo (task arithmetic's usual 0.3; the others' defaults).
DEMO_ALPHA = {"task_arithmetic": 0.3, "dare_linear": 0.3, "consensus": 0.3}


def demo_shapes(width: int = 128, blocks: int = 4) -> dict[str, tuple[int, ...]]:
    """A small ViT-like layout: fused qkv, attention out, MLP, norms, biases, an int buffer."""
    shapes: dict[str, tuple[int, ...]] = {"embed.patch": (width, 3, 4, 4), "embed.cls": (width,)}
    for b in range(blocks):
        p = f"blocks.{b}."
        shapes |= {
            p + "attn.qkv.weight": (3 * width, width),
            p + "attn.qkv.bias": (3 * width,),
            p + "attn.out.weight": (width, width),
            p + "mlp.fc.weight": (4 * width, width),
            p + "mlp.proj.weight": (width, 4 * width),
            p + "norm.weight": (width,),
        }
    shapes["head.proj"] = (width, 64)
    return shapes


def write_demo_models(folder: Path, tasks: int = 4, seed: int = 0) -> tuple[Path, list[Path]]:
    """Base model plus `tasks` fine-tunes (low-rank task updates + small dense noise), bf16."""
    rng = np.random.default_rng(seed)
    shapes = demo_shapes()
    base = {n: rng.standard_normal(s).astype(np.float32) * 0.05 for n, s in shapes.items()}
    config = {"model_type": "isofast-demo", "hidden_size": 128, "num_layers": 4}

    def save(path: Path, tensors: dict[str, np.ndarray]) -> None:
        with CheckpointWriter(path) as w:
            for name, arr in tensors.items():
                w.add(name, _to_bf16_bits(arr), "BF16")
            w.add("position_ids", np.arange(16, dtype=np.int64), "I64")
            w.write_text("config.json", json.dumps(config, indent=2))

    save(folder / "base", base)
    fine_tunes = []
    for t in range(tasks):
        tuned = {}
        for name, arr in base.items():
            if arr.ndim == 2:
                rank = 4
                u = rng.standard_normal((arr.shape[0], rank))
                v = rng.standard_normal((rank, arr.shape[1]))
                update = (u @ v) / np.sqrt(arr.shape[0] * arr.shape[1]) * 0.5
            else:
                update = np.zeros(arr.shape)
            update = update + 0.002 * rng.standard_normal(arr.shape)
            tuned[name] = (arr + update).astype(np.float32)
        fine_tunes.append(folder / f"task{t}")
        save(fine_tunes[-1], tuned)
    return folder / "base", fine_tunes


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
    return (rounded >> 16).astype(np.uint16)


def _float_params(path: Path) -> dict[str, np.ndarray]:
    with CheckpointReader(path) as r:
        out = {}
        for name in r.names():
            info = r.info(name)
            if info.dtype == "BF16":
                bits = r.get(name).astype(np.uint32) << 16
                out[name] = bits.view(np.float32).astype(np.float64)
            elif info.dtype.startswith("F"):
                out[name] = r.get(name).astype(np.float64)
        return out


def relative_distances(merged: Path, base: Path, fine_tunes: list[Path]) -> list[float]:
    """||merged - theta_t|| / ||theta_t - theta_0|| over all float tensors, per fine-tune."""
    m, b = _float_params(merged), _float_params(base)
    out = []
    for ft in fine_tunes:
        f = _float_params(ft)
        num = sum(float(np.sum((m[n] - f[n]) ** 2)) for n in f)
        den = sum(float(np.sum((f[n] - b[n]) ** 2)) for n in f)
        out.append((num / den) ** 0.5)
    return out


def run_demo(
    folder: Path, tasks: int = 4, quiet: bool = False
) -> list[tuple[str, float, list[float]]]:
    base, fine_tunes = write_demo_models(folder, tasks)
    rows = []
    for method in dict.fromkeys(spec.name for spec in METHODS.values()):
        start = time.perf_counter()
        alpha = DEMO_ALPHA.get(method, 1.0)
        out = merge(base, fine_tunes, method, alpha, out=folder / f"merged-{method}")
        seconds = time.perf_counter() - start
        rows.append((method, seconds, relative_distances(out, base, fine_tunes)))
    if not quiet:
        print(format_table(rows, folder))
    return rows


def format_table(rows: list[tuple[str, float, list[float]]], folder: Path) -> str:
    tasks = len(rows[0][2]) if rows else 0
    head = (
        "| method | alpha | seconds | " + " | ".join(f"dist task{t}" for t in range(tasks)) + " |"
    )
    sep = "|---" * (3 + tasks) + "|"
    lines = [
        f"isofast demo: base + {tasks} bf16 fine-tunes in {folder}",
        "dist = ||merged - fine-tune|| / ||fine-tune - base|| over all float tensors "
        "(lower is closer; 1.0 = as far as the base)",
        "",
        head,
        sep,
    ]
    for method, seconds, dists in rows:
        cells = " | ".join(f"{d:.3f}" for d in dists)
        lines.append(f"| {method} | {DEMO_ALPHA.get(method, 1.0)} | {seconds:.3f} | {cells} |")
    return "\n".join(lines)
