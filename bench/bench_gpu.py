"""GPU Iso-C: isofast._cuda (certified polar iteration, SVD fallback) vs a PyTorch reference loop.

For each 2-D shape (LLM-sized 4096 x 4096 and 4096 x 14336, the ViT-L/14 block matrices) and
T task matrices on the GPU, side by side in one run:
  torch ref      D = sum_t D_t (float32); U, S, Vh = torch.linalg.svd(D); M = S.mean() U Vh
  isofast f64    _cuda.iso_c(..., compute="float64")   polar iteration, float64 GEMMs
  isofast f32    _cuda.iso_c(..., compute="float32")   polar iteration, float32 GEMMs (the
                 rank cut of the contract is max(m, n) * eps32, so real spectra fall back)
  isofast svd    _cuda.iso_c(..., force_svd=True)       cusolverDnXgesvdp route
Times are medians over --repeats runs after one warm-up, each synchronised. Errors are the
relative Frobenius error of M against a float64 torch.linalg.svd of the same D.

Inputs: D = U diag(s) V^T with log-spaced s (condition number --cond, default 1e5, inside the
1e4..2.5e5 of real task sums), split into T random parts, float32 on the device.

Exits 0 with a message when there is no CUDA GPU, no torch with CUDA or no isofast._cuda.
Run: python bench/bench_gpu.py [--repeats 3] [--tasks 8] [--shapes 4096x4096,1024x4096]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

SHAPES: dict[str, list[tuple[int, int]]] = {
    "LLM 4096": [(4096, 4096), (4096, 14336)],
    "ViT-L/14": [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)],
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


def timed(torch: Any, fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    result = fn()  # warm-up (cuBLAS/cuSOLVER handles, workspaces, allocator)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bench_shape(torch: Any, cuda: Any, shape: tuple[int, int], args: Any, stream: int) -> str:
    """One table row (without the group column) for one shape."""
    deltas = make_deltas(torch, shape, args.tasks, args.cond, args.seed)
    u, s, vh = torch.linalg.svd(sum(d.double() for d in deltas), full_matrices=False)
    want = s.mean() * (u @ vh)
    del u, s, vh

    def torch_ref() -> Any:
        d = torch.stack(deltas).sum(0)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        return s.mean() * (u @ vh)

    def iso(**kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            out = torch.empty(shape, dtype=torch.float32, device="cuda")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # f32 falls back loudly by design: see routes
                info = cuda.iso_c(deltas, out, stream=stream, **kw)
            return out, info

        return run

    def err(m: Any) -> float:
        return float(torch.linalg.norm(m.double() - want) / torch.linalg.norm(want))

    t_ref, m_ref = timed(torch, torch_ref, args.repeats)
    t64, (m64, i64) = timed(torch, iso(compute="float64"), args.repeats)
    t32, (m32, i32) = timed(torch, iso(compute="float32"), args.repeats)
    tsv, (msv, isv) = timed(torch, iso(force_svd=True), args.repeats)
    routes = f"f64:{i64['route']}({i64['steps']}) f32:{i32['route']} svd:{isv['route']}"
    return (
        f"{shape[0]:>5}x{shape[1]:<5} | {t_ref * 1e3:8.1f}m {t64 * 1e3:8.1f}m "
        f"{t32 * 1e3:8.1f}m {tsv * 1e3:8.1f}m | {t_ref / t64:6.1f}x | {err(m_ref):8.1e} "
        f"{err(m64):8.1e} {err(m32):8.1e} {err(msv):8.1e} | {routes}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--cond", type=float, default=1e5)
    p.add_argument("--shapes", default="", help="comma-separated MxN (default: all groups)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

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

    groups = SHAPES
    if args.shapes:
        dims = [s.split("x") for s in args.shapes.split(",")]
        groups = {"custom": [(int(m), int(n)) for m, n in dims]}

    print(f"device: {_cuda.device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    print(
        f"T = {args.tasks} float32 task matrices per shape, cond(D) = {args.cond:.0e}, "
        f"median of {args.repeats} runs\n"
    )
    head = (
        f"{'group':<9} {'shape':>11} | {'torch ref':>9} {'iso f64':>9} {'iso f32':>9} "
        f"{'iso svd':>9} | {'speedup':>7} | {'err ref':>8} {'err f64':>8} {'err f32':>8} "
        f"{'err svd':>8} | routes"
    )
    print(head)
    print("-" * len(head))
    stream = torch.cuda.current_stream().cuda_stream
    for group, shapes in groups.items():
        for shape in shapes:
            print(f"{group:<9} " + bench_shape(torch, _cuda, shape, args, stream))
            torch.cuda.empty_cache()
    print("\nm = milliseconds; speedup = torch ref / isofast f64. iso f32 falls back to the SVD")
    print("route (with a warning) whenever cond(D) > 1 / (max(m, n) * eps32): see its route.")


if __name__ == "__main__":
    main()
