"""End-to-end merge of checkpoints on disk: `isofast merge` against the reference loop that first
loads every checkpoint into memory (safetensors -> torch), merges key by key with
torch.linalg.svd, and saves the result. ViT-B/32-shaped fp32 checkpoints, T fine-tunes.

    python bench/bench_e2e.py --tasks 8 --method iso_c --threads 2

Each side runs in its own child process (peak RSS from getrusage), twice, with a warm page
cache (all input files are read once before timing). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

REFERENCE_CHILD = r"""
import sys, time, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
sys.path.insert(0, {bench!r})
from reference_impl import reference_update
torch.set_num_threads({threads})
root, method, out = Path({root!r}), {method!r}, Path({out!r})
base = load_file(root / "base" / "model.safetensors")
tuned = [load_file(p / "model.safetensors") for p in sorted(root.glob("task*"))]
tvs = [{{k: t[k] - base[k] for k in base}} for t in tuned]
update = reference_update(method, tvs)
merged = {{k: (base[k] + update[k]).contiguous() for k in base}}
out.mkdir(parents=True, exist_ok=True)
save_file(merged, str(out / "model.safetensors"))
"""


def make_checkpoints(root: Path, tasks: int, blocks: int | None) -> list[Path]:
    """Base + `tasks` fine-tunes of a ViT-B/32 visual tower as single-file safetensors."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(HERE))
    from shapes import get_model, make_task_vectors, tensor_shapes

    model = get_model("B/32")
    marker = root / f".complete-{tasks}-{blocks}"
    if marker.exists():
        return sorted(root.glob("*/model.safetensors"))
    shutil.rmtree(root, ignore_errors=True)
    gen = torch.Generator().manual_seed(0)
    base = {
        n: 0.02 * torch.randn(s, generator=gen) for n, s in tensor_shapes(model, blocks).items()
    }
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    for t, tv in enumerate(make_task_vectors(model, tasks, blocks)):
        (root / f"task{t}").mkdir()
        save_file({k: base[k] + tv[k] for k in base}, str(root / f"task{t}" / "model.safetensors"))
    marker.touch()
    return sorted(root.glob("*/model.safetensors"))


def warm(files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return time.perf_counter() - start


def run_child(cmd: list[str], rss_file: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child process, RSS from GNU time."""
    start = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd], check=True)
    return time.perf_counter() - start, int(rss_file.read_text().split()[-1]) / 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--method", default="iso_c", choices=["iso_c", "iso_cts", "tsv_m"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--blocks", type=int, default=None, help="first N blocks only (quick runs)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/isofast-bench/vitb32-e2e"))
    args = ap.parse_args(argv)

    root = args.dir / f"T{args.tasks}-b{args.blocks}"
    files = make_checkpoints(root, args.tasks, args.blocks)
    size = sum(f.stat().st_size for f in files) / 2**30
    read_s = min(warm(files) for _ in range(2))
    work = args.dir / "out"
    models = [str(p) for p in sorted(root.glob("task*"))]
    iso_cmd = [
        sys.executable,
        "-m",
        "isofast.cli",
        "merge",
        str(work / "iso"),
        "--base",
        str(root / "base"),
        *[arg for m in models for arg in ("--model", m)],
        "--method",
        args.method,
        "--threads",
        str(args.threads),
        "--quiet",
        "--overwrite",
    ]
    ref_code = REFERENCE_CHILD.format(
        bench=str(HERE),
        threads=args.threads,
        root=str(root),
        method=args.method,
        out=str(work / "ref"),
    )
    ref_cmd = [sys.executable, "-c", ref_code]
    times: dict[str, list[float]] = {"reference": [], "isofast": []}
    rss: dict[str, float] = {}
    work.mkdir(parents=True, exist_ok=True)
    for _ in range(args.repeats):
        for side, cmd in (("reference", ref_cmd), ("isofast", iso_cmd)):
            seconds, peak = run_child(cmd, work / f"{side}.rss")
            times[side].append(seconds)
            rss[side] = max(rss.get(side, 0.0), peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"inputs: {len(files)} files, {size:.2f} GiB, warm read {read_s:.2f} s; "
        f"method {args.method}, T = {args.tasks}, threads = {args.threads}, "
        f"blocks = {args.blocks or 'all'}"
    )
    print()
    print("| side | median s | runs | peak RSS MiB |")
    print("|---|---|---|---|")
    for side in ("reference", "isofast"):
        runs = ", ".join(f"{t:.1f}" for t in times[side])
        print(f"| {side} | {med[side]:.1f} | {runs} | {rss.get(side, float('nan')):.0f} |")
    print()
    print(f"speed ratio reference / isofast: {med['reference'] / med['isofast']:.2f}x")


if __name__ == "__main__":
    main()
