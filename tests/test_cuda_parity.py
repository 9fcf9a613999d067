"""GPU Iso-C (isofast._cuda, csrc/cuda/iso_c_cuda.cu) against the float64 reference.

Skipped, with the reason shown by `pytest -ra`, when the CUDA module was not built (no nvcc,
cuBLAS or cuSOLVER at build time), when no GPU is usable, or without torch with CUDA.

Inputs: fresh random task matrices whose sum D has log-spaced singular values (condition
numbers 1e2..1e6), float32 on the device. Asserted: relative error of the merged update vs
reference.iso_c <= 1e-4 (float32 data), certificate <= 1e-5 on the polar route (directly and
through the QR-first reduction of long matrices), and a loud fallback (RuntimeWarning, float64
SVD route with the contract's rank cut) when the certificate cannot hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import isofast

import reference as ref
from conftest import Fresh

pytestmark = pytest.mark.cuda

try:
    from isofast import _cuda  # type: ignore[attr-defined]
except ImportError as exc:  # not built: no CUDA toolkit with cuBLAS + cuSOLVER at build time
    pytest.skip(f"isofast._cuda is not built ({exc})", allow_module_level=True)

torch = pytest.importorskip("torch")
if not _cuda.available() or not torch.cuda.is_available():
    pytest.skip("no usable CUDA GPU on this machine", allow_module_level=True)

# Square, tall, wide; the last two are long (max >= 3 min) and run with the QR-first route
# forced (automatic only from min(m, n) >= 2048).
SHAPES = [(48, 48), (96, 40), (40, 96), (384, 256), (256, 640), (40, 160), (200, 48)]
CONDS = [1e2, 1e4, 1e5, 1e6]
TASKS = 3


def spectrum_deltas(
    rng: np.random.Generator, shape: tuple[int, int], cond: float, tasks: int = TASKS
) -> list[np.ndarray]:
    """`tasks` float32 task matrices whose float64 sum has log-spaced singular values from 1
    down to 1/cond (times a random scale)."""
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    scale = 10.0 ** rng.uniform(-3, 0)
    total = (u * (np.logspace(0.0, -np.log10(cond), r) * scale)) @ v.T
    parts = [rng.standard_normal(shape) * scale / np.sqrt(m * n) for _ in range(tasks - 1)]
    parts.append(total - sum(parts))
    return [p.astype(np.float32) for p in parts]


def to_cuda(x: np.ndarray) -> Any:
    return torch.from_numpy(np.ascontiguousarray(x)).cuda()


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def run_gpu(deltas: list[np.ndarray], **kw: Any) -> tuple[np.ndarray, dict[str, Any]]:
    out = torch.zeros(deltas[0].shape, dtype=torch.float32, device="cuda")
    info = _cuda.iso_c([to_cuda(d) for d in deltas], out, **kw)
    torch.cuda.synchronize()
    return out.cpu().numpy().astype(np.float64), info


def test_device_name() -> None:
    name = _cuda.device_name()
    assert isinstance(name, str) and name


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_iso_c_matches_reference(shape: tuple[int, int], fresh: Fresh) -> None:
    for cond in CONDS:
        deltas = spectrum_deltas(fresh.rng, shape, cond)
        want = ref.iso_c([d.astype(np.float64) for d in deltas])
        got, info = run_gpu(deltas, qr=True if max(shape) >= 3 * min(shape) else None)
        ctx = f"cond {cond:.0e}, {info}, {fresh}"
        assert info["route"] == "polar", ctx
        assert info["cert_orth"] <= 1e-5 and info["cert_sym"] <= 1e-5, ctx
        assert 12 <= info["steps"] <= 14, ctx
        err = rel(got, want)
        assert err <= 1e-4, f"relative error {err:.2e} > 1e-4 ({ctx})"


def test_qr_route_on_and_off(fresh: Fresh) -> None:
    """The QR-first reduction (forced on a square-ish matrix, off on a long one) changes
    nothing beyond rounding."""
    for shape, qr in [((120, 100), True), ((300, 64), False), ((64, 300), True)]:
        deltas = spectrum_deltas(fresh.rng, shape, 1e5)
        want = ref.iso_c([d.astype(np.float64) for d in deltas])
        got, info = run_gpu(deltas, qr=qr)
        assert info["route"] == "polar" and info["qr"] == qr, (shape, info, fresh)
        assert rel(got, want) <= 1e-4, (shape, info, fresh)


def test_svd_route_matches_reference(fresh: Fresh) -> None:
    deltas = spectrum_deltas(fresh.rng, (200, 120), 1e5)
    want = ref.iso_c([d.astype(np.float64) for d in deltas])
    got, info = run_gpu(deltas, force_svd=True)
    assert info["route"] == "svd" and info["rank"] == 120, (info, fresh)
    assert rel(got, want) <= 1e-4, (info, fresh)


def test_base_alpha_and_bf16(fresh: Fresh) -> None:
    """out = base + alpha * M, with bf16 fine-tuned weights converted on the device."""
    rng = fresh.rng
    shape = (128, 96)
    base = (rng.integers(8, 33, size=shape) / 16.0).astype(np.float32)
    deltas = spectrum_deltas(rng, shape, 1e3)
    # Entries of the sum up to 0.1 (Iso-C is homogeneous): deltas far below bf16's resolution
    # near the base (2**-8) would round away and leave D = 0.
    grow = 0.1 / float(np.max(np.abs(np.sum(deltas, axis=0))))
    deltas = [(d * grow).astype(np.float32) for d in deltas]
    fts = [torch.from_numpy(base + d).to(torch.bfloat16).cuda() for d in deltas]
    # The deltas the GPU sees: bf16-rounded fine-tunes minus the base, in float64.
    seen = [ft.double().cpu().numpy() - base.astype(np.float64) for ft in fts]
    want = 0.7 * ref.iso_c(seen)
    out = torch.zeros(shape, dtype=torch.float32, device="cuda")
    info = _cuda.iso_c(fts, out, base=to_cuda(base), alpha=0.7)
    got = out.cpu().numpy().astype(np.float64) - base
    assert info["route"] == "polar", (info, fresh)
    assert rel(got, want) <= 1e-4, (info, fresh)


def test_float32_compute_route(fresh: Fresh) -> None:
    deltas = spectrum_deltas(fresh.rng, (96, 64), 1e2)
    want = ref.iso_c([d.astype(np.float64) for d in deltas])
    got, info = run_gpu(deltas, compute="float32")
    assert info["route"] == "polar" and info["cert_orth"] <= 1e-5, (info, fresh)
    assert rel(got, want) <= 1e-4, (info, fresh)


def test_rank_deficient_falls_back_loudly(fresh: Fresh) -> None:
    """An exactly rank-10 sum cannot be certified: RuntimeWarning, float64 SVD route, contract's
    rank cut (16 * eps of the compute type, relative to sigma_max) raised to gesvdp's own noise
    floor (2 * h_err_sigma: its null singular values sit near 5e-13 * sigma_max on an H200).
    The task matrices are products of multiples of 1/16 (conftest.low_rank_delta's rule), so
    they and their float32 sum are exact: float32 rounding noise would otherwise sit near
    1e-8 * sigma_max, above the float64 cut, and count as genuine directions."""
    rng = fresh.rng
    m, n, k = 80, 60, 5
    deltas = [
        (rng.integers(-8, 9, size=(m, k)) / 16.0) @ (rng.integers(-8, 9, size=(k, n)) / 16.0)
        for _ in range(2)
    ]
    deltas = [deltas[0].astype(np.float32), (-0.5 * deltas[0] + deltas[1]).astype(np.float32)]
    want = ref.iso_c([d.astype(np.float64) for d in deltas])
    with pytest.warns(RuntimeWarning, match="fell back to the SVD route"):
        got, info = run_gpu(deltas)
    assert info["route"] == "svd" and info["rank"] == 2 * k, (info, fresh)
    assert rel(got, want) <= 1e-4, (info, fresh)


def test_stream_and_dtypes(fresh: Fresh) -> None:
    """A side stream (DLPack stream hand-off), float64 / bfloat16 outputs, float16 inputs."""
    deltas = spectrum_deltas(fresh.rng, (72, 56), 1e3)
    want = ref.iso_c([d.astype(np.float64) for d in deltas])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        ins = [to_cuda(d) for d in deltas]
        out64 = torch.zeros(deltas[0].shape, dtype=torch.float64, device="cuda")
        info = _cuda.iso_c(ins, out64, stream=side.cuda_stream)
        outbf = torch.zeros(deltas[0].shape, dtype=torch.bfloat16, device="cuda")
        _cuda.iso_c(ins, outbf, stream=side.cuda_stream)
    side.synchronize()
    assert info["route"] == "polar", (info, fresh)
    assert rel(out64.cpu().numpy(), want) <= 1e-6, (info, fresh)  # float32 inputs, f64 math
    assert rel(outbf.double().cpu().numpy(), want) <= 1e-2, (info, fresh)  # bf16 rounding
    half = [torch.from_numpy(d * 1024.0).half().cuda() for d in deltas]  # fp16 normal range
    seen = [h.double().cpu().numpy() for h in half]
    out = torch.zeros(deltas[0].shape, dtype=torch.float32, device="cuda")
    info = _cuda.iso_c(half, out)
    assert rel(out.double().cpu().numpy(), ref.iso_c(seen)) <= 1e-4, (info, fresh)


def test_errors() -> None:
    x = torch.ones((4, 3), device="cuda")
    with pytest.raises(ValueError, match="CUDA device"):
        _cuda.iso_c([torch.ones((4, 3))], x)
    with pytest.raises(ValueError, match="different shape"):
        _cuda.iso_c([torch.ones((3, 4), device="cuda")], x)
    bad = torch.ones((4, 3), device="cuda")
    bad[1, 1] = float("nan")
    with pytest.raises(isofast.MergeInputError, match="NaN or Inf"):
        _cuda.iso_c([bad], x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_from_disk_on_the_gpu(tmp_path: Any, fresh: Fresh, dtype: str) -> None:
    """`device: cuda` runs Iso-C's matrices on the GPU and everything else on the CPU: the
    merged checkpoint matches the CPU merge (update within 1e-4; vectors bitwise)."""
    from dataclasses import replace

    from isofast.api import run
    from isofast.io import CheckpointReader, CheckpointWriter
    from isofast.request import MergeRequest

    rng = fresh.rng
    shapes = {"a.weight": (64, 48), "b.weight": (96, 96), "c.weight": (40, 120), "a.bias": (64,)}

    def save(folder: Any, tensors: dict[str, np.ndarray]) -> str:
        with CheckpointWriter(folder) as w:
            for name, x in tensors.items():
                if dtype == "bfloat16":
                    bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
                    w.add(name, bits.view(np.uint16), "BF16")
                else:
                    w.add(name, x)
        return str(folder)

    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    paths = [save(tmp_path / "base", base)]
    for t in range(3):
        ft = {
            n: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32) for n, x in base.items()
        }
        paths.append(save(tmp_path / f"ft{t}", ft))
    request = MergeRequest(
        base=paths[0], models=tuple(paths[1:]), method="iso_c", out_dtype="float32"
    )
    run(request, tmp_path / "cpu")
    run(replace(request, device="cuda"), tmp_path / "gpu")
    with CheckpointReader(tmp_path / "cpu") as cpu, CheckpointReader(tmp_path / "gpu") as gpu:
        assert set(cpu.names()) == set(gpu.names()) == set(shapes)
        for name in shapes:
            want, got = cpu.get(name).astype(np.float64), gpu.get(name).astype(np.float64)
            if len(shapes[name]) == 1:
                np.testing.assert_array_equal(got, want)  # merged on the CPU in both runs
                continue
            b = base[name].astype(np.float64)
            if dtype == "bfloat16":
                b = torch.from_numpy(base[name]).to(torch.bfloat16).double().numpy()
            assert rel(got - b, want - b) <= 1e-4, (name, fresh)
    if dtype == "bfloat16":  # bf16 outputs too: the float32 result, rounded (within 1 ulp)
        run(replace(request, device="cuda", out_dtype=None), tmp_path / "gpu16")
        with CheckpointReader(tmp_path / "gpu") as f32, CheckpointReader(tmp_path / "gpu16") as b:
            for name in shapes:
                rounded = torch.from_numpy(np.array(f32.get(name))).to(torch.bfloat16)
                want16 = rounded.view(torch.int16).numpy().view(np.uint16).astype(np.int32)
                got16 = b.get(name).astype(np.int32)
                assert np.abs(got16 - want16).max() <= 1, (name, fresh)
