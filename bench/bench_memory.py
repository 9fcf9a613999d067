"""Peak memory of `isofast merge` on checkpoints on disk (issue 3, item 3).

Generates two checkpoint sets on local disk (reused when present):

* ViT-L/14: the CLIP ViT-L/14 visual tower (OpenCLIP names and shapes, 24 blocks, width
  1024), fp32, a base model and 20 fine-tunes (~1.2 GB each, ~25 GB in all);
* LLM: a Llama layout, bf16, hidden 2048, 16 layers, q/k/v/o 2048x2048, gate/up 5632x2048,
  down 2048x5632, RMS norms, embed_tokens and lm_head 32000x2048, a base and 4 fine-tunes
  (~1.9 GB each, ~9.5 GB in all).

Then runs `isofast merge` for iso_cts and ties on each set in a child process under
`/usr/bin/time -v`, and reports its peak RSS against the bound

    (T + 4) x (largest tensor in fp32 bytes) + 500 MiB

for the full model and for a view of it with half the layers (an index over the same shard
files listing only the first half of the blocks), to show that peak memory does not grow with
the number of layers. While the child runs, /proc/<pid>/status is sampled for the split of
RSS into anonymous memory (RssAnon: what the merge allocates) and mapped file pages (RssFile:
pages of the memory-mapped inputs, which the kernel can drop at any time).

    python bench/bench_memory.py                          # full: ViT-L/14 x 20, LLM x 4
    python bench/bench_memory.py --blocks 2 --tasks 4 --llm-layers 2 --llm-tasks 2   # quick

Prints a markdown table, with the command that produced it. Needs `/usr/bin/time` (apt-get
install time). Child runs, GNU time and the /proc sampling come from bench/harness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from harness import (
    GNU_TIME,
    ChildRun,
    MiB,
    command_line,
    isofast_merge_command,
    markdown_table,
    run_child,
)
from shapes import get_model, tensor_shapes

from isofast.io import INDEX_NAME, SINGLE_NAME, CheckpointWriter

FIXED_MIB = 500
MARKER = ".isofast-bench-complete"


# ----------------------------------------------------------------------------- shapes


def vit_l14_shapes(blocks: int = 24) -> dict[str, tuple[int, ...]]:
    """CLIP ViT-L/14 visual tower, OpenCLIP names (the table of bench/shapes.py)."""
    return tensor_shapes(get_model("L/14"), blocks)


def llama_shapes(
    layers: int = 16, hidden: int = 2048, inter: int = 5632, vocab: int = 32000
) -> dict[str, tuple[int, ...]]:
    """A Llama-layout LLM (TinyLlama-1.1B sizes, but without grouped-query attention)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        b = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{b}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[b + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[b + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[b + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[b + "input_layernorm.weight"] = (hidden,)
        shapes[b + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


_LAYER = re.compile(r"(?:resblocks|layers)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CheckpointSet:
    key: str  # folder name under --dir
    label: str
    shapes: dict[str, tuple[int, ...]]
    dtype: str  # float32 | bfloat16
    tasks: int
    layers: int
    shard_bytes: int

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def model_bytes(self) -> int:
        return sum(numel(s) for s in self.shapes.values()) * self.itemsize

    @property
    def largest_fp32_bytes(self) -> int:
        return max(numel(s) for s in self.shapes.values()) * 4

    def bound_bytes(self, tasks: int) -> int:
        return (tasks + 4) * self.largest_fp32_bytes + FIXED_MIB * MiB


def _tensor(name_index: int, shape: tuple[int, ...], model: int, base_seed: int) -> torch.Tensor:
    """Base weights N(0, 0.02^2); fine-tune `model` (1-based) adds N(0, 0.001^2)."""
    gen = torch.Generator().manual_seed(base_seed * 1_000_003 + name_index)
    x = 0.02 * torch.randn(shape, generator=gen)
    if model > 0:
        gen.manual_seed(base_seed * 1_000_003 + name_index + 7_919 * model * 1_000_033)
        x += 1e-3 * torch.randn(shape, generator=gen)
    return x


def _write_model(folder: Path, cs: CheckpointSet, model: int, seed: int) -> None:
    stamp = json.dumps({"set": cs.key, "dtype": cs.dtype, "model": model, "seed": seed})
    if (folder / MARKER).exists() and (folder / MARKER).read_text() == stamp:
        return
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    with CheckpointWriter(folder, cs.shard_bytes, {"bench": cs.key}) as w:
        for i, (name, shape) in enumerate(cs.shapes.items()):
            x = _tensor(i, shape, model, seed)
            if cs.dtype == "bfloat16":
                w.add(name, x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), "BF16")
            else:
                w.add(name, x.numpy())
    (folder / MARKER).write_text(stamp)
    print(
        f"  wrote {folder} ({cs.model_bytes / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )


def model_dirs(root: Path, cs: CheckpointSet, tasks: int) -> tuple[Path, list[Path]]:
    top = root / cs.key
    return top / "base", [top / f"ft{t:02d}" for t in range(tasks)]


def ensure_set(root: Path, cs: CheckpointSet, tasks: int, seed: int = 0) -> tuple[Path, list[Path]]:
    base, fts = model_dirs(root, cs, tasks)
    _write_model(base, cs, 0, seed)
    for t, folder in enumerate(fts):
        _write_model(folder, cs, t + 1, seed)
    return base, fts


def make_view(src: Path, dst: Path, keep: Callable[[str], bool]) -> Path:
    """A checkpoint folder over the shard files of `src` whose index lists only the kept
    tensors (readers ignore tensors of a shard that the index does not list)."""
    if (src / INDEX_NAME).exists():
        weight_map = json.loads((src / INDEX_NAME).read_text())["weight_map"]
    else:
        from isofast.io import CheckpointReader

        reader = CheckpointReader(src)
        weight_map = dict.fromkeys(reader.names(), SINGLE_NAME)
        reader.close()
    kept = {k: v for k, v in weight_map.items() if keep(k)}
    dst.mkdir(parents=True, exist_ok=True)
    for shard in sorted(set(kept.values())):
        link = dst / shard
        if not link.exists():
            link.symlink_to((src / shard).resolve())
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": kept}, indent=1))
    return dst


# ----------------------------------------------------------------------------- measuring


@dataclass
class Run:
    label: str
    layers: int
    tasks: int
    method: str
    largest_fp32: int
    bound: int
    plan_peak: int
    child: ChildRun

    @property
    def max_rss(self) -> int:
        return self.child.max_rss or 0

    @property
    def ok(self) -> bool:
        return self.max_rss <= self.bound


def plan_peak(base: Path, models: Sequence[Path], method: str, threads: int | None) -> int:
    """isofast's own estimate of the merge's peak memory (reads the headers only)."""
    import isofast

    plan = isofast.plan(str(base), [str(m) for m in models], method=method, threads=threads)
    peak: int = plan.peak_bytes
    return peak


def measure(
    base: Path, models: Sequence[Path], method: str, out: Path, threads: int | None
) -> ChildRun:
    """One `isofast merge` child under `/usr/bin/time -v` (peak RSS), its /proc samples
    (RssAnon / RssFile) and its wall time. A child that fails within seconds (e.g. the
    package is being rebuilt under it) is retried after a pause."""
    cmd = isofast_merge_command(out, base, models, method, threads)
    run = run_child(cmd, gnu_time=True, sample_rss=True, attempts=3)
    shutil.rmtree(out, ignore_errors=True)
    return run


# ----------------------------------------------------------------------------- main


def _fit_tasks(root: Path, cs: CheckpointSet, tasks: int, margin: int = 3 * 2**30) -> int:
    """Fewest-changes task count that fits the free disk space (existing models count)."""
    free = shutil.disk_usage(root).free
    base, fts = model_dirs(root, cs, tasks)
    missing = [p for p in [base, *fts] if not (p / MARKER).exists()]
    need = len(missing) * cs.model_bytes + 2 * cs.model_bytes + margin  # + outputs
    if need <= free:
        return tasks
    have = tasks + 1 - len(missing)
    fit = have + (free - 2 * cs.model_bytes - margin) // cs.model_bytes - 1
    fit = max(1, min(tasks, int(fit)))
    print(
        f"NOTE: {free / 2**30:.1f} GiB free under {root}, {need / 2**30:.1f} GiB needed for "
        f"{cs.label} x {tasks}: using {fit} fine-tunes instead",
        file=sys.stderr,
    )
    return fit


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f}"


def table(runs: Sequence[Run]) -> str:
    header = ["set", "layers", "T", "method", "largest tensor (fp32 MiB)", "bound (MiB)"]
    header += ["plan estimate (MiB)", "peak RSS (MiB)", "peak RssAnon (MiB)"]
    header += ["peak RssFile (MiB)", "within bound", "wall (s)"]
    rows = [
        [
            r.label, r.layers, r.tasks, r.method, _mib(r.largest_fp32), _mib(r.bound),
            _mib(r.plan_peak), _mib(r.max_rss), _mib(r.child.rss_anon), _mib(r.child.rss_file),
            "yes" if r.ok else "NO", f"{r.child.seconds:.0f}",
        ]
        for r in runs
    ]  # fmt: skip
    return markdown_table(header, rows, right=(1, 2, 4, 5, 6, 7, 8, 9, 11))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--dir", default="/tmp/isofast-bench", help="data folder (reused)")
    ap.add_argument("--blocks", type=int, default=24, help="ViT-L/14 blocks (default 24)")
    ap.add_argument("--tasks", type=int, default=20, help="ViT-L/14 fine-tunes (default 20)")
    ap.add_argument("--llm-layers", type=int, default=16, help="LLM layers (default 16)")
    ap.add_argument("--llm-tasks", type=int, default=4, help="LLM fine-tunes (default 4)")
    ap.add_argument("--sets", default="vit,llm", help="comma list of vit, llm")
    ap.add_argument("--methods", default="iso_cts,ties", help="comma list of methods")
    ap.add_argument("--threads", type=int, default=None, help="merge threads (default all)")
    ap.add_argument("--no-half", action="store_true", help="skip the half-layer runs")
    ap.add_argument("--only-half", action="store_true", help="run the half-layer views only")
    args = ap.parse_args(argv)
    if not os.path.exists(GNU_TIME):
        print(f"{GNU_TIME} not found: apt-get install time", file=sys.stderr)
        return 1
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    wanted = set(args.sets.split(","))
    sets: list[CheckpointSet] = []
    if "vit" in wanted:
        key = "vit-l14-fp32" + ("" if args.blocks == 24 else f"-b{args.blocks}")
        sets.append(
            CheckpointSet(
                key, "ViT-L/14 fp32", vit_l14_shapes(args.blocks), "float32", args.tasks,
                args.blocks, 256 * MiB,
            )
        )  # fmt: skip
    if "llm" in wanted:
        key = "llm-2048-bf16" + ("" if args.llm_layers == 16 else f"-l{args.llm_layers}")
        sets.append(
            CheckpointSet(
                key, "LLM bf16 (Llama layout)", llama_shapes(args.llm_layers), "bfloat16",
                args.llm_tasks, args.llm_layers, 512 * MiB,
            )
        )  # fmt: skip
    usage = shutil.disk_usage(root)
    print(f"disk under {root}: {usage.free / 2**30:.1f} GiB free", file=sys.stderr)
    runs: list[Run] = []
    for cs in sets:
        tasks = _fit_tasks(root, cs, cs.tasks)
        print(f"{cs.label}: base + {tasks} fine-tunes under {root / cs.key}", file=sys.stderr)
        base, models = ensure_set(root, cs, tasks)
        variants = [] if args.only_half else [(cs.layers, base, models)]
        if not args.no_half and cs.layers >= 2:
            half = cs.layers // 2

            def keep(name: str, half: int = half) -> bool:
                layer = layer_of(name)
                return layer is None or layer < half

            view = root / f"{cs.key}-half{half}"
            variants.append(
                (
                    half,
                    make_view(base, view / "base", keep),
                    [make_view(m, view / m.name, keep) for m in models],
                )
            )
        for layers, b, ms in variants:
            for method in args.methods.split(","):
                out = root / f"out-{cs.key}-{method}-{layers}"
                estimate = plan_peak(b, ms, method, args.threads)
                child = measure(b, ms, method, out, args.threads)
                run = Run(
                    cs.label, layers, tasks, method, cs.largest_fp32_bytes,
                    cs.bound_bytes(tasks), estimate, child,
                )  # fmt: skip
                runs.append(run)
                print(table([run]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"Command: `{command_line()}`\n")
    print(table(runs))
    return 0 if all(r.ok for r in runs) else 3


if __name__ == "__main__":
    sys.exit(main())
