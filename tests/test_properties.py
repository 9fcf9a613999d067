"""Properties every merge must have, checked with hypothesis on random small models.

ISOFAST_HYPOTHESIS_EXAMPLES sets the number of examples per property (default 25).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import isofast

from conftest import THREADS, convert, make_models, rel_update_error, to_numpy

pytestmark = pytest.mark.usefixtures("single_thread_blas")

SETTINGS = settings(
    max_examples=int(os.environ.get("ISOFAST_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    database=None,  # nothing written into the source tree
)

METHODS = list(isofast.methods())
MATRIX_METHODS = ("tsv_m", "iso_c", "iso_cts")
COMPUTE = ("float32", "float64")

dims = st.integers(min_value=1, max_value=12)
seeds = st.integers(min_value=0, max_value=2**63 - 1)


@st.composite
def model_specs(draw: st.DrawFn) -> dict[str, tuple[tuple[int, ...], str]]:
    """A 2-D weight, a bias, a 3-D kernel and an integer buffer of random small sizes."""
    m, n = draw(dims), draw(dims)
    return {
        "layer.weight": ((m, n), "float"),
        "layer.bias": ((draw(dims),), "float"),
        "conv.weight": ((draw(st.integers(1, 3)), draw(dims), draw(st.integers(1, 4))), "float"),
        "position_ids": ((draw(dims),), "int64"),
    }


def merge(base: Any, fts: Any, method: str, **kwargs: Any) -> dict[str, Any]:
    return isofast.merge(base, fts, method, threads=THREADS, **kwargs)


def equal_models(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(to_numpy(a[n]), to_numpy(b[n])) for n in a)


# ----------------------------------------------------------------------------- alpha = 0

# Methods undefined for fewer fine-tunes (they refuse them with MergeInputError).
MIN_TASKS = {"model_stock": 2}


@SETTINGS
@given(
    spec=model_specs(),
    tasks=st.integers(1, 4),
    seed=seeds,
    dtype=st.sampled_from(["float32", "float64", "float16"]),
)
def test_alpha_zero_gives_base_exactly(spec: Any, tasks: int, seed: int, dtype: str) -> None:
    base64, fts64 = make_models(np.random.default_rng(seed), tasks, spec)
    base, fts = convert(base64, "numpy", dtype), [convert(f, "numpy", dtype) for f in fts64]
    for method in METHODS:
        if tasks < MIN_TASKS.get(method, 1):
            continue
        for compute in COMPUTE:
            got = merge(base, fts, method, alpha=0.0, compute_dtype=compute, seed=seed)
            assert equal_models(got, base), (method, compute)


@SETTINGS
@given(spec=model_specs(), tasks=st.integers(1, 3), seed=seeds)
def test_alpha_zero_gives_base_exactly_bfloat16_torch(spec: Any, tasks: int, seed: int) -> None:
    pytest.importorskip("torch")
    base64, fts64 = make_models(np.random.default_rng(seed), tasks, spec)
    base, fts = (
        convert(base64, "torch", "bfloat16"),
        [convert(f, "torch", "bfloat16") for f in fts64],
    )
    for method in METHODS:
        if tasks < MIN_TASKS.get(method, 1):
            continue
        got = merge(base, fts, method, alpha=0.0, seed=seed)
        assert equal_models(got, base), method


# ----------------------------------------------------------------------------- special cases


@SETTINGS
@given(
    spec=model_specs(),
    tasks=st.integers(1, 4),
    seed=seeds,
    compute=st.sampled_from(COMPUTE),
    alpha=st.floats(-2.0, 2.0),
)
def test_dare_linear_without_drop_is_task_arithmetic(
    spec: Any, tasks: int, seed: int, compute: str, alpha: float
) -> None:
    base64, fts64 = make_models(np.random.default_rng(seed), tasks, spec)
    base, fts = convert(base64, "numpy", "float32"), [convert(f, "numpy", "float32") for f in fts64]
    dare = merge(
        base, fts, "dare_linear", alpha=alpha, compute_dtype=compute, seed=seed, drop_rate=0.0
    )
    ta = merge(base, fts, "task_arithmetic", alpha=alpha, compute_dtype=compute)
    assert equal_models(dare, ta)


@SETTINGS
@given(
    spec=model_specs(),
    seed=seeds,
    compute=st.sampled_from(COMPUTE),
    trim=st.sampled_from(["global", "tensor"]),
    how=st.sampled_from(["mean", "sum"]),
    alpha=st.floats(-2.0, 2.0),
)
def test_ties_full_density_single_task_is_task_arithmetic(
    spec: Any, seed: int, compute: str, trim: str, how: str, alpha: float
) -> None:
    base64, fts64 = make_models(np.random.default_rng(seed), 1, spec)
    base, fts = convert(base64, "numpy", "float32"), [convert(f, "numpy", "float32") for f in fts64]
    ties = merge(
        base, fts, "ties", alpha=alpha, compute_dtype=compute, density=1.0, trim=trim, merge=how
    )
    ta = merge(base, fts, "task_arithmetic", alpha=alpha, compute_dtype=compute)
    assert equal_models(ties, ta)


@SETTINGS
@given(m=dims, n=dims, tasks=st.integers(1, 5), seed=seeds, alpha=st.floats(0.25, 2.0))
def test_iso_c_update_has_a_flat_spectrum(
    m: int, n: int, tasks: int, seed: int, alpha: float
) -> None:
    base64, fts64 = make_models(np.random.default_rng(seed), tasks, {"w": ((m, n), "float")})
    got = merge(base64, fts64, "iso_c", alpha=alpha, compute_dtype="float64")
    update = (got["w"] - base64["w"]) / alpha
    s = np.linalg.svd(update, compute_uv=False)
    np.testing.assert_allclose(s, s[0], rtol=1e-8)
    # ... and that flat value is the mean singular value of the task sum (docs/ALGORITHMS.md).
    total = sum(f["w"] - base64["w"] for f in fts64)
    np.testing.assert_allclose(s[0], np.linalg.svd(total, compute_uv=False).mean(), rtol=1e-8)


# ----------------------------------------------------------------------------- task order


@SETTINGS
@given(
    spec=model_specs(),
    tasks=st.integers(2, 5),
    seed=seeds,
    data=st.data(),
    method=st.sampled_from(["iso_c", "iso_cts"]),
)
def test_task_order_does_not_matter_matrix(
    spec: Any, tasks: int, seed: int, data: st.DataObject, method: str
) -> None:
    assume(tasks >= MIN_TASKS.get(method, 1))  # fewer: refused, by design
    base64, fts64 = make_models(np.random.default_rng(seed), tasks, spec)
    order = data.draw(st.permutations(range(tasks)))
    a = merge(base64, fts64, method, compute_dtype="float64")
    b = merge(base64, [fts64[i] for i in order], method, compute_dtype="float64")
    for name, x in a.items():
        err = rel_update_error(b[name], x, base64[name]) if x.dtype.kind == "f" else 0.0
        assert err <= 1e-9, (name, err, order)
        if x.dtype.kind != "f":
            assert np.array_equal(b[name], x)


@SETTINGS
@given(
    spec=model_specs(),
    tasks=st.integers(2, 5),
    seed=seeds,
    data=st.data(),
    compute=st.sampled_from(COMPUTE),
    trim=st.sampled_from(["global", "tensor"]),
    how=st.sampled_from(["mean", "sum"]),
    density=st.sampled_from([0.1, 0.2, 0.5, 1.0]),
)
def test_task_order_does_not_matter_ties(
    spec: Any,
    tasks: int,
    seed: int,
    data: st.DataObject,
    compute: str,
    trim: str,
    how: str,
    density: float,
) -> None:
    # Task vectors are exact in float32 (conftest), so both orders agree bit for bit.
    base64, fts64 = make_models(np.random.default_rng(seed), tasks, spec)
    base, fts = convert(base64, "numpy", "float32"), [convert(f, "numpy", "float32") for f in fts64]
    order = data.draw(st.permutations(range(tasks)))
    kw = {"compute_dtype": compute, "trim": trim, "merge": how, "density": density}
    a = merge(base, fts, "ties", **kw)
    b = merge(base, [fts[i] for i in order], "ties", **kw)
    assert equal_models(a, b), order


# ----------------------------------------------------------------------------- dtype and shape


@SETTINGS
@given(
    spec=model_specs(),
    tasks=st.integers(1, 3),
    seed=seeds,
    method=st.sampled_from(METHODS),
    compute=st.sampled_from(COMPUTE),
    dtypes=st.lists(st.sampled_from(["float32", "float64", "float16"]), min_size=3, max_size=3),
    out=st.sampled_from([None, "float32", "float64"]),
    mask_len=dims,
)
def test_dtype_and_shape_preserved_numpy(
    spec: Any,
    tasks: int,
    seed: int,
    method: str,
    compute: str,
    dtypes: list[str],
    out: str | None,
    mask_len: int,
) -> None:
    assume(tasks >= MIN_TASKS.get(method, 1))  # fewer: refused, by design
    spec = {**spec, "mask": ((mask_len,), "bool")}
    base64, fts64 = make_models(np.random.default_rng(seed), tasks, spec)
    floats = [n for n, (_, kind) in spec.items() if kind == "float"]
    per_name = dict(zip(floats, dtypes, strict=True))

    def cast(model: dict[str, Any]) -> dict[str, Any]:
        return {n: x.astype(per_name[n]) if n in per_name else x for n, x in model.items()}

    base = cast(base64)
    got = merge(
        base, [cast(f) for f in fts64], method, compute_dtype=compute, out_dtype=out, seed=seed
    )
    assert list(got) == list(base)
    for name, x in base.items():
        assert isinstance(got[name], np.ndarray)
        assert got[name].shape == x.shape, name
        expected = (out or str(x.dtype)) if name in per_name else str(x.dtype)
        assert str(got[name].dtype) == expected, (name, got[name].dtype)
        if name not in per_name:
            assert np.array_equal(got[name], x)


@SETTINGS
@given(
    spec=model_specs(),
    tasks=st.integers(1, 3),
    seed=seeds,
    method=st.sampled_from(METHODS),
    dtypes=st.lists(
        st.sampled_from(["float32", "float64", "float16", "bfloat16"]), min_size=3, max_size=3
    ),
)
def test_dtype_and_shape_preserved_torch(
    spec: Any, tasks: int, seed: int, method: str, dtypes: list[str]
) -> None:
    assume(tasks >= MIN_TASKS.get(method, 1))  # fewer: refused, by design
    torch = pytest.importorskip("torch")
    base64, fts64 = make_models(np.random.default_rng(seed), tasks, spec)
    floats = [n for n, (_, kind) in spec.items() if kind == "float"]
    per_name = dict(zip(floats, dtypes, strict=True))

    def cast(model: dict[str, Any]) -> dict[str, Any]:
        return {
            n: torch.from_numpy(x).to(getattr(torch, per_name[n]))
            if n in per_name
            else torch.from_numpy(x)
            for n, x in model.items()
        }

    base = cast(base64)
    got = merge(base, [cast(f) for f in fts64], method, seed=seed)
    assert list(got) == list(base)
    for name, x in base.items():
        assert isinstance(got[name], torch.Tensor)
        assert got[name].shape == x.shape and got[name].dtype == x.dtype, name


# ----------------------------------------------------------------------------- DARE seeds


@SETTINGS
@given(
    tasks=st.integers(1, 4),
    seed=seeds,
    other=seeds,
    data_seed=seeds,
    method=st.sampled_from(["dare_linear", "dare_ties"]),
    drop_rate=st.sampled_from([0.1, 0.5, 0.9]),
    compute=st.sampled_from(COMPUTE),
)
def test_dare_reproducible_per_seed(
    tasks: int,
    seed: int,
    other: int,
    data_seed: int,
    method: str,
    drop_rate: float,
    compute: str,
) -> None:
    assume(tasks >= MIN_TASKS.get(method, 1))  # fewer: refused, by design
    spec = {"w": ((8, 16), "float"), "b": ((64,), "float")}
    base64, fts64 = make_models(np.random.default_rng(data_seed), tasks, spec)
    kw = {"compute_dtype": compute, "drop_rate": drop_rate}
    first = merge(base64, fts64, method, seed=seed, **kw)
    again = merge(base64, fts64, method, seed=seed, **kw)
    assert equal_models(first, again)
    if other != seed:
        # 192 entries per task dropped independently: equal masks are out of reach.
        assert not equal_models(first, merge(base64, fts64, method, seed=other, **kw))
