"""Benchmark isofast's matrix methods against the published reference loop, side by side.

For each model (CLIP ViT visual tower shapes, bench/shapes.py), task count T and method, the
reference loop (bench/reference_impl.py, PyTorch) and `isofast.merge` run on the same seeded
synthetic task vectors with the same thread count, each side `--repeats` times, alternating
(ref, isofast, ref, isofast, ...). Every run is its own child process, so that its peak
resident memory can be measured (peak RSS minus the RSS once the inputs are loaded; the peak
counter is reset through /proc/self/clear_refs). Errors are relative Frobenius errors of the
merged update M against a float64 run of the reference (cached on disk, like the inputs).

Fairness notes, also printed with the results:
- The base model is all zeros, so a fine-tune equals its task vector, both sides get exactly
  the same D_t, and M = merged - base is exact in float32 (no rounding of theta0 + M). The
  cost of every operation does not depend on the values.
- The reference side starts from task-vector dicts already in memory (as the published code
  does after loading the checkpoints); its timed region is M = ref(task vectors) plus
  theta = theta0 + alpha * M. isofast's timed region is the whole `isofast.merge` call, which
  also forms the task vectors.
- torch's CPU SVD is LAPACK gesdd from the MKL linked into torch; isofast uses OpenBLAS
  (scipy-openblas32). Both libraries are printed.

`python bench/bench_methods.py --quick` (B/32, one block, T=8) is the run to repeat often: its
inputs and float64 references are cached after the first time (see bench/README.md for times).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shapes as shp  # noqa: E402
import synthetic_inputs  # noqa: E402
from harness import (  # noqa: E402
    PeakMemory,
    Spread,
    alternate,
    command_line,
    machine_summary,
    markdown_table,
    run_child,
)

RESULT_MARK = "@@RESULT@@ "
METHODS = ("iso_cts", "tsv_m", "iso_c")
OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
QUICK = {"models": ["B/32"], "tasks": [8], "blocks": 1, "methods": list(METHODS)}


# ----------------------------------------------------------------------------- child side


def _blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl not installed (pip install threadpoolctl)"}]
    keep = (
        "internal_api",
        "prefix",
        "version",
        "architecture",
        "threading_layer",
        "num_threads",
        "filepath",
    )
    return [{k: v for k, v in lib.items() if k in keep} for lib in threadpool_info()]


def _errors(merged: dict[str, Any], reference_path: str) -> dict[str, Any]:
    import torch

    ref = torch.load(reference_path, mmap=True, weights_only=True)
    num = den = 0.0
    worst, worst_key = 0.0, ""
    for name, exact in ref.items():
        if exact.dim() != 2:
            continue
        exact64 = exact.double()
        diff = float(torch.linalg.matrix_norm(merged[name].double() - exact64) ** 2)
        norm = float(torch.linalg.matrix_norm(exact64) ** 2)
        num, den = num + diff, den + norm
        rel = math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)
        if rel >= worst:
            worst, worst_key = rel, name
    return {
        "err_global": math.sqrt(num / den) if den > 0 else 0.0,
        "err_worst": worst,
        "err_worst_key": worst_key.removeprefix(shp.PREFIX),
    }


def _core_build() -> dict[str, str]:
    """Which compiled core ran: file, modification time and a short sha256."""
    from isofast._native import core

    path = Path(core.__file__ or "")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
    return {"file": str(path), "mtime": stamp, "sha256": digest}


def _git_head() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--", "csrc", "isofast"],
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in csrc/ or isofast/" if dirty.strip() else "")


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed run of one side (spec["side"] is "ref" or "isofast")."""
    import torch

    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    side, method = spec["side"], spec["method"]
    if side == "isofast":
        import isofast
    from reference_impl import apply_update, reference_update

    tvs = synthetic_inputs.load_inputs(Path(spec["inputs"]), spec["tasks"], spec["dtype"])
    base = {k: torch.zeros_like(v) for k, v in tvs[0].items()}
    params: dict[str, Any] = {}
    if method == "iso_cts":
        params["common_space_fraction"] = spec["common_space_fraction"]
    iso_params = {**params, **spec.get("isofast_params", {})}

    memory = PeakMemory()
    cpu0, t0 = time.process_time(), time.perf_counter()
    if side == "ref":
        update = reference_update(method, tvs, **params)
        merged = apply_update(base, update, 1.0)
    else:
        merged = isofast.merge(
            base, tvs, method, 1.0, compute_dtype=spec["dtype"], threads=threads, **iso_params
        )
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0
    result: dict[str, Any] = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_delta_mib": memory.peak_delta_mib(),
        "rss_inputs_mib": memory.base_kib / 1024.0,
        "memory_method": memory.method,
        "blas": _blas_info(),
        "torch_threads": torch.get_num_threads(),
    }
    if side == "isofast":
        result["core"] = _core_build()
    if side == "ref":
        del merged
        merged = update  # base is zero and alpha 1: M itself, without a rounding step
    if spec.get("compare"):
        result.update(_errors(merged, spec["compare"]))
    if spec.get("save"):
        tmp = spec["save"] + ".tmp"
        torch.save(merged, tmp)
        os.replace(tmp, spec["save"])
    return result


def child_generate(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    synthetic_inputs.write_inputs(
        Path(spec["inputs"]), spec["model"], spec["blocks"], spec["tasks"], spec["seed"]
    )
    return {"seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- parent side


@dataclass
class Row:
    model: str
    blocks: int
    full_blocks: int
    tasks: int
    method: str
    threads: int
    cost_scale: float  # svd_cost(full model) / svd_cost(measured subset)
    ref: list[dict[str, Any]] = field(default_factory=list)
    iso: list[dict[str, Any]] = field(default_factory=list)
    ref64_seconds: float | None = None


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cache = Path(args.cache_dir)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            self.env[var] = str(args.threads)
        self.env_note = "OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: not set"
        present = {v: os.environ[v] for v in OPENBLAS_ENV if v in os.environ}
        if present and not args.keep_openblas_env:
            for var in OPENBLAS_ENV:
                self.env.pop(var, None)
            self.env_note = (
                "unset for the benchmark's child processes (both together): "
                + ", ".join(f"{k}={v}" for k, v in present.items())
            )
        elif present:
            self.env_note = "kept: " + ", ".join(f"{k}={v}" for k, v in present.items())
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
        )

    def child(self, mode: str, spec: dict[str, Any]) -> dict[str, Any]:
        cmd = [sys.executable, str(Path(__file__).resolve()), f"--_child={mode}", json.dumps(spec)]
        stdout = run_child(cmd, stdout="capture", env=self.env).stdout
        lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_MARK)]
        if not lines:
            raise RuntimeError(f"child {mode} {spec.get('side', '')}: no result\n{stdout[-4000:]}")
        result: dict[str, Any] = json.loads(lines[-1][len(RESULT_MARK) :])
        return result

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def inputs(self, model: str, blocks: int, tasks: int) -> str:
        path = synthetic_inputs.inputs_dir(self.cache, model, blocks, tasks, self.args.seed)
        tag = path.name.removeprefix("inputs-")
        if not (path / "done").exists():
            self.log(f"[gen] {tag}: generating synthetic task vectors into {path}")
            res = self.child(
                "generate",
                {
                    "model": model,
                    "tasks": tasks,
                    "blocks": blocks,
                    "seed": self.args.seed,
                    "inputs": str(path),
                    "threads": self.args.threads,
                },
            )
            self.log(f"[gen] {tag}: {res['seconds']:.1f} s")
        return str(path)

    def reference64(self, inputs: str, tasks: int, method: str) -> tuple[str, float | None]:
        f = self.args.common_space_fraction
        tag = method + (f"-f{f:g}" if method == "iso_cts" else "")
        # The cached result belongs to this version of the reference code.
        tag += "-r" + hashlib.sha256((HERE / "reference_impl.py").read_bytes()).hexdigest()[:8]
        path = Path(inputs) / f"ref64-{tag}.pt"
        meta = path.with_suffix(".json")
        if not path.exists():
            self.log(f"[ref64] {method}: float64 reference run (cached afterwards)")
            res = self.child(
                "run", self.spec("ref", method, inputs, tasks, "float64", save=str(path))
            )
            meta.write_text(json.dumps({"seconds": res["seconds"]}))
            self.log(f"[ref64] {method}: {res['seconds']:.1f} s")
        seconds = json.loads(meta.read_text())["seconds"] if meta.exists() else None
        return str(path), seconds

    def spec(
        self,
        side: str,
        method: str,
        inputs: str,
        tasks: int,
        dtype: str,
        compare: str | None = None,
        save: str | None = None,
    ) -> dict[str, Any]:
        return {
            "side": side,
            "method": method,
            "inputs": inputs,
            "tasks": tasks,
            "dtype": dtype,
            "threads": self.args.threads,
            "compare": compare,
            "save": save,
            "common_space_fraction": self.args.common_space_fraction,
            "isofast_params": self.args.isofast_param,
        }

    def run(self, model_key: str, blocks: int | None, tasks: int, method: str) -> Row:
        model = shp.get_model(model_key)
        n_blocks = model.layers if blocks is None else min(blocks, model.layers)
        scale = shp.svd_cost(shp.tensor_shapes(model)) / shp.svd_cost(
            shp.tensor_shapes(model, n_blocks)
        )
        row = Row(model.name, n_blocks, model.layers, tasks, method, self.args.threads, scale)
        inputs = self.inputs(model_key, n_blocks, tasks)
        ref64: str | None = None
        if not self.args.skip_errors:
            ref64, row.ref64_seconds = self.reference64(inputs, tasks, method)

        def side(name: str) -> Callable[[int], dict[str, Any]]:
            def run(index: int) -> dict[str, Any]:
                compare = ref64 if index == 0 else None  # errors from the first round only
                res = self.child(
                    "run", self.spec(name, method, inputs, tasks, "float32", compare=compare)
                )
                self.log(
                    f"[{model.name} b{n_blocks} T{tasks} {method}] {name:7s} "
                    f"run {index + 1}: {res['seconds']:7.2f} s wall, "
                    f"{res['cpu_seconds']:7.2f} s cpu, "
                    f"peak +{res['peak_delta_mib']:.0f} MiB"
                )
                return res

            return run

        runs = alternate(self.args.repeats, {"ref": side("ref"), "isofast": side("isofast")})
        row.ref, row.iso = runs["ref"], runs["isofast"]
        return row


# ----------------------------------------------------------------------------- reporting


def _spread(runs: Sequence[dict[str, Any]], key: str) -> Spread:
    return Spread.of(float(r[key]) for r in runs)


def _fmt_err(run: dict[str, Any]) -> str:
    if "err_global" not in run:
        return "-"
    return f"{run['err_global']:.1e} / {run['err_worst']:.1e}"


def _openblas_line(runs: Sequence[dict[str, Any]]) -> str:
    for lib in runs[0]["blas"] if runs else []:
        if "scipy_openblas32" in str(lib.get("filepath", "")) or (
            lib.get("internal_api") == "openblas" and "numpy" not in str(lib.get("filepath"))
        ):
            return (
                f"OpenBLAS {lib.get('version')} kernel {lib.get('architecture')}, "
                f"{lib.get('threading_layer')}, {lib.get('num_threads')} BLAS threads "
                f"after the merge ({lib.get('filepath')})"
            )
    return "OpenBLAS: not reported by threadpoolctl"


def _cores(runs: Sequence[dict[str, Any]]) -> str:
    builds: dict[str, str] = {}
    for run in runs:
        if "core" in run:
            builds.setdefault(run["core"]["sha256"], run["core"]["mtime"])
    text = "; ".join(f"sha256 {sha} (file dated {mtime})" for sha, mtime in builds.items())
    if len(builds) > 1:
        text += " (the core was rebuilt during the benchmark: rows are not comparable)"
    return text or "-"


def _torch_line() -> str:
    import torch

    cfg = torch.__config__.show().splitlines()
    mkl = next((ln.strip(" -") for ln in cfg if "Math Kernel Library" in ln), "no MKL")
    return (
        f"torch {torch.__version__}, LAPACK from {mkl.split('-Product')[0]}, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


def report(
    rows: Sequence[Row],
    runner: Runner,
    load: tuple[tuple[float, ...], tuple[float, ...]],
    wall: float,
    argv: Sequence[str],
) -> str:
    import isofast

    iso_runs = [r for row in rows for r in row.iso]
    ref_runs = [r for row in rows for r in row.ref]
    mem_method = ref_runs[0]["memory_method"] if ref_runs else "-"
    out = [
        f"### bench_methods: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"- command: `{command_line(argv)}`",
        f"- machine: {machine_summary(*load)}; total {wall:.0f} s",
        f"- reference: {_torch_line()}, torch.set_num_threads({runner.args.threads})",
        f"- isofast {isofast.__version__}: {_openblas_line(iso_runs)}, "
        f"threads={runner.args.threads}"
        + "".join(f", {k}={v!r}" for k, v in runner.args.isofast_param.items()),
        f"- isofast core: {_cores(iso_runs)}; git HEAD {_git_head()}",
        f"- environment: {runner.env_note}",
        f"- {runner.args.repeats} runs per side, alternating, each in its own process; seconds "
        "are the median (spread = max - min) of wall time, with the median CPU time of the "
        "process (all threads) in brackets; peak memory: "
        f"{mem_method}, minus RSS with the inputs loaded (max over runs)",
        "- errors: relative Frobenius error of M against the float64 reference, over all 2-D "
        "keys together / worst single key; base model all zeros (see the script's docstring)",
        "",
    ]
    subset = any(row.blocks < row.full_blocks for row in rows)
    head = [
        "model",
        "blocks",
        "T",
        "method",
        "ref fp32 s",
        "isofast s",
        "ref / isofast",
        "ref peak MiB",
        "isofast peak MiB",
        "ref fp32 err",
        "isofast err",
        "ref f64 s (first run, cached)",
    ]
    if subset:
        head += ["ref s, full model (est.)", "isofast s, full model (est.)"]
    table: list[list[str]] = []
    for row in rows:
        ref, iso = _spread(row.ref, "seconds"), _spread(row.iso, "seconds")
        ref_cpu, iso_cpu = _spread(row.ref, "cpu_seconds"), _spread(row.iso, "cpu_seconds")
        ref_s, iso_s = ref.median, iso.median
        cells = [
            row.model,
            f"{row.blocks}/{row.full_blocks}",
            str(row.tasks),
            row.method,
            f"{ref_s:.2f} ± {ref.spread:.2f} (cpu {ref_cpu.median:.1f})",
            f"{iso_s:.2f} ± {iso.spread:.2f} (cpu {iso_cpu.median:.1f})",
            f"{ref_s / iso_s:.2f}x",
            f"{max(r['peak_delta_mib'] for r in row.ref):.0f}",
            f"{max(r['peak_delta_mib'] for r in row.iso):.0f}",
            _fmt_err(row.ref[0]),
            _fmt_err(row.iso[0]),
            "-" if row.ref64_seconds is None else f"{row.ref64_seconds:.1f}",
        ]
        if subset:
            cells += [f"{ref_s * row.cost_scale:.0f}", f"{iso_s * row.cost_scale:.0f}"]
        table.append(cells)
    out.append(markdown_table(head, table))
    if subset:
        out += [
            "",
            "Full-model estimates scale the measured seconds by the ratio of "
            "sum(m * n * min(m, n)) over the 2-D keys, full model / measured subset "
            "(the measured subset includes the stem and head keys).",
        ]
    worst = {f"{row.method} T{row.tasks}": row.ref[0].get("err_worst_key", "-") for row in rows}
    out += ["", "Worst keys (ref fp32): " + ", ".join(f"{k}: {v}" for k, v in worst.items()), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Reference loop (PyTorch) vs isofast on CLIP-ViT-shaped synthetic task "
        "matrices: seconds, speed ratio, peak memory, error against a float64 reference.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", default=["B/32"], help="B/32, B/16, L/14")
    parser.add_argument("--tasks", nargs="+", type=int, default=[8], help="T values, e.g. 8 14 20")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="first N residual blocks only (default: all); stem and head are always included",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads and isofast threads=",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    parser.add_argument("--common-space-fraction", type=float, default=0.8, help="Iso-CTS f")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"B/32, {QUICK['blocks']} blocks, T=8, all three methods",
    )
    parser.add_argument(
        "--isofast-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword for isofast.merge, VALUE parsed as JSON when it "
        "can be (e.g. rank_tol=0); repeatable",
    )
    parser.add_argument(
        "--skip-errors", action="store_true", help="no float64 reference run and no error columns"
    )
    parser.add_argument("--out", default=None, help="append the markdown report to this file")
    parser.add_argument(
        "--cache-dir",
        default=synthetic_inputs.DEFAULT_CACHE,
        help="synthetic inputs and float64 reference outputs are cached here",
    )
    parser.add_argument(
        "--keep-openblas-env",
        action="store_true",
        help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for the child "
        "processes (default: unset both together if either is set)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.tasks = QUICK["models"], QUICK["tasks"]
        args.blocks, args.methods = QUICK["blocks"], QUICK["methods"]
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    extra: dict[str, Any] = {}
    for item in args.isofast_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--isofast-param wants KEY=VALUE, got {item!r}")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    args.isofast_param = extra
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) == 3 and argv[1].startswith("--_child="):
        mode, spec = argv[1].split("=", 1)[1], json.loads(argv[2])
        result = child_generate(spec) if mode == "generate" else child_run(spec)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    args = parse_args(argv[1:])
    runner = Runner(args)
    runner.log(f"[bench] {runner.env_note}; threads={args.threads}; cache {args.cache_dir}")
    load0, t0 = os.getloadavg(), time.perf_counter()
    rows = [
        runner.run(model, args.blocks, tasks, method)
        for model in args.models
        for tasks in args.tasks
        for method in args.methods
    ]
    text = report(rows, runner, (load0, os.getloadavg()), time.perf_counter() - t0, argv)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
