"""GPU merges (isofast._cuda.merge_matrix: the core's Iso-C, Iso-CTS and TSV-M method code over
the CUDA backend) against the float64 reference and against the CPU merge.

Skipped as a whole, with the reason shown by `pytest -rs`, when isofast._cuda was not built,
when torch is missing, or when no GPU is usable. That `device="cuda"` fails cleanly on such a
machine is checked in test_device.py, which runs everywhere.

What is asserted (T task matrices per key, fresh seeds; replay with ISOFAST_TEST_SEED):

* reference: the designed spectra of test_cut_points.py (cut points at a gap, in a Gaussian
  bulk, on a plateau; tall, wide, square; T = 3 and 8) in float32 and float64 compute, medium
  shapes and its ill-conditioned Iso-CTS concatenation in float32: relative error of the
  update <= 1e-4 (float32) / 1e-10 (float64) vs tests/reference.py, widened only by the
  reference's own sensitivity to eps-sized input perturbations
  (test_methods.check_against_reference, the CPU suite's rule);
* CPU parity: the GPU result equals `isofast.merge` on the CPU (same method, same data) within
  1e-4 (float32 compute) / 1e-10 (float64 compute) on tall, wide, square, rank-deficient and
  ill-conditioned (cond 1e5) keys, with the same sensitivity rule;
* routes: auto (float32 -> Gram, float64 -> SVD), gram and direct all match the reference and
  are reported by take_route_counts();
* torch inputs in float32, bfloat16 and float16 (16-bit in, float32 math, 16-bit out: the
  output is the float32 result rounded, within 1 ulp), a side stream with a float64 output,
  task matrices without a base; cupy inputs when cupy is installed;
* `isofast.merge(..., device="cuda")` of bf16 safetensors checkpoints into a folder, and of
  state dicts in memory, matches the CPU merge (bf16: within 1 ulp for >= 99.9% of the
  entries, or relative error of the update <= 1e-3; tensors merged on the CPU: bitwise);
* errors: host tensors, NaN / Inf, shape mismatches, elementwise kernels and other misuse
  raise isofast.MergeInputError with the reason, and leave the module usable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cut_points import NAME, SPECTRA, shared_input_tasks
from test_cut_points import SHAPES as CUT_SHAPES

import isofast
from isofast._native import core
from isofast.io import CheckpointReader, CheckpointWriter

import reference as ref
from conftest import (
    DEFAULT_SPEC,
    F32_EPS,
    F64_EPS,
    GRID,
    THREADS,
    Fresh,
    base_values,
    convert,
    low_rank_delta,
    make_models,
    rel_update_error,
    to_numpy,
)
from test_methods import ALPHA, COND_FACTOR, check_against_reference, reference_merge

# numpy's BLAS on one thread: the reference's many small SVDs (conftest.single_thread_blas).
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("single_thread_blas")]

try:
    from isofast import _cuda
except ImportError as exc:  # not built: no CUDA toolkit with cuBLAS + cuSOLVER at build time
    pytest.skip(f"isofast._cuda is not built ({exc})", allow_module_level=True)

torch = pytest.importorskip("torch", reason="torch is needed to hand CUDA tensors to isofast")
if not torch.cuda.is_available():
    pytest.skip("torch sees no usable CUDA GPU on this machine", allow_module_level=True)
if not _cuda.available():
    pytest.skip("isofast._cuda sees no usable CUDA GPU on this machine", allow_module_level=True)

METHODS = ("iso_c", "iso_cts", "tsv_m")
KERNELS = {"iso_c": core.Kernel.iso_c, "iso_cts": core.Kernel.iso_cts, "tsv_m": core.Kernel.tsv_m}
REFERENCE: dict[str, Callable[..., np.ndarray]] = {
    "iso_c": ref.iso_c,
    "iso_cts": ref.iso_cts,
    "tsv_m": ref.tsv_m,
}
TOL = {"float32": 1e-4, "float64": 1e-10}
EPS = {"float32": F32_EPS, "float64": F64_EPS}
ROUTE_NAMES = {"gram": "Gram route", "direct": "SVD route"}


# ----------------------------------------------------------------------------- helpers


def options(
    method: str,
    *,
    alpha: float = ALPHA,
    compute64: bool = False,
    route: str = "auto",
    rank_tol: float = -1.0,
    fraction: float = 0.8,
) -> Any:
    opts = core.MergeOptions()
    opts.kernel = KERNELS[method]
    opts.alpha = alpha
    opts.compute64 = compute64
    opts.matrix.rank_tol = rank_tol
    opts.matrix.common_space_fraction = fraction
    opts.matrix.route = getattr(core.MatrixRoute, route)
    return opts


def host_tensor(x: np.ndarray, dtype: str) -> Any:
    """x (float64) rounded to `dtype`, as a CPU torch tensor."""
    return torch.from_numpy(np.array(x, dtype=np.float64)).to(getattr(torch, dtype)).contiguous()


def cuda(x: np.ndarray, dtype: str = "float32") -> Any:
    return host_tensor(x, dtype).cuda()


def f64(t: Any) -> np.ndarray:
    """A torch tensor (any device, any float dtype) as float64 numpy (exact)."""
    return np.asarray(t.detach().to(device="cpu", dtype=torch.float64).numpy())


def gpu_merge(
    method: str,
    finetuned: Sequence[Any],
    base: Any = None,
    *,
    out_dtype: Any = None,
    stream: int | None = None,
    **opts: Any,
) -> Any:
    """base + alpha * M on the GPU (out filled with NaN first: every entry must be written)."""
    like = finetuned[0]
    out = torch.full(
        tuple(like.shape), float("nan"), dtype=out_dtype or like.dtype, device=like.device
    )
    _cuda.merge_matrix(options(method, **opts), list(finetuned), out, base, stream)
    torch.cuda.synchronize()
    assert bool(torch.isfinite(out).all()), f"{method}: entries left unwritten or not finite"
    return out


def spectrum_deltas(
    rng: np.random.Generator, shape: tuple[int, int], cond: float, tasks: int, top: float = 1.0
) -> list[np.ndarray]:
    """`tasks` float64 task matrices whose sum has log-spaced singular values from `top` down
    to top / cond: the common part sum / T plus zero-sum Gaussian parts of the same size."""
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    total = (u * (top * np.logspace(0.0, -np.log10(cond), r))) @ v.T
    rms = float(np.sqrt(np.mean(total**2)))
    noise = [rng.standard_normal(shape) * rms for _ in range(tasks)]
    mean = sum(noise) / tasks
    return [total / tasks + (e - mean) for e in noise]


def limit(
    method: str, deltas64: Sequence[np.ndarray], compute: str, rng: np.random.Generator, **kw: Any
) -> float:
    """TOL[compute], widened by COND_FACTOR x the reference's own change under relative
    eps-sized perturbations of the task matrices (test_methods.check_against_reference's
    rule): an answer that ill-conditioned cannot be asked of any backward-stable route."""
    fn, eps = REFERENCE[method], EPS[compute]
    want = fn(deltas64, eps=eps, **kw)
    scale = float(np.linalg.norm(want)) or 1.0
    worst = 0.0
    for _ in range(3):
        moved = [d * (1.0 + eps * rng.uniform(-1.0, 1.0, size=d.shape)) for d in deltas64]
        worst = max(worst, float(np.linalg.norm(fn(moved, eps=eps, **kw) - want)) / scale)
    return max(TOL[compute], COND_FACTOR * worst)


def assert_update_close(
    got: np.ndarray,
    want: np.ndarray,
    base: np.ndarray | float,
    method: str,
    deltas64: Sequence[np.ndarray],
    compute: str,
    fresh: Fresh,
    what: str,
    **kw: Any,
) -> None:
    base_arr = np.broadcast_to(np.asarray(base, dtype=np.float64), np.shape(want))
    err = rel_update_error(got, want, base_arr)
    if err <= TOL[compute]:
        return
    lim = limit(method, deltas64, compute, fresh.rng, **kw)
    routes = _cuda.take_route_counts()
    assert err <= lim, f"{what}: relative error {err:.2e} > {lim:.1e}; routes {routes} ({fresh})"


def bf16_bits_of(x: np.ndarray) -> np.ndarray:
    """float64 values rounded to bfloat16, as uint16 bits."""
    return np.asarray(host_tensor(x, "bfloat16").view(torch.int16).numpy().view(np.uint16))


def ulps(a: Any, b: Any) -> np.ndarray:
    """|a - b| in units in the last place of two same-dtype 16-bit torch tensors (same signs)."""
    ia = a.detach().cpu().view(torch.int16).numpy().astype(np.int32)
    ib = b.detach().cpu().view(torch.int16).numpy().astype(np.int32)
    return np.asarray(np.abs(ia - ib))


# ----------------------------------------------------------------------------- module API


def test_module_basics() -> None:
    name = _cuda.device_name(0)
    assert isinstance(name, str) and name
    _cuda.synchronize()
    _cuda.take_route_counts()
    assert _cuda.take_route_counts() == {}, "take_route_counts() must clear the counts"


def test_release_and_reuse(fresh: Fresh) -> None:
    """release() drops the cached handles and workspaces; the next call builds them again."""
    deltas = spectrum_deltas(fresh.rng, (64, 48), 1e2, 3)
    fts = [cuda(d) for d in deltas]
    first = gpu_merge("iso_cts", fts)
    _cuda.release()
    second = gpu_merge("iso_cts", fts)
    _cuda.release()
    assert rel_update_error(f64(second), f64(first), np.zeros((64, 48))) <= 1e-6, str(fresh)


# ----------------------------------------------------------------------------- vs the reference


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("tasks", [3, 8])
@pytest.mark.parametrize("shape", CUT_SHAPES, ids=str)
@pytest.mark.parametrize("spectrum", sorted(SPECTRA))
@pytest.mark.parametrize("method", METHODS)
def test_cut_points_match_reference(
    method: str, spectrum: str, shape: tuple[int, int], tasks: int, compute: str, fresh: Fresh
) -> None:
    """test_cut_points.py's cases on the GPU: float32 compute (Gram routes) and float64
    compute (cuSOLVER SVD routes)."""
    rng = fresh.rng
    base64 = {NAME: base_values(rng, shape)}
    # On the 2**-20 grid, base + delta is exact in float32: both sides see the same values.
    deltas = [np.round(d / GRID) * GRID for d in SPECTRA[spectrum](rng, shape, tasks, method)]
    fts64 = [{NAME: base64[NAME] + d} for d in deltas]
    got = gpu_merge(
        method,
        [cuda(f[NAME], compute) for f in fts64],
        cuda(base64[NAME], compute),
        compute64=compute == "float64",
    )
    check_against_reference(
        {NAME: f64(got)}, base64, fts64, method, {}, seed=0, compute=compute, fresh=fresh
    )


@pytest.mark.parametrize("shape", [(1024, 384), (384, 1024)], ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_medium_shapes_match_reference(method: str, shape: tuple[int, int], fresh: Fresh) -> None:
    """Shapes that take more than one thread block everywhere, T = 8, cut points at gaps."""
    rng = fresh.rng
    base64 = {NAME: base_values(rng, shape)}
    deltas = [np.round(d / GRID) * GRID for d in SPECTRA["gap"](rng, shape, 8, method)]
    fts64 = [{NAME: base64[NAME] + d} for d in deltas]
    got = gpu_merge(method, [cuda(f[NAME]) for f in fts64], cuda(base64[NAME]))
    check_against_reference(
        {NAME: f64(got)}, base64, fts64, method, {}, seed=0, compute="float32", fresh=fresh
    )


def test_iso_cts_ill_conditioned_concatenation(fresh: Fresh) -> None:
    """test_cut_points' regression on the GPU: T = 20 tasks sharing their input basis, whose
    Iso-CTS concatenation has cond 1e4..1e5 (the float64 polar fallback must hold 1e-4)."""
    shape, tasks = (768, 256), 20
    rng = fresh.rng
    base64 = {NAME: base_values(rng, shape)}
    deltas = [np.round(d / GRID) * GRID for d in shared_input_tasks(rng, shape, tasks)]
    fts64 = [{NAME: base64[NAME] + d} for d in deltas]
    _cuda.take_route_counts()
    got = gpu_merge("iso_cts", [cuda(f[NAME]) for f in fts64], cuda(base64[NAME]))
    routes = _cuda.take_route_counts()
    want = reference_merge(base64, fts64, "iso_cts", {}, seed=0, compute="float32")
    err = rel_update_error(f64(got), want[NAME], base64[NAME])
    assert err <= 1e-4, f"relative error {err:.1e}; routes {routes} ({fresh})"


@pytest.mark.parametrize("route", ["auto", "gram", "direct"])
@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("method", METHODS)
def test_routes(method: str, compute: str, route: str, fresh: Fresh) -> None:
    """Every route of every method matches the reference and is counted under its name."""
    rng = fresh.rng
    shape = (120, 80)
    deltas = spectrum_deltas(rng, shape, 1e2, 3)
    seen = [f64(host_tensor(d, compute)) for d in deltas]
    _cuda.take_route_counts()
    got = gpu_merge(
        method,
        [cuda(d, compute) for d in deltas],
        compute64=compute == "float64",
        route=route,
    )
    routes = _cuda.take_route_counts()
    taken = route if route != "auto" else ("gram" if compute == "float32" else "direct")
    key = f"{method}: {ROUTE_NAMES[taken]}"
    assert routes.get(key) == 1, f"expected {key!r} once, got {routes} ({fresh})"
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in routes.items()), routes
    want = ALPHA * REFERENCE[method](seen, eps=EPS[compute])
    assert_update_close(f64(got), want, 0.0, method, seen, compute, fresh, f"{route} route")


# ----------------------------------------------------------------------------- vs the CPU merge

PARITY_CASES = ["tall", "wide", "square", "rank_deficient", "ill_conditioned"]


def parity_deltas(rng: np.random.Generator, case: str) -> list[np.ndarray]:
    if case == "tall":
        return spectrum_deltas(rng, (160, 64), 1e2, 4)
    if case == "wide":
        return spectrum_deltas(rng, (64, 160), 1e2, 4)
    if case == "square":
        return spectrum_deltas(rng, (96, 96), 1e2, 4)
    if case == "rank_deficient":  # rank 4 per task, 12 for the sum, of 60; exact in float32
        return [low_rank_delta(rng, (80, 60), 4) for _ in range(3)]
    if case == "ill_conditioned":  # sum with cond 1e5; top 10 keeps float32 rounding of
        # base + delta (~1e-6 in norm) below its smallest singular value (1e-4)
        return spectrum_deltas(rng, (128, 96), 1e5, 4, top=10.0)
    raise ValueError(case)


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("case", PARITY_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_matches_the_cpu_merge(method: str, case: str, compute: str, fresh: Fresh) -> None:
    rng = fresh.rng
    deltas = parity_deltas(rng, case)
    shape = deltas[0].shape
    base_host = host_tensor(base_values(rng, shape), compute)
    ft_host = [host_tensor(f64(base_host) + d, compute) for d in deltas]
    # What both sides see, in float64 (exact): the task matrices for the sensitivity rule.
    base64 = f64(base_host)
    seen = [f64(t) - base64 for t in ft_host]

    got = gpu_merge(
        method, [t.cuda() for t in ft_host], base_host.cuda(), compute64=compute == "float64"
    )
    want = isofast.merge(
        {NAME: base_host.numpy()},
        [{NAME: t.numpy()} for t in ft_host],
        method,
        ALPHA,
        compute_dtype=compute,
        threads=THREADS,
    )[NAME]
    assert got.dtype == getattr(torch, compute)
    assert_update_close(
        f64(got), to_numpy(want), base64, method, seen, compute, fresh, f"{case} vs CPU"
    )


# ----------------------------------------------------------------------------- dtypes, streams


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method", METHODS)
def test_torch_input_dtypes(method: str, dtype: str, fresh: Fresh) -> None:
    """16-bit inputs are converted on the device, the math is float32, and a 16-bit output is
    the float32 result rounded (within 1 ulp)."""
    rng = fresh.rng
    shape = (72, 56)
    base = host_tensor(base_values(rng, shape), dtype)  # multiples of 1/16: exact in 16 bits
    # Updates of ~0.05 per entry: several bf16 ulps of the base (2**-8 .. 2**-6), so that the
    # fine-tunes do not round back to the base.
    deltas = spectrum_deltas(rng, shape, 1e3, 3, top=2.0)
    fts = [host_tensor(f64(base) + d, dtype) for d in deltas]
    base64 = f64(base)
    seen = [f64(t) - base64 for t in fts]
    gpu_base, gpu_fts = base.cuda(), [t.cuda() for t in fts]

    got32 = gpu_merge(method, gpu_fts, gpu_base, out_dtype=torch.float32)
    want = base64 + ALPHA * REFERENCE[method](seen, eps=F32_EPS)
    assert_update_close(f64(got32), want, base64, method, seen, "float32", fresh, dtype)

    if dtype != "float32":
        got = gpu_merge(method, gpu_fts, gpu_base)
        assert got.dtype == getattr(torch, dtype)
        worst = int(ulps(got, got32.to(got.dtype)).max())
        assert worst <= 1, f"{dtype} output {worst} ulps from the rounded float32 result"


def test_side_stream_and_float64_output(fresh: Fresh) -> None:
    """Inputs made on a side stream (DLPack stream hand-off), merged on it, float64 output:
    float64 compute within 1e-10 of the reference, float32 compute within 1e-4."""
    rng = fresh.rng
    deltas = [
        d.astype(np.float32).astype(np.float64) for d in spectrum_deltas(rng, (96, 72), 1e3, 4)
    ]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fts = [
            torch.from_numpy(d.astype(np.float32)).to("cuda", non_blocking=False) for d in deltas
        ]
        outs = {}
        for compute in ("float64", "float32"):
            out = torch.full(fts[0].shape, float("nan"), dtype=torch.float64, device="cuda")
            opts = options("iso_cts", compute64=compute == "float64")
            _cuda.merge_matrix(opts, fts, out, None, side.cuda_stream)
            outs[compute] = out
    side.synchronize()
    for compute, out in outs.items():
        want = ALPHA * ref.iso_cts(deltas, eps=EPS[compute])
        assert_update_close(f64(out), want, 0.0, "iso_cts", deltas, compute, fresh, compute)


@pytest.mark.parametrize("method", METHODS)
def test_task_matrices_without_base(method: str, fresh: Fresh) -> None:
    """base=None: the fine-tuned tensors are the task matrices themselves; out = alpha * M."""
    rng = fresh.rng
    deltas = spectrum_deltas(rng, (80, 112), 1e3, 5)
    got = gpu_merge(method, [cuda(d) for d in deltas], alpha=1.3)
    seen = [d.astype(np.float32).astype(np.float64) for d in deltas]
    want = 1.3 * REFERENCE[method](seen, eps=F32_EPS)
    assert_update_close(f64(got), want, 0.0, method, seen, "float32", fresh, "no base")


def test_rank_tol_and_common_space_fraction(fresh: Fresh) -> None:
    """Explicit rank_tol (drops the weak directions) and common_space_fraction reach the core."""
    rng = fresh.rng
    deltas = spectrum_deltas(rng, (90, 60), 1e4, 3)
    seen = [d.astype(np.float32).astype(np.float64) for d in deltas]
    fts = [cuda(d) for d in deltas]
    got = gpu_merge("iso_c", fts, rank_tol=1e-2, alpha=1.0)
    want = ref.iso_c(seen, rank_tol=1e-2, eps=F32_EPS)
    assert_update_close(
        f64(got), want, 0.0, "iso_c", seen, "float32", fresh, "rank_tol", rank_tol=1e-2
    )
    got = gpu_merge("iso_cts", fts, fraction=0.5, alpha=1.0)
    want = ref.iso_cts(seen, common_space_fraction=0.5, eps=F32_EPS)
    assert_update_close(
        f64(got),
        want,
        0.0,
        "iso_cts",
        seen,
        "float32",
        fresh,
        "fraction",
        common_space_fraction=0.5,
    )


@pytest.mark.parametrize("method", METHODS)
def test_cupy_inputs(method: str, fresh: Fresh) -> None:
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # not installed, or built for another CUDA
        pytest.skip(f"cupy is not usable here ({type(exc).__name__}: {exc})")
    rng = fresh.rng
    shape = (64, 96)
    base64 = base_values(rng, shape)
    deltas = [np.round(d / GRID) * GRID for d in spectrum_deltas(rng, shape, 1e3, 4, top=0.5)]
    base = cp.asarray(base64.astype(np.float32))
    fts = [cp.asarray((base64 + d).astype(np.float32)) for d in deltas]
    out = cp.full(shape, cp.nan, dtype=cp.float32)
    stream = cp.cuda.get_current_stream()
    _cuda.merge_matrix(options(method), fts, out, base, stream.ptr)
    stream.synchronize()
    got = cp.asnumpy(out).astype(np.float64)
    want = base64 + ALPHA * REFERENCE[method](deltas, eps=F32_EPS)
    assert_update_close(got, want, base64, method, deltas, "float32", fresh, "cupy")


# ----------------------------------------------------------------------------- isofast.merge

DISK_SPEC: dict[str, tuple[int, ...]] = {
    "blocks.0.attn.qkv.weight": (96, 32),  # tall
    "blocks.0.attn.out.weight": (48, 48),  # square
    "blocks.0.mlp.fc.weight": (40, 88),  # wide
    "blocks.0.mlp.fc.bias": (40,),  # mean, on the CPU
    "text_projection": (32, 24),  # excluded from matrix methods: mean, on the CPU
    "patch.conv.weight": (4, 3, 5),  # not 2-D: mean, on the CPU
}


def is_gpu_key(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and "text_projection" not in name


def gpu_was_used(before_peak: int) -> bool:
    """Evidence that a merge put work on the GPU: routes noted by isofast._cuda, or tensors
    that reached the device through torch."""
    return bool(_cuda.take_route_counts()) or torch.cuda.max_memory_allocated() > before_peak


@pytest.mark.parametrize("method", METHODS)
def test_bf16_checkpoints_merged_on_the_gpu(method: str, tmp_path: Path, fresh: Fresh) -> None:
    rng = fresh.rng
    base = {n: base_values(rng, s) for n, s in DISK_SPEC.items()}

    def write(folder: Path, model: dict[str, np.ndarray]) -> str:
        with CheckpointWriter(folder) as w:
            for name, x in model.items():
                w.add(name, bf16_bits_of(x), "BF16")
        return str(folder)

    base_path = write(tmp_path / "base", base)
    paths = [
        write(
            tmp_path / f"ft{t}",
            {n: x + 0.05 * rng.standard_normal(x.shape) for n, x in base.items()},
        )
        for t in range(3)
    ]
    _cuda.take_route_counts()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated()
    isofast.merge(
        base_path, paths, method, ALPHA, device="cuda", out=tmp_path / "gpu", threads=THREADS
    )
    assert gpu_was_used(before), "device='cuda' merged nothing on the GPU"
    isofast.merge(base_path, paths, method, ALPHA, out=tmp_path / "cpu", threads=THREADS)

    def as_f64(bits: np.ndarray) -> np.ndarray:
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)

    with CheckpointReader(tmp_path / "gpu") as g, CheckpointReader(tmp_path / "cpu") as c:
        assert set(g.names()) == set(c.names()) == set(DISK_SPEC)
        for name, shape in DISK_SPEC.items():
            assert g.info(name).dtype == c.info(name).dtype == "BF16", name
            gb, cb = np.array(g.get(name)), np.array(c.get(name))
            assert gb.shape == cb.shape == shape, name
            if not is_gpu_key(name, shape):
                np.testing.assert_array_equal(gb, cb, err_msg=f"{name} (merged on the CPU)")
                continue
            ulp = np.abs(gb.astype(np.int32) - cb.astype(np.int32))
            close = float(np.mean(ulp <= 1))
            base16 = as_f64(bf16_bits_of(base[name]))
            err = rel_update_error(as_f64(gb), as_f64(cb), base16)
            assert close >= 0.999 or err <= 1e-3, (
                f"{name}: {100 * close:.2f}% within 1 ulp (max {int(ulp.max())}), relative "
                f"error of the update {err:.1e} ({fresh})"
            )


@pytest.mark.parametrize("resident", ["cpu", "cuda"])
@pytest.mark.parametrize("method", METHODS)
def test_state_dicts_merged_on_the_gpu(method: str, resident: str, fresh: Fresh) -> None:
    """In memory: torch float32 state dicts on the host, or already on the GPU (whose matrix
    keys then merge there without leaving it). Merged tensors come back where the inputs
    live; the GPU's matrices match the CPU merge within 1e-4, every other tensor is bitwise
    the CPU's."""
    rng = fresh.rng
    base64, fts64 = make_models(rng, 3, DEFAULT_SPEC)
    base = convert(base64, "torch", "float32")
    fts = [convert(f, "torch", "float32") for f in fts64]
    want = isofast.merge(base, fts, method, ALPHA, threads=THREADS)
    if resident == "cuda":
        base = {n: x.cuda() for n, x in base.items()}
        fts = [{n: x.cuda() for n, x in f.items()} for f in fts]
    _cuda.take_route_counts()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated()
    got = isofast.merge(base, fts, method, ALPHA, device="cuda", threads=THREADS)
    torch.cuda.synchronize()
    assert gpu_was_used(before), "device='cuda' merged nothing on the GPU"
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.device.type == resident, f"{name} came back on {g.device}, inputs on {resident}"
        g = g.cpu()
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), name
        if not (w.is_floating_point() and is_gpu_key(name, tuple(w.shape))):
            assert torch.equal(g, w), f"{name} (merged on the CPU)"
            continue
        b = to_numpy(base[name].cpu())
        seen = [to_numpy(f[name].cpu()) - b for f in fts]
        assert_update_close(to_numpy(g), to_numpy(w), b, method, seen, "float32", fresh, name)


# ----------------------------------------------------------------------------- errors


def test_errors_are_merge_input_errors() -> None:
    shape = (4, 3)
    x = torch.ones(shape, device="cuda") + torch.arange(3, device="cuda")
    out = torch.empty(shape, device="cuda")
    opts = options("iso_c")
    err = isofast.MergeInputError

    def call(fts: Any, o: Any = out, base: Any = None, opt: Any = opts) -> None:
        _cuda.merge_matrix(opt, fts, o, base, None)

    on_cuda = "needs a tensor on a CUDA device"
    with pytest.raises(err, match=on_cuda):
        call([torch.ones(shape)])
    with pytest.raises(err, match=on_cuda):
        call([x], torch.empty(shape))
    with pytest.raises(err, match=on_cuda):
        call([x], out, torch.ones(shape))
    with pytest.raises(err, match=on_cuda):
        call([np.ones(shape, dtype=np.float32)])
    with pytest.raises(err, match="__dlpack__"):
        call([[1.0, 2.0, 3.0]])

    bad = x.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(err, match="NaN or Inf"):
        call([x, bad])
    inf_base = torch.zeros(shape, device="cuda")
    inf_base[0, 2] = float("inf")
    with pytest.raises(err, match="NaN or Inf"):
        call([x], out, inf_base)

    with pytest.raises(err, match="different shape"):
        call([torch.ones((3, 4), device="cuda")])
    with pytest.raises(err, match="different shape"):
        call([x], out, torch.zeros((4, 4), device="cuda"))
    with pytest.raises(err, match="2-D"):
        call([torch.ones(12, device="cuda")], torch.empty(12, device="cuda"))
    with pytest.raises(err, match="at least one"):
        call([])
    with pytest.raises(err, match="not contiguous"):
        call([torch.ones((3, 4), device="cuda").t()])
    with pytest.raises(err, match="float32/float64/float16/bfloat16"):
        call([torch.ones(shape, dtype=torch.int32, device="cuda")])

    for kernel in ("mean", "sum", "ties", "consensus"):
        elementwise = options("iso_c")
        elementwise.kernel = getattr(core.Kernel, kernel)
        with pytest.raises(err, match="iso_c, iso_cts or tsv_m"):
            call([x], out, None, elementwise)

    # Nothing above poisoned the module: a valid call still works.
    good = gpu_merge("iso_c", [x, 2 * x])
    assert tuple(good.shape) == shape
