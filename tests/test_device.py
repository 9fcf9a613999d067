"""The `device` setting without a GPU: request validation and a clean refusal.

These tests run everywhere (no module-level skip): on a CPU-only machine or a build without
isofast._cuda, `device="cuda"` must fail before any work with isofast.BackendUnavailable and
its reason, and a malformed device string must be refused by request validation
(isofast.MergeInputError) on every machine, GPU or not. What the GPU computes is checked in
test_cuda_parity.py (skipped without a usable GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import isofast
from isofast.io import CheckpointWriter
from isofast.request import MergeRequest, parse_device

from conftest import SMALL_SPEC, THREADS, Fresh, make_models

MATRIX_METHODS = ("iso_c", "iso_cts", "tsv_m")
BAD_DEVICES = ["cuda:x", "tpu", "cuda:", "cuda:-1", "cuda:1.5", "cuda0", "cuda: 1", "", "cpu:0"]
NOT_NAMES: list[Any] = [0, None, ["cuda"], 1.0]


def usable_gpu() -> str | None:
    """Why this machine can run `device="cuda"` (None when it cannot)."""
    try:
        from isofast import _cuda
    except ImportError:
        return None
    try:
        import torch
    except ImportError:
        return None
    if not (_cuda.available() and torch.cuda.is_available()):
        return None
    return f"a usable GPU is present ({_cuda.device_name(0)})"


def models(fresh: Fresh) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    base, fts = make_models(fresh.rng, 2, SMALL_SPEC)
    return base, fts


def save(folder: Path, model: dict[str, Any]) -> str:
    with CheckpointWriter(folder) as w:
        for name, x in model.items():
            w.add(name, np.ascontiguousarray(x.astype(np.float32) if x.dtype.kind == "f" else x))
    return str(folder)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("cpu", "cpu"),
        (" CPU ", "cpu"),
        ("cuda", "cuda:0"),
        ("CUDA:1", "cuda:1"),
        ("cuda:12", "cuda:12"),
        # Documented alias (request.parse_device: "'cuda' / 'gpu' (-> 'cuda:0')").
        ("gpu", "cuda:0"),
    ],
)
def test_device_names_are_normalised(given: str, normal: str) -> None:
    assert parse_device(given) == normal
    request = MergeRequest(base={"w": np.zeros((2, 2))}, models=({"w": np.ones((2, 2))},))
    assert request.replace(device=given).device == normal


@pytest.mark.parametrize("device", BAD_DEVICES, ids=repr)
def test_a_malformed_device_is_a_merge_input_error(device: str, fresh: Fresh) -> None:
    """Refused by the request, before any backend is looked for (so on a GPU machine too)."""
    base, fts = models(fresh)
    with pytest.raises(isofast.MergeInputError, match=r"'cpu', 'cuda' or 'cuda:N'"):
        parse_device(device)
    with pytest.raises(isofast.MergeInputError, match=r"'cpu', 'cuda' or 'cuda:N'"):
        MergeRequest(base=base, models=tuple(fts), method="iso_c", device=device)
    with pytest.raises(isofast.MergeInputError, match=r"'cpu', 'cuda' or 'cuda:N'"):
        isofast.plan(base, fts, "iso_c", device=device)
    with pytest.raises(isofast.MergeInputError, match=r"'cpu', 'cuda' or 'cuda:N'"):
        isofast.merge(base, fts, "iso_cts", device=device)


@pytest.mark.parametrize("device", NOT_NAMES, ids=repr)
def test_a_device_that_is_not_a_name_is_a_merge_input_error(device: Any, fresh: Fresh) -> None:
    base, fts = models(fresh)
    with pytest.raises(isofast.MergeInputError, match="device must be a name"):
        isofast.plan(base, fts, "iso_c", device=device)


def test_device_cpu_merges_as_the_default(fresh: Fresh) -> None:
    base, fts = models(fresh)
    want = isofast.merge(base, fts, "iso_c", threads=THREADS)
    got = isofast.merge(base, fts, "iso_c", threads=THREADS, device="cpu")
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))


# ----------------------------------------------------------------------------- no usable GPU


# An elementwise method with a CUDA device runs on the CPU, but the device is checked first.
@pytest.mark.parametrize("method", [*MATRIX_METHODS, "ties"])
def test_cuda_without_a_usable_gpu_is_backend_unavailable(
    method: str, fresh: Fresh, tmp_path: Path
) -> None:
    """device="cuda" where isofast._cuda is missing or no GPU is usable: BackendUnavailable
    with a reason, from merge and plan, for state dicts and checkpoints alike, before any
    output is created."""
    gpu = usable_gpu()
    if gpu is not None:
        pytest.skip(f"{gpu}: the GPU path is tested in test_cuda_parity.py")
    base, fts = models(fresh)
    with pytest.raises(isofast.BackendUnavailable) as info:
        isofast.merge(base, fts, method, device="cuda")
    reason = str(info.value)
    assert "cuda" in reason.lower() and len(reason) > len("device 'cuda:0': "), reason
    with pytest.raises(isofast.BackendUnavailable):
        isofast.plan(base, fts, method, device="cuda:0")

    base_path = save(tmp_path / "base", base)
    paths = [save(tmp_path / f"ft{t}", ft) for t, ft in enumerate(fts)]
    out = tmp_path / "merged"
    with pytest.raises(isofast.BackendUnavailable, match=r"(?i)cuda"):
        isofast.merge(base_path, paths, method, device="cuda", out=out)
    assert not out.exists(), "a refused GPU merge must not create its output folder"
    leftovers = [p.name for p in tmp_path.iterdir() if "merged" in p.name]
    assert not leftovers, f"a refused GPU merge left {leftovers}"


def test_a_missing_gpu_index_is_backend_unavailable(fresh: Fresh) -> None:
    """cuda:N beyond the machine's GPUs (or without any): refused up front, on every machine."""
    base, fts = models(fresh)
    with pytest.raises(isofast.BackendUnavailable):
        isofast.plan(base, fts, "iso_c", device="cuda:99")
    with pytest.raises(isofast.BackendUnavailable):
        isofast.merge(base, fts, "iso_c", device="cuda:99")
