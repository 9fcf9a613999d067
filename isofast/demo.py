"""`isofast demo`: build a small base model and fine-tunes on disk, merge them with every
method, and print how well each merge keeps every fine-tune's update (subspace alignment,
isofast.analysis) and how flat its spectrum is."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isofast.analysis import analyze
from isofast.api import merge
from isofast.io import CheckpointWriter
from isofast.methods import METHODS

# alpha per method for the demo (task arithmetic's usual 0.3; the others' defaults).
DEMO_ALPHA = {"task_arithmetic": 0.3, "dare_linear": 0.3, "consensus": 0.3}
TASK_DECAY = 0.5  # strength of fine-tune t+1's update relative to fine-tune t's


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
    """Base model plus `tasks` fine-tunes (low-rank task updates + small dense noise), bf16.
    Like real fine-tunes, the tasks differ in strength: each one's low-rank update is
    TASK_DECAY times as large as the previous one's, so the first dominates the task sum."""
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
                strength = 0.5 * TASK_DECAY**t
                update = (u @ v) / np.sqrt(arr.shape[0] * arr.shape[1]) * strength
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


def run_demo(folder: Path, tasks: int = 4, quiet: bool = False) -> list[DemoRow]:
    """Merge the demo models with every method (timed), then analyse every method's update in
    one pass: per-task alignment (SAR) and the spectrum's flatness."""
    base, fine_tunes = write_demo_models(folder, tasks)
    methods = list(dict.fromkeys(spec.name for spec in METHODS.values()))
    seconds = {}
    for method in methods:
        start = time.perf_counter()
        merge(
            base, fine_tunes, method, DEMO_ALPHA.get(method, 1.0), out=folder / f"merged-{method}"
        )
        seconds[method] = time.perf_counter() - start
    data = analyze(base, fine_tunes, methods=methods)
    rows = [
        DemoRow(
            m,
            seconds[m],
            data["summary"][m]["min_task_sar"],
            data["summary"][m]["mean_task_sar"],
            data["summary"][m]["mean_flatness"],
        )
        for m in methods
    ]
    if not quiet:
        print(format_table(rows, folder, tasks))
    return rows


@dataclass(frozen=True)
class DemoRow:
    method: str
    seconds: float
    min_sar: float  # the least aligned fine-tune
    mean_sar: float
    flatness: float  # of the merged update's spectrum, mean over matrices


def format_table(rows: list[DemoRow], folder: Path, tasks: int) -> str:
    lines = [
        f"isofast demo: base + {tasks} bf16 fine-tunes in {folder}",
        "SAR = how much of each fine-tune's update lies in the merged update's dominant "
        "directions (1 = kept, 0 = ignored; min = the task the merge neglects most); "
        "flatness = 1 when every direction of the update is equally strong. "
        "Higher is better for both.",
        "",
        "| method | alpha | seconds | min task SAR | mean task SAR | flatness |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {DEMO_ALPHA.get(r.method, 1.0)} | {r.seconds:.3f} | "
            f"{r.min_sar:.3f} | {r.mean_sar:.3f} | {r.flatness:.3f} |"
        )
    lines.append("")
    lines.append(f"details per layer and task: isofast analyze ({len(rows)} methods at once)")
    return "\n".join(lines)
