"""Seeded synthetic task vectors (bench/shapes.py) cached on disk, and other cached results.

One folder per (model, blocks, T, seed) under the cache directory (`$ISOFAST_BENCH_CACHE`,
default /tmp/isofast-bench-cache), holding `task{t}.pt` for every task: generating ViT-B/32
inputs takes seconds to minutes, loading them a fraction of that. bench_methods.py,
profile_merge.py and the pytest-benchmark suite share the folders.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import shapes
import torch

GEN_VERSION = 1  # bump when bench/shapes.py changes the generated values
DEFAULT_CACHE = os.environ.get("ISOFAST_BENCH_CACHE", "/tmp/isofast-bench-cache")

StateDict = dict[str, torch.Tensor]


def inputs_dir(cache: str | Path, model: str, blocks: int, tasks: int, seed: int = 0) -> Path:
    tag = f"{model.replace('/', '')}-b{blocks}-T{tasks}-s{seed}-g{GEN_VERSION}"
    return Path(cache) / f"inputs-{tag}"


def _save(value: object, path: Path) -> None:
    """Write-then-rename, so that an interrupted run never leaves a truncated file behind."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)


def write_inputs(folder: Path, model: str, blocks: int, tasks: int, seed: int = 0) -> None:
    """Generate the T task-vector dicts and store them in `folder` (done marker last)."""
    vectors = shapes.make_task_vectors(shapes.get_model(model), tasks, blocks, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for t, vector in enumerate(vectors):
        _save(vector, folder / f"task{t}.pt")
    (folder / "done").write_text("ok\n")


def load_inputs(folder: Path, tasks: int, dtype: str = "float32") -> list[StateDict]:
    vectors: list[StateDict] = []
    for t in range(tasks):
        vector: StateDict = torch.load(folder / f"task{t}.pt", weights_only=True)
        if dtype == "float64":
            vector = {k: v.double() for k, v in vector.items()}
        vectors.append(vector)
    return vectors


def task_vectors(
    cache: str | Path, model: str, blocks: int, tasks: int, seed: int = 0
) -> list[StateDict]:
    """The cached inputs, generated first if they are not there yet."""
    folder = inputs_dir(cache, model, blocks, tasks, seed)
    if not (folder / "done").exists():
        write_inputs(folder, model, blocks, tasks, seed)
    return load_inputs(folder, tasks)


def cached_state_dict(path: Path, compute: Callable[[], StateDict]) -> StateDict:
    """`compute()`, stored at `path` the first time and loaded from there afterwards."""
    if path.exists():
        loaded: StateDict = torch.load(path, weights_only=True)
        return loaded
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(value, path)
    return value
