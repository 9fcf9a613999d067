"""End-to-end merge of checkpoints on disk: `isofast merge` against the reference loop that first
loads every checkpoint into memory (safetensors -> torch), merges key by key with
torch.linalg.svd, and saves the result. ViT-B/32-shaped fp32 checkpoints, T fine-tunes.

    python bench/bench_e2e.py --tasks 8 --method iso_c --threads 2

Each side runs in its own child process (peak RSS from GNU time), twice, alternating, with a
warm page cache (all input files are read once before timing). Prints a markdown table, with
the command that produced it. Timing, rounds and statistics come from bench/harness.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import harness
from harness import ChildRun

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
    iso_cmd = harness.isofast_merge_command(
        work / "iso", root / "base", sorted(root.glob("task*")), args.method, args.threads
    )
    ref_code = REFERENCE_CHILD.format(
        bench=str(HERE),
        threads=args.threads,
        root=str(root),
        method=args.method,
        out=str(work / "ref"),
    )
    ref_cmd = [sys.executable, "-c", ref_code]
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    runs = harness.alternate(
        args.repeats,
        {
            "reference": lambda _: harness.run_child(ref_cmd, gnu_time=True),
            "isofast": lambda _: harness.run_child(iso_cmd, gnu_time=True),
        },
    )
    load1 = os.getloadavg()
    print(f"Command: `{harness.command_line()}`")
    print()
    print(
        f"inputs: {len(files)} files, {size:.2f} GiB, warm read {read_s:.2f} s; "
        f"method {args.method}, T = {args.tasks}, threads = {args.threads}, "
        f"blocks = {args.blocks or 'all'}; {harness.machine_summary(load0, load1)}"
    )
    print()
    print(
        harness.markdown_table(
            ["side", "median s", "runs", "peak RSS MiB"], map(_row, runs.items())
        )
    )
    print()
    seconds = {side: [r.seconds for r in side_runs] for side, side_runs in runs.items()}
    ratio = harness.ratio_of_medians(seconds["reference"], seconds["isofast"])
    print(f"speed ratio reference / isofast: {ratio:.2f}x")


def _row(item: tuple[str, list[ChildRun]]) -> list[str]:
    side, runs = item
    seconds = harness.Spread.of(r.seconds for r in runs)
    peak = max(r.max_rss or 0 for r in runs) / 2**20
    return [
        side,
        f"{seconds.median:.1f}",
        ", ".join(f"{r.seconds:.1f}" for r in runs),
        f"{peak:.0f}",
    ]


if __name__ == "__main__":
    main()
