"""The Ray executor against the local one (issue 14), and a paper model of a large merge.

Part 1 (measured): `isofast merge` of the LLM-shaped set of bench_io.py (Llama layout, bf16,
hidden 2048, base + 4 fine-tunes) with `--executor local`, with `--executor ray --ray-address
local` starting its own Ray instance (what `--executor ray` does on a machine without one),
and with `--ray-address auto` joining a Ray instance the script started once with 2 CPUs (2
worker processes: the executor without Ray's start-up). Every side writes the same output
shards (`--out-shard-size`, default 500MB: one Ray task per shard); the script checks that the
outputs are the same bytes. Sides alternate, each `--repeats` times; wall time, CPU time and
the driver's peak RSS (GNU time) per run; ratios of medians against the local executor.

Part 2 (model): the time of a large merge (default: a 120B-class Llama layout, bf16, base + 8)
on N nodes, from the plan's own byte counts and shard layout (a plan of header-only sparse
checkpoints: nothing is read but headers) and the per-node throughput measured in part 1, for
given per-node read/write bandwidth and shared-storage bandwidth. It says which resource
limits the merge at each N.

    pip install 'isofast[ray]'                      # Ray, into the environment of isofast
    python bench/bench_ray.py                       # 16 layers (~9.5 GB of inputs)
    python bench/bench_ray.py --layers 4 --repeats 2   # quick

Ray is started with `ray start --head --num-cpus 2` (and stopped at the end) for the joined
side; OPENBLAS_* settings are left as they are (task arithmetic calls no BLAS).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench_io import add_set_arguments, input_files, llm_set, time_cat
from bench_memory import llama_shapes
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
GB = 10**9


def ray_command() -> str:
    found = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    if not Path(found).exists():
        sys.exit("Ray is not installed: pip install 'isofast[ray]'")
    return found


def start_ray_head(cpus: int) -> str:
    """A local Ray instance (`ray start --head`); its address."""
    out = subprocess.run(
        [ray_command(), "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"--address='([^']+)'", out)
    if not found:
        sys.exit(f"cannot find the address of the Ray instance in:\n{out}")
    return found.group(1)


def stop_ray() -> None:
    subprocess.run([ray_command(), "stop", "--force"], capture_output=True, check=False)


def folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(16 * MiB):
                h.update(chunk)
    return h.hexdigest()


def merge_command(
    out: Path, base: Path, models: Sequence[Path], args: argparse.Namespace, extra: list[str]
) -> list[str]:
    cmd = isofast_merge_command(out, base, models, args.method, None)
    return [*cmd, "--out-shard-size", args.shard_size, *extra]


# ----------------------------------------------------------------------------- part 2


@dataclass(frozen=True)
class BigMerge:
    """What the plan says about the large merge."""

    label: str
    input_bytes: int
    output_bytes: int
    shards: int
    largest_shard_input: int  # bytes the slowest task reads
    task_peak_bytes: int  # a task's planned peak memory


def plan_big_merge(
    hidden: int, inter: int, layers: int, tasks: int, method: str, shard_size: str
) -> BigMerge:
    """Plan the merge of header-only sparse checkpoints (no data is read or stored)."""
    import isofast
    from isofast.io import CheckpointWriter
    from isofast.io.safetensors_format import encode_header, pack_header_length
    from isofast.io.shards import lay_out_shards
    from isofast.pipeline import shard_entries, write_order
    from isofast.request import parse_size

    shapes = llama_shapes(layers, hidden, inter)
    with tempfile.TemporaryDirectory(prefix="isofast-bench-ray-") as tmp:
        folders = []
        for m in range(tasks + 1):
            entries, at = [], 0
            for name, shape in shapes.items():
                size = math.prod(shape) * 2
                entries.append((name, "BF16", shape, at, at + size))
                at += size
            header = encode_header(entries, {"format": "pt"})
            folder = Path(tmp) / f"m{m}"
            folder.mkdir()
            with open(folder / "model.safetensors", "wb") as f:
                f.write(pack_header_length(len(header)) + header)
                f.truncate(8 + len(header) + at)  # sparse: the data is never read
            folders.append(folder)
        plan = isofast.plan(folders[0], folders[1:], method, threads=1)
        shards = lay_out_shards(
            shard_entries(write_order(plan)),
            parse_size(shard_size),
            {"format": "pt"},
            CheckpointWriter.initial_header_reserve,
        )
    per_tensor = {t.name: t.out_bytes * (tasks + 1) for t in plan.tensors}
    largest = max(sum(per_tensor[n] for n in s.names) for s in shards)
    params = sum(math.prod(s) for s in shapes.values())
    return BigMerge(
        f"Llama layout {params / 1e9:.0f}B (hidden {hidden}, {layers} layers), bf16, base + "
        f"{tasks}, {method}",
        plan.input_bytes,
        plan.output_bytes,
        len(shards),
        largest,
        plan.peak_bytes,
    )


def model_rows(
    big: BigMerge,
    nodes: Sequence[int],
    node_merge_gbps: float,
    node_read_gbps: float,
    node_write_gbps: float,
    shared_gbps: float,
) -> list[list[str]]:
    """Per N: hours, and which resource sets it. A node runs its tasks at its merge throughput
    (GB of input per second), reads no faster than its link, and all nodes together read and
    write no faster than the shared storage; at most `shards` tasks run at once."""
    rows = []
    for n in nodes:
        busy = min(n, big.shards)  # nodes with a task to run
        limits = {
            "node merge throughput": big.input_bytes / (busy * node_merge_gbps * GB),
            "node read bandwidth": big.input_bytes / (busy * node_read_gbps * GB),
            "node write bandwidth": big.output_bytes / (busy * node_write_gbps * GB),
            "shared storage": (big.input_bytes + big.output_bytes) / (shared_gbps * GB),
            "largest shard (one task)": big.largest_shard_input / (node_merge_gbps * GB),
        }
        limit = max(limits, key=lambda k: limits[k])
        rows.append([str(n), f"{limits[limit] / 3600:.2f}", limit])
    return rows


def print_model(args: argparse.Namespace, node_gbps: float, how: str) -> None:
    hidden, inter, layers = (int(x) for x in args.big.split(","))
    big = plan_big_merge(hidden, inter, layers, args.big_tasks, args.big_method, args.shard_size)
    print(
        f"\n{big.label}: {big.input_bytes / 1e12:.2f} TB to read, "
        f"{big.output_bytes / 1e9:.0f} GB to write, {big.shards} output shards of "
        f"{args.shard_size} (at most {big.shards} tasks at once), a task's planned peak "
        f"{big.task_peak_bytes / 2**30:.1f} GiB. Per node: merge {node_gbps:.2f} GB/s of input "
        f"({how}), read {args.node_read_gbps} GB/s, write {args.node_write_gbps} GB/s; shared "
        f"storage {args.shared_gbps} GB/s.\n"
    )
    nodes = [int(n) for n in args.nodes.split(",")]
    table = model_rows(
        big, nodes, node_gbps, args.node_read_gbps, args.node_write_gbps, args.shared_gbps
    )
    print(markdown_table(["nodes", "hours", "limited by"], table, right=(1,)))


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_set_arguments(ap)
    ap.add_argument("--shard-size", default="500MB", help="output shard size (one Ray task each)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the joined Ray instance")
    # Part 2: the large merge and the cluster it runs on.
    ap.add_argument("--big", default="10240,27648,96", help="hidden,intermediate,layers")
    ap.add_argument("--big-tasks", type=int, default=8)
    ap.add_argument("--big-method", default="task_arithmetic")
    ap.add_argument("--node-read-gbps", type=float, default=3.0, help="per node (25 GbE ~ 3)")
    ap.add_argument("--node-write-gbps", type=float, default=1.5, help="per node")
    ap.add_argument("--shared-gbps", type=float, default=20.0, help="shared storage, all nodes")
    ap.add_argument("--node-cores", type=int, default=64, help="cores per node of the model")
    ap.add_argument("--nodes", default="1,2,4,8,16,32,64")
    ap.add_argument(
        "--node-merge-gbps",
        type=float,
        help="per-node merge throughput (GB of input/s) for part 2; given: part 1 is skipped",
    )
    args = ap.parse_args(argv)
    if args.node_merge_gbps is not None:
        print(f"Command: `{command_line()}`\n")
        print_model(args, args.node_merge_gbps, "given")
        return 0

    root = Path(args.dir)
    cs, base, models = llm_set(root, args.layers, args.tasks)
    key = cs.key
    files = input_files([base, *models])
    gib = sum(p.stat().st_size for p in files) / 2**30
    time_cat(files)
    time_cat(files)  # a warm page cache for every side

    stop_ray()
    print(f"Ray instance at {start_ray_head(args.cpus)}", file=sys.stderr)
    sides_extra = {
        "local": ["--executor", "local"],
        "ray, own instance": ["--executor", "ray", "--ray-address", "local"],
        f"ray, joined ({args.cpus} CPUs)": ["--executor", "ray", "--ray-address", "auto"],
    }
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    digests: dict[str, str] = {}
    runs: dict[str, list[ChildRun]] = {name: [] for name in sides_extra}
    load0 = os.getloadavg()

    def side(name: str, extra: list[str]) -> None:
        out = root / f"out-ray-{key}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = merge_command(out, base, models, args, extra)
        run = run_child(cmd, gnu_time=True, env=env, attempts=2)
        runs[name].append(run)
        digests.setdefault(name, folder_digest(out))
        shutil.rmtree(out)
        print(f"  {name}: {run.seconds:.2f} s (cpu {run.cpu_seconds:.2f})", file=sys.stderr)

    try:
        alternate(
            args.repeats, {n: (lambda _, n=n, e=e: side(n, e)) for n, e in sides_extra.items()}
        )
    finally:
        stop_ray()
    load1 = os.getloadavg()
    same = len(set(digests.values())) == 1
    local = Spread.of(r.seconds for r in runs["local"])
    rows = []
    for name, side_runs in runs.items():
        wall = Spread.of(r.seconds for r in side_runs)
        rss = max(r.max_rss or 0 for r in side_runs)
        rows.append(
            [
                name,
                ", ".join(f"{r.seconds:.2f} (cpu {r.cpu_seconds:.2f})" for r in side_runs),
                f"{wall.median:.2f}",
                f"{wall.median / local.median:.2f}x",
                f"{gib / wall.median:.2f}",
                f"{rss / MiB:,.0f}",
            ]
        )
    print(f"Command: `{command_line()}`\n")
    header = [
        "executor",
        "runs, s",
        "median, s",
        "vs local",
        "GiB/s of input",
        "driver peak RSS, MiB",
    ]
    print(markdown_table(header, rows, right=(2, 3, 4, 5)))
    print(
        f"\n{cs.label}, {args.layers} layers, base + {args.tasks}, {gib:.2f} GiB of inputs, "
        f"{args.method}, output shards of {args.shard_size}; outputs identical: "
        f"{'yes' if same else 'NO'}; {machine_summary(load0, load1)}; {args.repeats} rounds"
    )

    # Part 2: per-node merge throughput from this machine's local run, scaled to the node's
    # cores (task arithmetic is bound by reading, so this is generous to compute).
    cores = len(os.sched_getaffinity(0))
    measured = gib * 2**30 / GB / local.median  # GB of input per second on `cores` cores
    how = f"{measured:.2f} GB/s measured here on {cores} cores, scaled to {args.node_cores}"
    print_model(args, measured * args.node_cores / cores, how)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
