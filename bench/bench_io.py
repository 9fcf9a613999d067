"""End-to-end `isofast merge` time against reading the inputs (issue 3, item 4).

Task arithmetic on the LLM-shaped set of bench_memory.py (Llama layout, bf16, hidden 2048,
16 layers, a base and 4 fine-tunes, ~9.5 GB) with a warm page cache: the time of
`isofast merge` (child process, output on the same disk, fsync'ed as always) next to the time
of `cat <every input file> > /dev/null`, measured in the same run, alternating, each twice.
Task arithmetic does almost no arithmetic, so the ratio shows the overhead of the pipeline
(reading, converting, writing) over the bare cost of reading the inputs. Each round also
times a durable write (write + fsync) of as many bytes as the output, in the same folder:
`cat` pays nothing for publishing a result, the merge must, and on a slow disk that write
alone can exceed the read of a warm page cache.

    python bench/bench_io.py                       # full LLM set
    python bench/bench_io.py --layers 4 --tasks 2  # quick

Prints a markdown table, with the command that produced it. Timing, rounds and statistics
come from bench/harness.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench_memory import CheckpointSet, ensure_set, llama_shapes
from harness import (
    ChildRun,
    Spread,
    alternate,
    command_line,
    isofast_merge_command,
    machine_summary,
    markdown_table,
    run_child,
)

MiB = 2**20


def input_files(folders: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for f in folders:
        files += sorted(p for p in f.iterdir() if p.name.endswith((".safetensors", ".json")))
    return files


def add_set_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of the LLM-shaped set and of the merge run on it."""
    ap.add_argument("--dir", default="/tmp/isofast-bench", help="data folder (reused)")
    ap.add_argument("--layers", type=int, default=16, help="LLM layers (default 16)")
    ap.add_argument("--tasks", type=int, default=4, help="fine-tunes (default 4)")
    ap.add_argument("--method", default="task_arithmetic")


def llm_set(root: Path, layers: int, tasks: int) -> tuple[CheckpointSet, Path, list[Path]]:
    """The LLM-shaped set (Llama layout, bf16, hidden 2048), written under `root` once."""
    root.mkdir(parents=True, exist_ok=True)
    key = "llm-2048-bf16" + ("" if layers == 16 else f"-l{layers}")
    cs = CheckpointSet(key, "LLM bf16", llama_shapes(layers), "bfloat16", tasks, layers, 512 * MiB)
    base, models = ensure_set(root, cs, tasks)
    return cs, base, models


def time_cat(files: Sequence[Path]) -> ChildRun:
    """Wall and CPU (user + system) seconds of `cat files > /dev/null`."""
    return run_child(["cat", *map(str, files)], stdout="discard")


def time_durable_write(folder: Path, nbytes: int, block: int = 64 * MiB) -> float:
    """Wall seconds to write `nbytes` to a new file in `folder` and fsync it: the floor for
    publishing an output of that size durably (what `isofast merge` must do, and `cat` not)."""
    path = folder / ".bench-io-write-probe"
    buf = memoryview(bytearray(block))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf[: min(block, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def time_merge(
    base: Path, models: Sequence[Path], out: Path, method: str, threads: int | None
) -> ChildRun:
    """Wall and CPU (user + system) seconds of one `isofast merge` child."""
    run = run_child(isofast_merge_command(out, base, models, method, threads), attempts=3)
    shutil.rmtree(out)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_set_arguments(ap)
    ap.add_argument("--threads", type=int, default=None, help="merge threads (default all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed merges first (default 1)")
    args = ap.parse_args(argv)
    root = Path(args.dir)
    cs, base, models = llm_set(root, args.layers, args.tasks)
    key = cs.key
    files = input_files([base, *models])
    total = sum(p.stat().st_size for p in files)
    out = root / f"out-io-{key}"
    shutil.rmtree(out, ignore_errors=True)
    print(f"warming the page cache ({total / 2**30:.2f} GiB)", file=sys.stderr, flush=True)
    time_cat(files)
    time_cat(files)
    # One untimed merge too: on these VMs the first run after an idle spell pays for memory
    # the host took back (user time 3-5x the steady state, seen again and again).
    for _ in range(args.warmup):
        time_merge(base, models, out, args.method, args.threads)
    load0 = os.getloadavg()
    out_bytes = sum(p.stat().st_size for p in input_files([base]))  # same dtypes as the base

    cats: list[ChildRun] = []
    merges: list[ChildRun] = []
    writes: list[float] = []

    def after_round(index: int, _: object) -> None:
        print(
            f"  round {index + 1}: cat {cats[-1].seconds:.2f} s (cpu {cats[-1].cpu_seconds:.2f}), "
            f"merge {merges[-1].seconds:.2f} s (cpu {merges[-1].cpu_seconds:.2f}), "
            f"durable write of {out_bytes / 2**30:.2f} GiB {writes[-1]:.2f} s",
            file=sys.stderr,
        )

    sides = {
        "cat": lambda _: cats.append(time_cat(files)),
        "merge": lambda _: merges.append(time_merge(base, models, out, args.method, args.threads)),
        "write": lambda _: writes.append(time_durable_write(root, out_bytes)),
    }
    alternate(args.repeats, sides, after_round)
    load1 = os.getloadavg()
    gib = total / 2**30
    cat_s, merge_s = Spread.of(c.seconds for c in cats), Spread.of(m.seconds for m in merges)
    write_s = Spread.of(writes)

    def runs(xs: Sequence[ChildRun]) -> str:
        return ", ".join(f"{x.seconds:.2f} (cpu {x.cpu_seconds:.2f})" for x in xs)

    header = [
        "set",
        "inputs (GiB)",
        "method",
        "cat runs, s",
        "merge runs, s",
        "best cat (GiB/s)",
        "best merge (GiB/s of input)",
        "merge / cat (median wall)",
        "merge / cat (best wall)",
        "durable write of the output, s",
        "merge / (cat + durable write) (median)",
    ]
    row = [
        f"{cs.label}, {args.layers} layers, base + {args.tasks}",
        f"{gib:.2f}",
        args.method,
        runs(cats),
        runs(merges),
        f"{gib / cat_s.low:.2f}",
        f"{gib / merge_s.low:.2f}",
        f"{merge_s.median / cat_s.median:.2f}",
        f"{merge_s.low / cat_s.low:.2f}",
        ", ".join(f"{w:.2f}" for w in writes),
        f"{merge_s.median / (cat_s.median + write_s.median):.2f}",
    ]
    print(f"Command: `{command_line()}`\n")
    print(markdown_table(header, [row], right=(1, 5, 6, 7, 8, 10)))
    print(
        f"\n{machine_summary(load0, load1)}; merge threads: {args.threads or 'all'}; "
        f"{args.repeats} rounds of cat, merge, durable write, in that order"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
