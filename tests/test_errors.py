"""Bad inputs fail loudly: the right exception type, and a message that names the culprit."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import isofast
from isofast._native import core

from conftest import Model


def models(tasks: int = 2, dtype: str = "float32") -> tuple[Model, list[Model]]:
    """A tiny base model and `tasks` fine-tunes: a matrix, a bias and an integer buffer."""
    rng = np.random.default_rng(0)
    base: Model = {
        "encoder.weight": rng.standard_normal((6, 4)).astype(dtype),
        "encoder.bias": rng.standard_normal(6).astype(dtype),
        "position_ids": np.arange(5, dtype=np.int64),
    }
    fts = [
        {
            n: (x + 0.1 * rng.standard_normal(x.shape).astype(dtype)) if x.dtype.kind == "f" else x
            for n, x in base.items()
        }
        for _ in range(tasks)
    ]
    return base, fts


def message(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(exc.value)


# ----------------------------------------------------------------------------- model structure


def test_missing_tensor_in_finetuned_model() -> None:
    base, fts = models()
    del fts[1]["encoder.bias"]
    with pytest.raises(isofast.MergeInputError) as exc:
        isofast.merge(base, fts, "task_arithmetic")
    assert "encoder.bias" in message(exc) and "fine-tuned model 1" in message(exc)


def test_extra_tensor_in_finetuned_model() -> None:
    base, fts = models()
    fts[1]["decoder.extra"] = np.zeros(3, np.float32)
    with pytest.raises(isofast.MergeInputError) as exc:
        isofast.merge(base, fts, "iso_c")
    assert "decoder.extra" in message(exc) and "fine-tuned model 1" in message(exc)


def test_mismatched_shape() -> None:
    base, fts = models()
    fts[1]["encoder.weight"] = np.zeros((4, 6), np.float32)
    with pytest.raises(isofast.MergeInputError) as exc:
        isofast.merge(base, fts, "iso_cts")
    text = message(exc)
    assert "encoder.weight" in text and "fine-tuned model 1" in text
    assert "(4, 6)" in text and "(6, 4)" in text


def test_mismatched_dtype() -> None:
    base, fts = models()
    fts[0]["encoder.bias"] = fts[0]["encoder.bias"].astype(np.float64)
    with pytest.raises(isofast.MergeInputError) as exc:
        isofast.merge(base, fts, "ties")
    text = message(exc)
    assert "encoder.bias" in text and "fine-tuned model 0" in text
    assert "float64" in text and "float32" in text


def test_no_finetuned_models() -> None:
    base, _ = models()
    with pytest.raises(isofast.MergeInputError, match=r"T = 0"):
        isofast.merge(base, [], "iso_c")


# ----------------------------------------------------------------------------- non-finite data


ALL_METHODS = list(isofast.methods())


@pytest.mark.parametrize("method", ALL_METHODS)
def test_nan_in_base(method: str) -> None:
    base, fts = models()
    base["encoder.weight"][2, 1] = np.nan
    for ft in fts:  # the fine-tunes alone are finite
        ft["encoder.weight"][2, 1] = 0.5
    with pytest.raises(ValueError) as exc:
        isofast.merge(base, fts, method)
    text = message(exc)
    assert "encoder.weight" in text and "base model" in text, text
    assert "NaN" in text, text


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_inf_in_finetuned_model(method: str, compute: str) -> None:
    base, fts = models(tasks=3)
    fts[1]["encoder.bias"][3] = -np.inf
    with pytest.raises(ValueError) as exc:
        isofast.merge(base, fts, method, compute_dtype=compute)
    text = message(exc)
    assert "encoder.bias" in text and "fine-tuned model 1" in text, text
    assert "Inf" in text, text


def test_nan_in_bfloat16_torch_model() -> None:
    torch = pytest.importorskip("torch")
    base, fts = models()
    tb = {
        n: torch.from_numpy(x).to(torch.bfloat16) if x.dtype.kind == "f" else torch.from_numpy(x)
        for n, x in base.items()
    }
    tf = [
        {
            n: torch.from_numpy(x).to(torch.bfloat16)
            if x.dtype.kind == "f"
            else torch.from_numpy(x)
            for n, x in ft.items()
        }
        for ft in fts
    ]
    tf[0]["encoder.bias"][0] = float("nan")
    with pytest.raises(ValueError) as exc:
        isofast.merge(tb, tf, "iso_c")
    assert "encoder.bias" in message(exc) and "fine-tuned model 0" in message(exc)


# ----------------------------------------------------------------------------- method and params


def test_unknown_method_lists_valid_ones() -> None:
    base, fts = models()
    with pytest.raises(isofast.MergeInputError) as exc:
        isofast.merge(base, fts, "iso_z")
    text = message(exc)
    assert "iso_z" in text
    for name in isofast.methods():
        assert name in text, f"{name} missing from: {text}"


def test_unknown_parameter() -> None:
    base, fts = models()
    with pytest.raises(isofast.MergeInputError) as exc:
        isofast.merge(base, fts, "ties", densty=0.3)
    text = message(exc)
    assert "densty" in text and "density" in text  # names the typo and the valid parameters


def test_parameter_of_another_method() -> None:
    base, fts = models()
    with pytest.raises(isofast.MergeInputError, match="drop_rate"):
        isofast.merge(base, fts, "iso_c", drop_rate=0.5)


@pytest.mark.parametrize(
    ("method", "params", "name"),
    [
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"density": -0.1}, "density"),
        ("dare_ties", {"density": 1.5}, "density"),
        ("dare_linear", {"drop_rate": 1.0}, "drop_rate"),
        ("dare_ties", {"drop_rate": -0.2}, "drop_rate"),
        ("iso_cts", {"common_space_fraction": -0.1}, "common_space_fraction"),
        ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
        ("consensus", {"lam": -1.0}, "lam"),
        ("iso_c", {"rank_tol": -1e-3}, "rank_tol"),
        ("ties", {"trim": "layer"}, "trim"),
        ("ties", {"merge": "max"}, "merge"),
        ("consensus", {"apply_to": "dare"}, "apply_to"),
    ],
)
def test_out_of_range_parameter(method: str, params: dict[str, Any], name: str) -> None:
    base, fts = models()
    with pytest.raises(isofast.MergeInputError) as exc:
        isofast.merge(base, fts, method, **params)
    assert name in message(exc)
    value = next(iter(params.values()))
    assert str(value) in message(exc), message(exc)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, "x", None])
def test_bad_alpha(alpha: Any) -> None:
    base, fts = models()
    with pytest.raises(isofast.MergeInputError, match="alpha"):
        isofast.merge(base, fts, "iso_c", alpha)


def test_bad_compute_and_out_dtype() -> None:
    base, fts = models()
    with pytest.raises(isofast.MergeInputError, match="compute_dtype"):
        isofast.merge(base, fts, "iso_c", compute_dtype="float16")
    with pytest.raises(isofast.MergeInputError, match="out_dtype"):
        isofast.merge(base, fts, "iso_c", out_dtype="int8")


def test_merge_input_error_is_a_value_error() -> None:
    assert issubclass(isofast.MergeInputError, ValueError)
    assert issubclass(isofast.LinAlgError, RuntimeError)
    assert issubclass(isofast.MergeInputError, isofast.IsofastError)
    assert issubclass(isofast.LinAlgError, isofast.IsofastError)


# ----------------------------------------------------------------------------- LAPACK failures


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_svd_of_non_finite_raises_linalg_error(dtype: type, bad: float) -> None:
    a: np.ndarray = np.random.default_rng(1).standard_normal((7, 5)).astype(dtype)
    a[3, 2] = bad
    with pytest.raises(isofast.LinAlgError) as exc:
        core.svd(a)
    assert "gesdd" in message(exc)
    core.svd(np.ascontiguousarray(a[:3]))  # the backend still works afterwards


def test_svd_of_nan_neither_crashes_nor_hangs(tmp_path: Path) -> None:
    """In a child process, so that a segfault or an endless LAPACK loop fails this test. It runs
    outside the repo so that it imports the installed package, not the uncompiled source."""
    code = textwrap.dedent(
        """
        import numpy as np, isofast
        from isofast._native import core
        a = np.ones((40, 30)); a[7, 3] = np.nan
        try:
            core.svd(a)
        except isofast.LinAlgError:
            print("LinAlgError")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "LinAlgError", done.stdout + done.stderr


def test_svd_rejects_non_contiguous_input() -> None:
    a = np.random.default_rng(2).standard_normal((6, 8))
    with pytest.raises(ValueError, match="contiguous"):
        core.svd(a[:, ::2])
    with pytest.raises(ValueError, match="contiguous"):
        core.svd(a.T)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4)])
def test_svd_rejects_wrong_dimensionality(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        core.svd(np.ones(shape))


@pytest.mark.parametrize("dtype", [np.int64, np.float16])
def test_svd_rejects_other_dtypes(dtype: type) -> None:
    with pytest.raises(ValueError, match="float32 or float64"):
        core.svd(np.ones((3, 3), dtype=dtype))


def test_svd_matches_numpy() -> None:
    a = np.random.default_rng(3).standard_normal((9, 5))
    u, s, vt = core.svd(a)
    assert u.shape == (9, 5) and s.shape == (5,) and vt.shape == (5, 5)
    np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False), rtol=1e-12)
    np.testing.assert_allclose((u * s) @ vt, a, atol=1e-12)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "iso_c"])
def test_input_file_that_ends_early_is_named(tmp_path: Path, method: str) -> None:
    """The core reads on-disk inputs itself: a file cut short after its header was checked
    (changed during the merge) fails with the tensor and model named, and NaN/inf found in
    file data is reported as for arrays."""
    from isofast.kernels import kernel_of
    from isofast.methods import get_method

    options = core.MergeOptions()
    options.kernel = kernel_of(get_method(method).kernel)
    data = np.arange(24, dtype=np.float32).reshape(6, 4)
    path = tmp_path / "t.bin"
    path.write_bytes(data.tobytes())
    out = np.empty_like(data)
    with open(path, "rb") as f:
        ok = ("file", f.fileno(), 0, "float32", (6, 4))
        short = ("file", f.fileno(), 64, "float32", (6, 4))  # 16 bytes past the end
        core.merge_items(options, [("w", ok, [ok], out, method == "iso_c")])
        np.testing.assert_array_equal(out, data)  # the task vector is 0: out = base
        with pytest.raises(
            isofast.MergeInputError, match=r"'w' of fine-tuned model 0.*ended before"
        ):
            core.merge_items(options, [("w", ok, [short], out, False)])
    bad = data.copy()
    bad[2, 1] = np.inf
    path.write_bytes(bad.tobytes())
    with open(path, "rb") as f:
        src = ("file", f.fileno(), 0, "float32", (6, 4))
        with pytest.raises(isofast.MergeInputError, match="'w' of the base model holds NaN or Inf"):
            core.merge_items(options, [("w", src, [(data, "float32")], out, False)])


def test_output_cannot_be_a_file(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(bytes(16))
    base = np.zeros(4, np.float32)
    with (
        open(path, "rb") as f,
        pytest.raises(isofast.MergeInputError, match="must be an array"),
    ):
        out = ("file", f.fileno(), 0, "float32", (4,))
        core.merge_items(core.MergeOptions(), [("w", base, [base], out, False)])
