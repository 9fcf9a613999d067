"""The compiled core reads the caller's memory in place (DLPack), without copies or casts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import isofast
from isofast import arrays
from isofast._native import core

import reference as ref
from conftest import Fresh, convert, make_models, to_f64

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64", "int64"])
def test_core_sees_torch_memory(dtype: str) -> None:
    t = torch.arange(48, dtype=torch.float32).reshape(6, 8).to(getattr(torch, dtype))
    assert core.data_ptr(t) == t.data_ptr()
    row = t[2:4]  # a contiguous view at an offset
    assert core.data_ptr(row) == row.data_ptr() == t.data_ptr() + 2 * 8 * t.element_size()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64])
def test_core_sees_numpy_memory(dtype: type) -> None:
    a: np.ndarray = np.arange(48).reshape(6, 8).astype(dtype)
    assert core.data_ptr(a) == a.ctypes.data
    rows = a[3:]
    assert core.data_ptr(rows) == rows.ctypes.data


def test_core_sees_read_only_numpy_memory() -> None:
    raw = np.arange(12, dtype=np.float32).tobytes()
    a = np.frombuffer(raw, dtype=np.float32).reshape(3, 4)
    assert not a.flags.writeable
    assert core.data_ptr(a) == a.ctypes.data


def test_core_sees_bf16_bits_in_numpy() -> None:
    bits = np.arange(10, dtype=np.uint16)
    assert core.data_ptr((bits, "bfloat16")) == bits.ctypes.data


def test_merge_passes_inputs_without_copying() -> None:
    """What merge() hands the core for contiguous inputs is the caller's own memory."""
    for x in (
        torch.ones(4, 5, dtype=torch.bfloat16),
        torch.ones(4, 5, dtype=torch.float16),
        torch.ones(4, 5),
        np.ones((4, 5), np.float32),
        np.frombuffer(np.ones(20, np.float32).tobytes(), np.float32).reshape(4, 5),
    ):
        ptr = x.data_ptr() if isinstance(x, torch.Tensor) else x.ctypes.data
        assert core.data_ptr(arrays.core_arg(x)) == ptr, type(x)


def test_merge_reads_read_only_numpy_models(fresh: Fresh) -> None:
    base64, fts64 = make_models(fresh.rng, 2)

    def frozen(model: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, x in model.items():
            arr = x.astype(np.float32) if x.dtype.kind == "f" else x
            out[name] = np.frombuffer(arr.tobytes(), arr.dtype).reshape(arr.shape)
        return out

    base, fts = frozen(base64), [frozen(f) for f in fts64]
    got = isofast.merge(base, fts, "iso_c", compute_dtype="float32")
    want = ref.merge_model(
        to_f64(base), [to_f64(f) for f in fts], "iso_c", eps=float(np.finfo(np.float32).eps)
    )
    for name, w in want.items():
        assert got[name].flags.writeable
        if w.dtype.kind == "f":
            d = np.linalg.norm(got[name] - w) / np.linalg.norm(w - base[name])
            assert d <= 1e-4, f"{name}: {d:.2e} ({fresh})"


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "iso_c", "iso_cts", "tsv_m"])
def test_bfloat16_torch_merge_converts_inside_the_core(
    method: str, fresh: Fresh, monkeypatch: pytest.MonkeyPatch
) -> None:
    base64, fts64 = make_models(fresh.rng, 3)
    base = convert(base64, "torch", "bfloat16")
    fts = [convert(f, "torch", "bfloat16") for f in fts64]
    snapshot = [{n: x.clone() for n, x in m.items()} for m in (base, *fts)]

    def no_conversion(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("merge() converted a tensor in Python")

    with monkeypatch.context() as patch:
        for attr in ("to", "float", "double", "half", "bfloat16", "type", "numpy"):
            patch.setattr(torch.Tensor, attr, no_conversion)
        got = isofast.merge(base, fts, method)
    for name, x in base.items():
        assert got[name].dtype == x.dtype  # bf16 in, bf16 out; int64 stays int64
        assert got[name].data_ptr() != x.data_ptr()
    # The inputs are untouched and the result tracks the reference on the bf16 values.
    for model, before in zip((base, *fts), snapshot, strict=True):
        for name in model:
            assert torch.equal(model[name], before[name])
    want = ref.merge_model(
        to_f64(base), [to_f64(f) for f in fts], method, eps=float(np.finfo(np.float32).eps)
    )
    for name, w in want.items():
        if w.dtype.kind != "f":
            assert torch.equal(got[name], base[name])
            continue
        g = got[name].to(torch.float64).numpy()
        b = base[name].to(torch.float64).numpy()
        rounded = torch.from_numpy(w).to(torch.bfloat16).to(torch.float64).numpy()
        limit = 2 * np.linalg.norm(rounded - w) / np.linalg.norm(w - b) + 1e-4
        assert np.linalg.norm(g - w) / np.linalg.norm(w - b) <= limit, f"{name} ({fresh})"
