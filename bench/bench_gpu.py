"""GPU merges: isofast._cuda against the reference loop, side by side on one GPU.

Kernel mode (default). For each 2-D shape, T = --tasks synthetic task matrices with realistic
spectra (bench/shapes.py `task_matrices`: shared input basis, steep roll-off, cond 1e4..1e5),
generated in float32 on the CPU and moved to the GPU; then for each method (iso_c, iso_cts,
tsv_m):

  isofast    _cuda.merge_matrix(options, D_t, out): the core's method code on its CUDA
             backend, float32 compute (default routes: float64 Gram eigenpairs)
  reference  bench/reference_impl.py iso_c_matrix / iso_cts_matrix / tsv_m_matrix on the same
             CUDA float32 tensors (torch.linalg.svd loops: 1, 1 + T + 2 and T + 2 SVDs)
  float64    the reference loop on float64 copies of the same D_t, on the GPU (slow; the
             ground truth of the error columns; --no-error skips it)

Both sides are warmed up once on a small problem (handles, library initialisation, lazily
loaded kernels); then per (shape, method) --repeats rounds alternate the sides, each run
wall-timed between torch.cuda.synchronize() calls (both sides synchronise inside, so CUDA
events would give the same up to launch latency); the first round also records peak memory.
Reported: median seconds with the min-max spread, the speed ratio reference / isofast (of the
medians), peak GPU memory per side above the inputs (reference:
torch.cuda.max_memory_allocated, which its SVD workspaces go through; isofast: its output plus
the high-water mark of the device's default stream-ordered pool, where isofast._cuda
allocates, read through the CUDA driver), and the relative Frobenius error of each side's M
against the float64 result. A Markdown table goes to stdout, JSON to
--out (rewritten after every row, so a run cut short keeps what it measured).

Shapes: ViT-L/14 block keys (1024x1024 out_proj, 3072x1024 in_proj, 4096x1024 c_fc,
1024x4096 c_proj) and 4096x4096 by default (about 3 minutes on an H200 at T = 8); the 4096 x
14336 MLP key of an 8B LLM is opt-in (`--shapes vit-l,llm`: about 2 minutes more; the Iso-CTS
and TSV-M reference loops do 10-11 SVDs of that size per run).

End-to-end mode (--e2e). An LLM-shaped bf16 checkpoint set (Llama layout: hidden 4096,
intermediate 14336, 2 layers, vocabulary 32000; a base and 4 fine-tunes; bench/bench_memory.py's
generator, reused when present) merged by `isofast merge --device cuda` and by the same merge
on the CPU (`--device cpu`, cut off after --cpu-timeout seconds), next to `cat` of the input
files; one child process per run, wall time and peak RSS (from wait4) of each.

    python bench/bench_gpu.py                                  # kernel mode, default shapes
    python bench/bench_gpu.py --shapes vit-l,llm --out gpu.json
    python bench/bench_gpu.py --shapes 2048x2048 --methods iso_cts --repeats 3 --no-error
    python bench/bench_gpu.py --e2e                            # iso_c and iso_cts, GPU and CPU

Needs torch with CUDA, a usable GPU and isofast._cuda (exits with status 2 and the reason
otherwise; `--e2e --e2e-devices cpu` runs without a GPU).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling modules (shapes, reference_impl, harness), also
    sys.path.insert(0, str(HERE))  # under PYTHONSAFEPATH=1

METHODS = ("iso_c", "iso_cts", "tsv_m")
SHAPE_GROUPS: dict[str, tuple[str, list[tuple[int, int]]]] = {
    # One residual block of the CLIP ViT-L/14 visual tower (24 blocks): out_proj,
    # in_proj (fused qkv), mlp.c_fc, mlp.c_proj.
    "vit-l": ("ViT-L/14", [(1024, 1024), (3072, 1024), (4096, 1024), (1024, 4096)]),
    "square": ("LLM 4096", [(4096, 4096)]),
    "llm": ("LLM 4096", [(4096, 4096), (4096, 14336)]),
}
DEFAULT_SHAPES = "vit-l,square"
MiB = 2**20


def fail(reason: str) -> NoReturn:
    print(f"bench_gpu: cannot run: {reason}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- GPU memory


class PoolPeak:
    """High-water mark of the device's default stream-ordered memory pool (cudaMallocAsync),
    from which isofast._cuda takes every buffer. torch's caching allocator does not use that
    pool, so torch.cuda.max_memory_allocated cannot see isofast's work memory. Read through the
    driver API (libcuda), whatever CUDA runtime isofast._cuda was linked with."""

    USED_MEM_CURRENT = 7  # CU_MEMPOOL_ATTR_USED_MEM_CURRENT
    USED_MEM_HIGH = 8  # CU_MEMPOOL_ATTR_USED_MEM_HIGH

    def __init__(self, device: int) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cuDeviceGetDefaultMemPool.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        lib.cuMemPoolGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        lib.cuMemPoolSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self._lib = lib
        dev = ctypes.c_int()
        self._check(lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
        pool = ctypes.c_void_p()
        self._check(
            lib.cuDeviceGetDefaultMemPool(ctypes.byref(pool), dev.value),
            "cuDeviceGetDefaultMemPool",
        )
        self._pool = pool

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what} failed (CUresult {code})")

    def _get(self, attr: int) -> int:
        value = ctypes.c_uint64()
        self._check(
            self._lib.cuMemPoolGetAttribute(self._pool, attr, ctypes.byref(value)),
            "cuMemPoolGetAttribute",
        )
        return int(value.value)

    def reset(self) -> None:
        zero = ctypes.c_uint64(0)  # the only value the high-water attributes accept
        self._check(
            self._lib.cuMemPoolSetAttribute(self._pool, self.USED_MEM_HIGH, ctypes.byref(zero)),
            "cuMemPoolSetAttribute",
        )

    def high(self) -> int:
        return self._get(self.USED_MEM_HIGH)

    def current(self) -> int:
        return self._get(self.USED_MEM_CURRENT)


# ----------------------------------------------------------------------------- kernel mode


@dataclass
class Side:
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    error: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Row:
    group: str
    shape: tuple[int, int]
    method: str
    tasks: int
    isofast: Side
    reference: Side
    f64_seconds: float | None = None
    routes: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.reference.median / self.isofast.median


def parse_shapes(text: str) -> list[tuple[str, tuple[int, int]]]:
    out: list[tuple[str, tuple[int, int]]] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if item in SHAPE_GROUPS:
            label, shapes = SHAPE_GROUPS[item]
            out += [(label, s) for s in shapes]
            continue
        try:
            m, n = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(
                f"bench_gpu: bad shape {item!r}: use MxN or a group ({', '.join(SHAPE_GROUPS)})"
            ) from None
        out.append(("custom", (m, n)))
    seen: set[tuple[int, int]] = set()
    unique = []
    for label, shape in out:  # "vit-l,llm,square" lists 4096x4096 once
        if shape not in seen:
            seen.add(shape)
            unique.append((label, shape))
    return unique


def timed(torch: Any, fn: Callable[[], Any]) -> tuple[float, Any]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def rel_error(torch: Any, got: Any, want: Any) -> float:
    return float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want))


class KernelBench:
    def __init__(self, torch: Any, cuda: Any, core: Any, args: argparse.Namespace) -> None:
        import reference_impl

        self.torch, self.cuda, self.core, self.args = torch, cuda, core, args
        self.reference: dict[str, Callable[[Sequence[Any]], Any]] = {
            "iso_c": reference_impl.iso_c_matrix,
            "iso_cts": reference_impl.iso_cts_matrix,
            "tsv_m": reference_impl.tsv_m_matrix,
        }
        self.stream = torch.cuda.current_stream().cuda_stream
        try:
            self.pool: PoolPeak | None = PoolPeak(torch.cuda.current_device())
        except (OSError, AttributeError, RuntimeError) as exc:
            print(f"  (isofast's pool memory is not measurable here: {exc})", flush=True)
            self.pool = None

    def options(self, method: str) -> Any:
        opts = self.core.MergeOptions()
        opts.kernel = getattr(self.core.Kernel, method)
        opts.alpha = 1.0
        opts.compute64 = False
        opts.matrix.rank_tol = -1.0
        opts.matrix.common_space_fraction = 0.8
        opts.matrix.route = self.core.MatrixRoute.auto
        return opts

    def deltas(self, shape: tuple[int, int]) -> list[Any]:
        from shapes import task_matrices

        name = f"bench_gpu.{shape[0]}x{shape[1]}"
        t0 = time.perf_counter()
        host = list(task_matrices(name, shape, self.args.tasks, self.args.seed))
        on_gpu = [d.to("cuda") for d in host]
        self.torch.cuda.synchronize()
        print(
            f"  {shape[0]}x{shape[1]}: {self.args.tasks} task matrices made on the CPU and "
            f"moved to the GPU in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        return on_gpu

    def run_isofast(self, method: str, deltas: list[Any]) -> Callable[[], Any]:
        opts = self.options(method)

        def run() -> Any:
            out = self.torch.empty(tuple(deltas[0].shape), dtype=self.torch.float32, device="cuda")
            self.cuda.merge_matrix(opts, deltas, out, None, self.stream)
            return out

        return run

    def run_reference(self, method: str, deltas: list[Any]) -> Callable[[], Any]:
        fn = self.reference[method]

        def run() -> Any:
            with self.torch.no_grad():
                return fn(deltas)

        return run

    def warm_up(self, methods: Sequence[str]) -> None:
        """Handles, cuSOLVER/cuBLAS initialisation and lazily loaded kernels of both sides, on
        a small problem, once: the timed runs then pay only what depends on the shape."""
        from shapes import task_matrices

        small = [d.to("cuda") for d in task_matrices("bench_gpu.warm-up", (384, 256), 4)]
        for method in methods:
            for fn in (self.run_isofast(method, small), self.run_reference(method, small)):
                timed(self.torch, fn)
        self.cuda.take_route_counts()

    def timed_with_peak(self, fn: Callable[[], Any], pool: bool) -> tuple[float, int | None, Any]:
        """One timed call and its peak GPU memory above what was allocated before it (the
        memory counters are reset and read outside the timed stretch)."""
        torch = self.torch
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        pool_before = 0
        if pool and self.pool is not None:
            self.pool.reset()
            pool_before = self.pool.current()
        seconds, result = timed(torch, fn)
        torch_peak = torch.cuda.max_memory_allocated() - before
        if not pool:
            return seconds, torch_peak, result
        if self.pool is None:
            return seconds, None, result
        return seconds, torch_peak + self.pool.high() - pool_before, result

    def measure(self, group: str, shape: tuple[int, int], method: str, deltas: list[Any]) -> Row:
        torch, cuda, args = self.torch, self.cuda, self.args
        iso_fn = self.run_isofast(method, deltas)
        ref_fn = self.run_reference(method, deltas)
        iso, ref = Side(), Side()
        # Rounds alternate the sides; the first round also records each side's peak memory
        # and isofast's routes (one call's worth).
        cuda.take_route_counts()
        t, iso.peak_bytes, iso_out = self.timed_with_peak(iso_fn, pool=True)
        iso.seconds.append(t)
        routes = {k: int(v) for k, v in cuda.take_route_counts().items()}
        t, ref.peak_bytes, ref_out = self.timed_with_peak(ref_fn, pool=False)
        ref.seconds.append(t)
        for _ in range(args.repeats - 1):
            t, iso_out = timed(torch, iso_fn)
            iso.seconds.append(t)
            t, ref_out = timed(torch, ref_fn)
            ref.seconds.append(t)
        cuda.take_route_counts()
        row = Row(group, shape, method, args.tasks, iso, ref, routes=routes)
        if not args.no_error:
            deltas64 = [d.double() for d in deltas]
            row.f64_seconds, want = timed(torch, self.run_reference(method, deltas64))
            del deltas64
            iso.error = rel_error(torch, iso_out, want)
            ref.error = rel_error(torch, ref_out, want)
            del want
        del iso_out, ref_out
        torch.cuda.empty_cache()
        return row


def fmt_side(side: Side) -> str:
    lo, hi = min(side.seconds), max(side.seconds)
    return f"{side.median:.3f} ({lo:.3f}-{hi:.3f})"


def fmt_mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MiB:.0f}"


def fmt_err(e: float | None) -> str:
    return "-" if e is None else f"{e:.1e}"


def fmt_routes(routes: dict[str, int]) -> str:
    return "; ".join(f"{k} x{v}" if v != 1 else k for k, v in routes.items()) or "-"


def kernel_table(rows: Sequence[Row]) -> str:
    from harness import markdown_table

    header = [
        "group",
        "shape",
        "method",
        "isofast s",
        "reference s",
        "ref / isofast",
        "isofast peak MiB",
        "reference peak MiB",
        "err isofast",
        "err reference",
        "f64 ref s",
        "isofast routes (one call)",
    ]
    body = [
        [
            r.group,
            f"{r.shape[0]}x{r.shape[1]}",
            r.method,
            fmt_side(r.isofast),
            fmt_side(r.reference),
            f"{r.ratio:.1f}x",
            fmt_mib(r.isofast.peak_bytes),
            fmt_mib(r.reference.peak_bytes),
            fmt_err(r.isofast.error),
            fmt_err(r.reference.error),
            "-" if r.f64_seconds is None else f"{r.f64_seconds:.2f}",
            fmt_routes(r.routes),
        ]
        for r in rows
    ]
    return markdown_table(header, body, right=(3, 4, 5, 6, 7, 8, 9, 10))


def write_json(path: Path | None, meta: dict[str, Any], rows: Sequence[Row]) -> None:
    if path is None:
        return
    doc = dict(meta)
    doc["rows"] = [
        {
            **asdict(r),
            "shape": list(r.shape),
            "ratio": r.ratio,
            "isofast_median_s": r.isofast.median,
            "reference_median_s": r.reference.median,
        }
        for r in rows
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def gpu_modules() -> tuple[Any, Any, Any]:
    """torch, isofast._cuda and isofast._core, or exit with the reason."""
    try:
        import torch
    except ImportError:
        fail("torch is not installed")
    if not torch.cuda.is_available():
        fail("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    try:
        from isofast import _cuda
        from isofast._native import core
    except ImportError as exc:
        fail(f"isofast._cuda is not built ({exc}); build with ISOFAST_CUDA=ON")
    if not _cuda.available():
        fail("isofast._cuda sees no usable CUDA GPU")
    return torch, _cuda, core


def kernel_mode(args: argparse.Namespace) -> None:
    from harness import command_line

    shapes = parse_shapes(args.shapes)
    methods = args.methods or list(METHODS)
    torch, cuda, core = gpu_modules()
    device = torch.cuda.get_device_name(torch.cuda.current_device())
    meta = {
        "device": device,
        "device_isofast": cuda.device_name(torch.cuda.current_device()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tasks": args.tasks,
        "repeats": args.repeats,
        "methods": methods,
        "seed": args.seed,
        "command": command_line(),
    }
    print(f"device: {device} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    print(
        f"T = {args.tasks} float32 task matrices per shape (bench/shapes.py spectra), methods "
        f"{', '.join(methods)}; isofast: _cuda.merge_matrix, float32 compute; reference: "
        f"bench/reference_impl.py on CUDA float32 tensors; median of {args.repeats} runs per "
        f"side (both warmed up once on a small problem); command: {meta['command']}",
        flush=True,
    )
    bench = KernelBench(torch, cuda, core, args)
    bench.warm_up(methods)
    rows: list[Row] = []
    skipped: list[str] = []
    start = time.perf_counter()
    for group, shape in shapes:
        if args.budget is not None and time.perf_counter() - start > args.budget:
            skipped.append(f"{shape[0]}x{shape[1]}")
            continue
        deltas = bench.deltas(shape)
        for method in methods:
            if args.budget is not None and time.perf_counter() - start > args.budget:
                skipped.append(f"{shape[0]}x{shape[1]} {method}")
                continue
            row = bench.measure(group, shape, method, deltas)
            rows.append(row)
            print(
                f"  {shape[0]}x{shape[1]} {method}: isofast {fmt_side(row.isofast)} s, "
                f"reference {fmt_side(row.reference)} s ({row.ratio:.1f}x); peak MiB "
                f"{fmt_mib(row.isofast.peak_bytes)} / {fmt_mib(row.reference.peak_bytes)}; "
                f"err {fmt_err(row.isofast.error)} / {fmt_err(row.reference.error)}"
                + ("" if row.f64_seconds is None else f" (f64 ref {row.f64_seconds:.1f} s)"),
                flush=True,
            )
            write_json(args.out, meta, rows)
        del deltas
        torch.cuda.empty_cache()
    print()
    print(kernel_table(rows))
    print(
        "\ns = wall seconds per call (median, min-max), synchronised; peak MiB = GPU memory "
        "above the inputs (isofast: output + its stream-ordered pool's high-water mark; "
        "reference: torch's allocator); err = relative Frobenius error of M vs the "
        "reference loop in float64 on the same task matrices."
    )
    if skipped:
        print(f"\nnot measured (--budget {args.budget:.0f} s spent): {', '.join(skipped)}")
    print(f"total {time.perf_counter() - start:.0f} s")
    meta["skipped"] = skipped
    write_json(args.out, meta, rows)


# ----------------------------------------------------------------------------- end to end


@dataclass
class Run:
    label: str
    seconds: float
    max_rss: int  # bytes
    ok: bool
    note: str = ""


# Runs the command and writes its peak RSS (KiB) to argv[1]. The measuring process must be
# small: Linux carries the RSS high-water mark of the process that forks over exec into the
# child's ru_maxrss, so wait4 in this (large) benchmark process would report its own RSS.
RSS_WRAPPER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(child.returncode if child.returncode >= 0 else 128 - child.returncode)
"""


def run_measured(cmd: Sequence[str], timeout: float | None, env: dict[str, str]) -> Run:
    """Wall time and peak RSS (wait4 in a small wrapper process) of one child; the child and
    its wrapper are killed after `timeout` seconds."""
    import signal
    import tempfile

    with tempfile.NamedTemporaryFile("r", prefix="bench-gpu-", suffix=".rss") as rss_file:
        full = [sys.executable, "-c", RSS_WRAPPER, rss_file.name, *cmd]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            full,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            start_new_session=True,  # one process group: a timeout kills the child too
        )

        def stop(signum: int, _frame: Any) -> None:  # `timeout` or Ctrl-C on this script:
            os.killpg(proc.pid, signal.SIGKILL)  # its own group is not ours, so end it here
            raise SystemExit(f"bench_gpu: stopped by signal {signum}")

        previous = signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, stop)
        try:
            _, err = proc.communicate(timeout=timeout)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            killed = True
        finally:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])
        seconds = time.perf_counter() - t0
        text = rss_file.read().strip()
    rss = int(text) * 1024 if text else 0  # KiB on Linux; 0: cut off before it was written
    if killed:
        return Run("", seconds, rss, False, f"cut off after {timeout:g} s")
    if proc.returncode != 0:
        tail = " | ".join((err or "").strip().splitlines()[-3:])
        return Run("", seconds, rss, False, f"exit {proc.returncode}: {tail}")
    return Run("", seconds, rss, True)


def fmt_rss(run: Run) -> str:
    return f"{run.max_rss / MiB:.0f}" if run.max_rss else "n/a"


def e2e_mode(args: argparse.Namespace) -> None:
    from bench_memory import MARKER, CheckpointSet, ensure_set, llama_shapes
    from harness import command_line, cpu_name, isofast_merge_command, markdown_table

    devices = [d.strip() for d in args.e2e_devices.split(",") if d.strip()]
    bad = [d for d in devices if d not in ("cuda", "cpu")]
    if bad:
        raise SystemExit(f"bench_gpu: --e2e-devices takes cuda and/or cpu, got {bad}")
    methods = args.methods or ["iso_c", "iso_cts"]
    device_name = "no GPU used"
    if "cuda" in devices:
        torch, _, _ = gpu_modules()
        device_name = torch.cuda.get_device_name(0)
    cpus = len(os.sched_getaffinity(0))
    print(f"device: {device_name}; {cpu_name()}, {cpus} CPUs, load {os.getloadavg()[0]:.1f}")
    root = Path(args.e2e_dir)
    root.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(args.e2e_layers, args.e2e_hidden, args.e2e_inter, args.e2e_vocab)
    key = f"llm-{args.e2e_hidden}x{args.e2e_inter}-v{args.e2e_vocab}-l{args.e2e_layers}-bf16"
    cs = CheckpointSet(
        key, "LLM bf16", shapes, "bfloat16", args.e2e_tasks, args.e2e_layers, 2 * 2**30
    )
    t0 = time.perf_counter()
    base, models = ensure_set(root, cs, args.e2e_tasks)
    folders = [base, *models]
    files = [p for f in folders for p in sorted(f.iterdir()) if p.name != MARKER]
    gib = sum(p.stat().st_size for p in files) / 2**30
    print(
        f"inputs: {cs.label}, hidden {args.e2e_hidden}, intermediate {args.e2e_inter}, "
        f"{args.e2e_layers} layers, vocabulary {args.e2e_vocab}; base + {args.e2e_tasks} "
        f"fine-tunes, {len(files)} files, {gib:.2f} GiB (ready in "
        f"{time.perf_counter() - t0:.0f} s); command: {command_line()}",
        flush=True,
    )
    env = dict(os.environ, PYTHONSAFEPATH="1")  # children import the installed isofast
    cat = ["cat", *map(str, files)]
    run_measured(cat, None, env)  # warm the page cache
    cat_run = run_measured(cat, None, env)
    cat_run.label = "cat inputs"
    print(f"  cat: {cat_run.seconds:.2f} s", flush=True)
    out = root / "out"
    runs: list[tuple[str, str, Run]] = []
    gpu_seconds: dict[str, float] = {}
    # Every GPU merge first: if the step is cut short, the CPU's (cut off anyway) go.
    for device, method in [(d, m) for d in devices for m in methods]:
        cmd = [*isofast_merge_command(out, base, models, method, None), "--device", device]
        timeout = args.cpu_timeout if device == "cpu" else args.gpu_timeout
        run = run_measured(cmd, timeout, env)
        shutil.rmtree(out, ignore_errors=True)
        for left in root.glob(f".{out.name}.isofast-*"):  # what a cut-off merge left
            shutil.rmtree(left, ignore_errors=True)
        if run.ok and device == "cuda":
            gpu_seconds[method] = run.seconds
        runs.append((method, device, run))
        state = "" if run.ok else f" ({run.note})"
        print(
            f"  {method} --device {device}: {run.seconds:.1f} s, peak RSS "
            f"{fmt_rss(run)} MiB{state}",
            flush=True,
        )
    header = ["method", "isofast merge", "wall s", "peak RSS MiB", "/ cat", "/ GPU merge"]
    body = [["-", "cat inputs", f"{cat_run.seconds:.2f}", fmt_rss(cat_run), "1.0", ""]]
    for method, device, run in runs:
        wall = f"{run.seconds:.1f}" if run.ok else f"> {run.seconds:.0f} ({run.note})"
        gpu = gpu_seconds.get(method)
        body.append(
            [
                method,
                f"--device {device}",
                wall,
                fmt_rss(run),
                f"{run.seconds / cat_run.seconds:.1f}" + ("" if run.ok else "+"),
                "" if gpu is None else f"{run.seconds / gpu:.1f}" + ("" if run.ok else "+"),
            ]
        )
    print()
    print(markdown_table(header, body, right=(2, 3, 4, 5)))
    print(
        "\nOne run each, warm page cache, output fsync'ed as always; peak RSS of the child "
        "(wait4 ru_maxrss in a small Python wrapper, whose own ~10 MiB is the floor); '+': a "
        "lower bound (the run was cut off)."
    )


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="bench_gpu.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--tasks", type=int, default=8, help="task matrices per shape (default 8)")
    p.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        help=f"comma-separated groups ({', '.join(SHAPE_GROUPS)}) or MxN "
        f"(default {DEFAULT_SHAPES}; 4096x14336 is in 'llm')",
    )
    p.add_argument("--repeats", type=int, default=2, help="timed runs per side (>= 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-error", action="store_true", help="skip the float64 reference")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds: start no new (shape, method) after this (default: no limit)",
    )
    e2e = p.add_argument_group("end-to-end mode")
    e2e.add_argument("--e2e", action="store_true", help="time `isofast merge` on checkpoints")
    e2e.add_argument("--e2e-dir", default="/tmp/isofast-gpu-e2e", help="data folder (reused)")
    e2e.add_argument("--e2e-devices", default="cuda,cpu", help="cuda and/or cpu (default both)")
    e2e.add_argument("--e2e-layers", type=int, default=2)
    e2e.add_argument("--e2e-hidden", type=int, default=4096)
    e2e.add_argument("--e2e-inter", type=int, default=14336)
    e2e.add_argument("--e2e-vocab", type=int, default=32000)
    e2e.add_argument("--e2e-tasks", type=int, default=4, help="fine-tunes (default 4)")
    e2e.add_argument(
        "--cpu-timeout", type=float, default=60.0, help="cut a CPU merge off after (s)"
    )
    e2e.add_argument(
        "--gpu-timeout", type=float, default=120.0, help="cut a GPU merge off after (s)"
    )
    args = p.parse_args(argv)
    if args.methods is not None:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown or not args.methods:
            p.error(f"--methods: choose from {', '.join(METHODS)}, got {args.methods}")
    if args.repeats < 2:
        p.error("--repeats must be at least 2 (a median and a spread per side)")
    if args.tasks < 1:
        p.error("--tasks must be at least 1")
    if args.e2e:
        e2e_mode(args)
    else:
        kernel_mode(args)


if __name__ == "__main__":
    main()
