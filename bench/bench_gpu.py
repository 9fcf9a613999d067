"""GPU Iso-C: isofast._cuda (certified polar iteration, SVD fallback) vs a PyTorch reference loop.

For each 2-D shape (LLM-sized 4096 x 4096 and 4096 x 14336, the ViT-L/14 block matrices) and
T task matrices on the GPU, side by side in one process:
  torch ref      D = sum_t D_t (float32); U, S, Vh = torch.linalg.svd(D); M = S.mean() U Vh
                 (what bench/reference_impl.py does per key, on the GPU)
  isofast f64    _cuda.iso_c(..., compute="float64")   polar iteration, float64 GEMMs (default;
                 long matrices, max >= 3 min >= 6144, iterate on the R of a QR first)
  isofast f64noqr  the same with qr=False (the iteration on D itself; --variants only)
  isofast f32    _cuda.iso_c(..., compute="float32")   polar iteration, float32 GEMMs; falls
                 back to the SVD route (with a warning) when its certificate fails
  isofast svd    _cuda.iso_c(..., force_svd=True)       float64 cusolverDnXgesvdp route
Per shape: one untimed full-size warm-up of every variant, then --repeats rounds that run the
variants one after the other (alternating sides); each run is synchronised and timed on the
wall clock; the table gives the median. Errors are the relative Frobenius error of M against a
float64 torch.linalg.svd of the same D (its time is shown as "f64 svd").

Inputs: D = U diag(s) V^T with log-spaced s (condition number --cond, default 1e5, inside the
1e4..2.5e5 of real task sums), split into T random parts, float32 on the device.

--profile adds, per shape, the CUDA kernels of one isofast f64 call (torch.profiler / CUPTI)
and the achieved float64 rate of its GEMM work; --gemm measures the GEMM rates of the card.
Exits 0 with a message when there is no CUDA GPU, no torch with CUDA or no isofast._cuda.
Run: python bench/bench_gpu.py [--repeats 2] [--tasks 8] [--shapes llm,vit-l|4096x4096,...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

SHAPES: dict[str, tuple[str, list[tuple[int, int]]]] = {
    "llm": ("LLM 4096", [(4096, 4096), (4096, 14336)]),
    # One residual block of the ViT-L/14 visual tower (24 blocks): in_proj (fused qkv),
    # out_proj, mlp.c_fc, mlp.c_proj.
    "vit-l": ("ViT-L/14", [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]),
}
VARIANTS = ("ref", "f64", "f64noqr", "f32", "svd")
DEFAULT_VARIANTS = "ref,f64,f32,svd"
LABELS = {
    "ref": "torch ref",
    "f64": "iso f64",
    "f64noqr": "iso f64 no-QR",
    "f32": "iso f32",
    "svd": "iso svd",
}


def skip(reason: str) -> NoReturn:
    print(f"bench_gpu: skipped: {reason}")
    sys.exit(0)


def make_deltas(torch: Any, shape: tuple[int, int], tasks: int, cond: float, seed: int) -> Any:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m, n = shape
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, device="cuda", dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, r, device="cuda", dtype=torch.float64, generator=gen))
    s = torch.logspace(0.0, -float(torch.log10(torch.tensor(cond))), r, device="cuda")
    total = (u * (s.double() * 1e-2)) @ v.T
    parts = [
        torch.randn(m, n, device="cuda", dtype=torch.float64, generator=gen) * 1e-2 / (m * n) ** 0.5
        for _ in range(tasks - 1)
    ]
    parts.append(total - sum(parts))
    return [p.float().contiguous() for p in parts]


def sync_time(torch: Any, fn: Callable[[], Any]) -> tuple[float, Any]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def polar_flops(shape: tuple[int, int], steps: int, qr: bool) -> float:
    """Float64 FLOPs of the polar route: per step a Gram (syrk, L n^2), its square (2 n^3) and
    the update (2 L n^2), with L = n after a QR (geqrf 2 L n^2 - 2 n^3 / 3, ormqr
    4 L n^2 - 2 n^3); plus the certificate (syrk + GEMM, 3 L n^2)."""
    big, small = max(shape), min(shape)
    cert = 3.0 * big * small**2
    if not qr:
        return steps * (3.0 * big * small**2 + 2.0 * small**3) + cert
    qr_work = 6.0 * big * small**2 - (2.0 / 3.0 + 2.0) * small**3
    return steps * 5.0 * small**3 + qr_work + cert


def device_time_us(evt: Any) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def profile_call(torch: Any, fn: Callable[[], Any], shape: tuple[int, int], wall: float) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if device_time_us(e) > 0]
    events.sort(key=device_time_us, reverse=True)
    total = sum(device_time_us(e) for e in events)
    print(
        f"  profile {shape[0]}x{shape[1]} (iso f64, one call): kernels {total / 1e3:.1f} ms "
        f"of {wall * 1e3:.1f} ms wall (median)"
    )
    for e in events[:12]:
        t = device_time_us(e)
        print(
            f"    {t / 1e3:8.2f} ms {100 * t / max(total, 1e-9):5.1f}%  x{e.count:<4} {e.key[:90]}"
        )


def gemm_rates(torch: Any, n: int = 4096, reps: int = 10) -> None:
    """TFLOP/s of n^3 GEMMs (torch.matmul -> cuBLAS) on random data, mean of `reps` after 3."""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for label, dtype, tf32 in [
            ("float64", torch.float64, False),
            ("float32", torch.float32, False),
            ("tf32", torch.float32, True),
            ("bfloat16", torch.bfloat16, False),
        ]:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device="cuda", dtype=dtype)
            b = torch.randn(n, n, device="cuda", dtype=dtype)
            for _ in range(3):
                a @ b
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                a @ b
            end.record()
            torch.cuda.synchronize()
            sec = start.elapsed_time(end) / 1e3 / reps
            print(f"  GEMM {n}^3 {label:<8}: {2.0 * n**3 / sec / 1e12:7.1f} TFLOP/s")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def bench_shape(
    torch: Any, cuda: Any, shape: tuple[int, int], args: Any, stream: int
) -> dict[str, Any]:
    deltas = make_deltas(torch, shape, args.tasks, args.cond, args.seed)
    d64 = sum(d.double() for d in deltas)
    t_f64, (u, s, vh) = sync_time(torch, lambda: torch.linalg.svd(d64, full_matrices=False))
    want = s.mean() * (u @ vh)
    del u, s, vh

    def torch_ref() -> tuple[Any, dict[str, Any]]:
        d = torch.stack(deltas).sum(0)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        return s.mean() * (u @ vh), {}

    def iso(**kw: Any) -> Callable[[], tuple[Any, dict[str, Any]]]:
        def run() -> tuple[Any, dict[str, Any]]:
            out = torch.empty(shape, dtype=torch.float32, device="cuda")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the fallback is loud by design: see routes
                info = cuda.iso_c(deltas, out, stream=stream, **kw)
            return out, info

        return run

    fns = {
        "ref": torch_ref,
        "f64": iso(compute="float64"),
        "f64noqr": iso(compute="float64", qr=False),
        "f32": iso(compute="float32"),
        "svd": iso(force_svd=True),
    }
    fns = {k: fns[k] for k in args.variants}
    results: dict[str, Any] = {}
    for fn in fns.values():  # warm-up: handles, workspaces, allocators
        sync_time(torch, fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t, results[name] = sync_time(torch, fn)
            times[name].append(t)
    row: dict[str, Any] = {"shape": shape, "f64svd": t_f64, "time": {}, "err": {}, "info": {}}
    for name in fns:
        m, info = results[name]
        row["time"][name] = statistics.median(times[name])
        row["err"][name] = float(torch.linalg.norm(m.double() - want) / torch.linalg.norm(want))
        row["info"][name] = info
        del m
    if args.profile and "f64" in fns:
        profile_call(torch, fns["f64"], shape, row["time"]["f64"])
        info = row["info"]["f64"]
        if info.get("route") == "polar":
            work = polar_flops(shape, info["steps"], bool(info.get("qr")))
            rate = work / row["time"]["f64"] / 1e12
            print(
                f"  f64 polar work (model): {work / 1e12:.2f} TFLOP in "
                f"{row['time']['f64'] * 1e3:.1f} ms = {rate:.1f} TFLOP/s"
            )
    del want
    return row


def route_text(info: dict[str, Any]) -> str:
    if not info:
        return ""
    text = f"{info['route']}"
    if info["route"] == "polar":
        qr = ", QR" if info.get("qr") else ""
        text += f"({info['steps']}{qr}, cert {max(info['cert_orth'], info['cert_sym']):.0e})"
    elif info["route"] == "svd":
        text += f"(rank {info['rank']})"
    return text


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--cond", type=float, default=1e5)
    p.add_argument(
        "--shapes", default="llm,vit-l", help="comma-separated groups (llm, vit-l) or MxN"
    )
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="subset of " + ",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="kernel profile of one f64 call")
    p.add_argument("--gemm", action="store_true", help="measure GEMM rates first")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}")

    try:
        import torch
    except ImportError:
        skip("torch is not installed")
    if not torch.cuda.is_available():
        skip("torch sees no CUDA device")
    try:
        from isofast import _cuda  # type: ignore[attr-defined]
    except ImportError as exc:
        skip(f"isofast._cuda is not built ({exc})")
    if not _cuda.available():
        skip("isofast._cuda sees no CUDA device")

    groups: list[tuple[str, list[tuple[int, int]]]] = []
    for item in args.shapes.split(","):
        if item in SHAPES:
            groups.append(SHAPES[item])
        else:
            m, n = item.split("x")
            groups.append(("custom", [(int(m), int(n))]))

    print(f"device: {_cuda.device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    print(
        f"T = {args.tasks} float32 task matrices per shape, cond(D) = {args.cond:.0e}, "
        f"median of {args.repeats} timed runs after one warm-up; command: {' '.join(sys.argv)}"
    )
    if args.gemm:
        gemm_rates(torch)
    stream = torch.cuda.current_stream().cuda_stream
    rows: list[tuple[str, dict[str, Any]]] = []
    for group, shapes in groups:
        for shape in shapes:
            row = bench_shape(torch, _cuda, shape, args, stream)
            rows.append((group, row))
            t = row["time"]
            print(
                f"{group} {shape[0]}x{shape[1]}: "
                + ", ".join(f"{LABELS[k]} {t[k] * 1e3:.1f} ms" for k in args.variants)
                + (
                    f", speedup ref/f64 {t['ref'] / t['f64']:.1f}x"
                    if {"ref", "f64"} <= set(t)
                    else ""
                )
                + f", f64 svd {row['f64svd']:.2f} s",
                flush=True,
            )
            torch.cuda.empty_cache()

    cols = list(args.variants)
    print()
    head = (
        "| group | shape | "
        + " | ".join(f"{LABELS[k]} ms" for k in cols)
        + (" | ref / iso f64" if {"ref", "f64"} <= set(cols) else "")
        + " | "
        + " | ".join(f"err {k}" for k in cols)
        + " | isofast routes |"
    )
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    sums: dict[str, dict[str, float]] = {}
    for group, row in rows:
        t, e = row["time"], row["err"]
        speed = f" | {t['ref'] / t['f64']:.1f}x" if {"ref", "f64"} <= set(cols) else ""
        routes = " ".join(f"{k}:{route_text(row['info'][k])}" for k in cols if k != "ref")
        print(
            f"| {group} | {row['shape'][0]}x{row['shape'][1]} | "
            + " | ".join(f"{t[k] * 1e3:.1f}" for k in cols)
            + speed
            + " | "
            + " | ".join(f"{e[k]:.1e}" for k in cols)
            + f" | {routes} |"
        )
        acc = sums.setdefault(group, dict.fromkeys(cols, 0.0))
        for k in cols:
            acc[k] += t[k]
    if "ViT-L/14" in sums:
        acc = sums["ViT-L/14"]
        print(
            "\nViT-L/14, one block (4 keys): "
            + ", ".join(f"{LABELS[k]} {acc[k] * 1e3:.0f} ms" for k in cols)
            + "; x24 blocks (visual tower, estimate): "
            + ", ".join(f"{LABELS[k]} {24 * acc[k]:.1f} s" for k in cols)
        )
    print(
        "\nms = median wall milliseconds (synchronised) per key; err = relative Frobenius error "
        "of M vs a float64 torch.linalg.svd of the same D; routes: polar(steps, certificate) "
        "or svd(rank kept)."
    )


if __name__ == "__main__":
    main()
