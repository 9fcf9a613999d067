"""GPU Iso-C (isofast._cuda, csrc/cuda/iso_c_cuda.cu) against the float64 reference.

Skipped, with the reason shown by `pytest -ra`, when the CUDA module was not built (no nvcc,
cuBLAS or cuSOLVER at build time), when no GPU is usable, or without torch with CUDA.

Inputs: fresh random task matrices whose sum D has log-spaced singular values (condition
numbers 1e2..1e6), float32 on the device. Asserted: relative error of the merged update vs
reference.iso_c <= 1e-4 (float32 data), certificate <= 1e-5 on the polar route, and a loud
fallback (RuntimeWarning, SVD route) when the certificate cannot hold.
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

SHAPES = [(48, 48), (96, 40), (40, 96), (384, 256), (256, 640)]
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
        got, info = run_gpu(deltas)
        ctx = f"cond {cond:.0e}, {info}, {fresh}"
        assert info["route"] == "polar", ctx
        assert info["cert_orth"] <= 1e-5 and info["cert_sym"] <= 1e-5, ctx
        assert 12 <= info["steps"] <= 14, ctx
        err = rel(got, want)
        assert err <= 1e-4, f"relative error {err:.2e} > 1e-4 ({ctx})"


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
    """A rank-5 sum cannot be certified: RuntimeWarning, SVD route, contract's rank cut."""
    rng = fresh.rng
    m, n = 80, 60
    deltas = [(rng.standard_normal((m, 5)) @ rng.standard_normal((5, n))).astype(np.float32)]
    want = ref.iso_c([d.astype(np.float64) for d in deltas])
    with pytest.warns(RuntimeWarning, match="fell back to the SVD route"):
        got, info = run_gpu(deltas)
    assert info["route"] == "svd" and info["rank"] == 5, (info, fresh)
    assert rel(got, want) <= 1e-4, (info, fresh)


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
