"""Every merging method against the float64 reference (tests/reference.py) on fresh inputs.

Error measure, per tensor: ||(merged - base) - (ref - base)||_F / ||ref - base||_F.
Limits: 1e-10 with compute_dtype="float64", 1e-4 with "float32" (float32 inputs, the
reference fed the same values upcast), and for bfloat16/float16 outputs twice the error of
rounding the reference result to that dtype plus 1e-4.

Matrix methods in float32 can meet a random draw whose spectral gaps make the exact result
ill-conditioned at float32 precision (a rare tail). Only then, and only for 2-D keys under
a matrix method, the limit widens to COND_FACTOR times the reference's own change under
relative perturbations of the task vectors of size eps(compute dtype): an implementation
cannot beat the conditioning of the problem, and a real bug is far outside that band.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

import isofast
from isofast._native import core

import reference as ref
from conftest import (
    F32_EPS,
    F64_EPS,
    SMALL_SPEC,
    THREADS,
    Fresh,
    Model,
    assert_model_matches,
    base_values,
    convert,
    dtype_str,
    low_rank_delta,
    make_models,
    perturbed,
    rel_update_error,
    round_to,
    task_vector,
    to_f64,
    to_numpy,
)

pytestmark = pytest.mark.usefixtures("single_thread_blas")

ALPHA = 0.7
MATRIX_METHODS = ("tsv_m", "iso_c", "iso_cts")
COND_FACTOR = 50.0
TOL = {"float64": 1e-10, "float32": 1e-4}
EPS = {"float64": F64_EPS, "float32": F32_EPS}

METHOD_CASES: list[tuple[str, dict[str, Any]]] = [
    ("weight_average", {}),
    ("task_arithmetic", {}),
    ("ties", {"trim": "global", "merge": "mean"}),
    ("ties", {"trim": "global", "merge": "sum", "density": 0.5}),
    ("ties", {"trim": "tensor", "merge": "mean", "density": 0.3}),
    ("ties", {"trim": "tensor", "merge": "sum"}),
    ("dare_linear", {}),
    ("dare_linear", {"drop_rate": 0.3}),
    ("dare_ties", {}),
    ("dare_ties", {"drop_rate": 0.75, "density": 0.4, "trim": "tensor", "merge": "sum"}),
    ("consensus", {}),
    ("consensus", {"apply_to": "ties", "density": 0.5, "lam": 0.5, "min_agree": 1}),
    ("consensus", {"apply_to": "ties", "trim": "tensor", "merge": "sum", "min_agree": 2}),
    ("tsv_m", {}),
    ("iso_c", {}),
    ("iso_cts", {}),
    ("iso_cts", {"common_space_fraction": 0.5}),
]


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    method, params = case
    return method + "".join(f"-{k}={v}" for k, v in params.items())


METHOD_IDS = [case_id(c) for c in METHOD_CASES]


def reference_merge(
    base64: Mapping[str, np.ndarray],
    fts64: Sequence[Mapping[str, np.ndarray]],
    method: str,
    params: Mapping[str, Any],
    *,
    seed: int,
    compute: str,
    alpha: float = ALPHA,
    exclude: Sequence[str] = ("text_projection",),
) -> dict[str, np.ndarray]:
    return ref.merge_model(
        dict(base64),
        [dict(f) for f in fts64],
        method,
        alpha,
        exclude=exclude,
        seed=seed,
        eps=EPS[compute],
        **params,
    )


def check_against_reference(
    got: Mapping[str, Any],
    base64: Mapping[str, np.ndarray],
    fts64: Sequence[Mapping[str, np.ndarray]],
    method: str,
    params: Mapping[str, Any],
    *,
    seed: int,
    compute: str,
    fresh: Fresh,
    round_dtype: str | None = None,
    alpha: float = ALPHA,
    exclude: Sequence[str] = ("text_projection",),
) -> None:
    """Compare a merge result with the reference (see the module docstring for the limits)."""
    want = reference_merge(
        base64, fts64, method, params, seed=seed, compute=compute, alpha=alpha, exclude=exclude
    )

    def limit(name: str) -> float:
        lim = TOL[compute]
        if round_dtype is not None:  # the output is rounded to a 16-bit float dtype
            rounding = rel_update_error(round_to(want[name], round_dtype), want[name], base64[name])
            lim = 2.0 * rounding + 1e-4
        err = rel_update_error(to_numpy(got[name]), want[name], base64[name])
        matrix_key = base64[name].ndim == 2 and not any(e in name for e in exclude)
        if err > lim and method in MATRIX_METHODS and matrix_key:
            lim = max(lim, COND_FACTOR * sensitivity(name))
        return lim

    def sensitivity(name: str) -> float:
        worst = 0.0
        for _ in range(3):
            other = reference_merge(
                base64,
                perturbed(fts64, base64, EPS[compute], fresh.rng),
                method,
                params,
                seed=seed,
                compute=compute,
                alpha=alpha,
                exclude=exclude,
            )
            worst = max(worst, rel_update_error(other[name], want[name], base64[name]))
        return worst

    context = f"{method} {dict(params)} T={len(fts64)} compute={compute}; {fresh}"
    assert_model_matches(got, want, base64, limit, context)


def assert_dtypes_kept(got: Mapping[str, Any], inputs: Mapping[str, Any], out: str | None) -> None:
    for name, x in inputs.items():
        floating = dtype_str(x) in ("float16", "bfloat16", "float32", "float64")
        expected = (out or dtype_str(x)) if floating else dtype_str(x)
        assert dtype_str(got[name]) == expected, f"{name}: dtype {got[name].dtype}"
        assert type(got[name]) is type(x), f"{name}: {type(got[name])} for {type(x)}"
        assert tuple(got[name].shape) == tuple(x.shape)


# ----------------------------------------------------------------------------- numpy, every method


@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("tasks", [2, 3, 8])
@pytest.mark.parametrize("case", METHOD_CASES, ids=METHOD_IDS)
def test_matches_reference(
    case: tuple[str, dict[str, Any]], tasks: int, compute: str, fresh: Fresh
) -> None:
    method, params = case
    base64, fts64 = make_models(fresh.rng, tasks)
    seed = int(fresh.rng.integers(0, 2**63))
    base, fts = convert(base64, "numpy", compute), [convert(f, "numpy", compute) for f in fts64]
    got = isofast.merge(
        base, fts, method, ALPHA, compute_dtype=compute, seed=seed, threads=THREADS, **params
    )
    assert_dtypes_kept(got, base, None)
    ids = "position_ids"
    assert not np.shares_memory(got[ids], base[ids]), "integer tensor must be a copy"
    # The inputs are exact in float32, so the reference sees the very same values.
    check_against_reference(
        got,
        to_f64(base),
        [to_f64(f) for f in fts],
        method,
        params,
        seed=seed,
        compute=compute,
        fresh=fresh,
    )


# ----------------------------------------------------------------------------- torch and 16-bit


FRAMEWORK_DTYPES = [
    ("torch", "float32"),
    ("torch", "float64"),
    ("torch", "bfloat16"),
    ("torch", "float16"),
    ("numpy", "float16"),
]


def low_precision_params(dtype: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    # 16-bit task vectors can tie |D_t| = 0.4 |tau - D_t| exactly, where float32 and float64
    # round 0.4 * x differently; a dyadic lam makes both sides exact in either precision.
    if dtype in ("bfloat16", "float16") and method == "consensus" and "lam" not in params:
        return {**params, "lam": 0.375}
    return params


@pytest.mark.parametrize("case", METHOD_CASES, ids=METHOD_IDS)
@pytest.mark.parametrize(
    ("kind", "dtype"), FRAMEWORK_DTYPES, ids=[f"{k}-{d}" for k, d in FRAMEWORK_DTYPES]
)
def test_frameworks_and_dtypes(
    kind: str, dtype: str, case: tuple[str, dict[str, Any]], fresh: Fresh
) -> None:
    pytest.importorskip("torch")
    method, params = case
    params = low_precision_params(dtype, method, params)
    compute = "float64" if dtype == "float64" else "float32"
    base64, fts64 = make_models(fresh.rng, 3, SMALL_SPEC)
    seed = int(fresh.rng.integers(0, 2**63))
    base, fts = convert(base64, kind, dtype), [convert(f, kind, dtype) for f in fts64]
    got = isofast.merge(base, fts, method, ALPHA, compute_dtype=compute, seed=seed, **params)
    assert_dtypes_kept(got, base, None)
    low = dtype in ("bfloat16", "float16")
    # Reference on the inputs as the library sees them (rounded to bf16/fp16 when 16-bit).
    check_against_reference(
        got,
        to_f64(base),
        [to_f64(f) for f in fts],
        method,
        params,
        seed=seed,
        compute=compute,
        fresh=fresh,
        round_dtype=dtype if low else None,
    )


OUT_F32_CASES = [
    c
    for c in METHOD_CASES
    if c[0] in ("task_arithmetic", "ties", "dare_linear", "tsv_m", "iso_c", "iso_cts")
]


@pytest.mark.parametrize("case", OUT_F32_CASES, ids=[case_id(c) for c in OUT_F32_CASES])
@pytest.mark.parametrize(
    ("kind", "dtype"), [("torch", "bfloat16"), ("torch", "float16"), ("numpy", "float16")]
)
def test_out_dtype_float32(
    kind: str, dtype: str, case: tuple[str, dict[str, Any]], fresh: Fresh
) -> None:
    pytest.importorskip("torch")
    method, params = case
    base64, fts64 = make_models(fresh.rng, 3, SMALL_SPEC)
    base, fts = convert(base64, kind, dtype), [convert(f, kind, dtype) for f in fts64]
    got = isofast.merge(base, fts, method, ALPHA, out_dtype="float32", seed=5, **params)
    assert_dtypes_kept(got, base, "float32")
    check_against_reference(
        got,
        to_f64(base),
        [to_f64(f) for f in fts],
        method,
        params,
        seed=5,
        compute="float32",
        fresh=fresh,
    )


# ----------------------------------------------------------------------------- side by side

BATCH_SPEC = {
    **{f"blocks.{i}.attn.weight": ((40, 24), "float") for i in range(5)},
    **{f"blocks.{i}.mlp.weight": ((24, 56), "float") for i in range(3)},
    "head.weight": ((10, 24), "float"),
    "head.bias": ((10,), "float"),
}


@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_m", "ties"])
def test_thread_counts_agree(method: str, compute: str, fresh: Fresh) -> None:
    """Same-shape matrices may be merged side by side when threads > 1: same result."""
    base64, fts64 = make_models(fresh.rng, 3, BATCH_SPEC)
    base, fts = convert(base64, "numpy", compute), [convert(f, "numpy", compute) for f in fts64]
    runs = {
        t: isofast.merge(base, fts, method, ALPHA, compute_dtype=compute, threads=t)
        for t in (1, 2, 3, 8)
    }
    for t, got in runs.items():
        check_against_reference(
            got, base64, fts64, method, {}, seed=0, compute=compute, fresh=fresh
        )
        # Consistent with the single-threaded merge far below the reference tolerance.
        assert_model_matches(got, runs[1], base64, TOL[compute] / 100, f"threads={t}; {fresh}")


# ----------------------------------------------------------------------------- Iso-CTS sizes


def contract_sizes(r: int, tasks: int, f: float) -> tuple[int, int]:
    """CONTRACT.md "Iso-CTS sizes", written out independently of reference.py."""
    k0 = math.floor(f * r)
    q = (r - k0) / tasks
    lower = math.floor(q)
    frac = q - lower
    nearest = lower + 1 if frac > 0.5 or (frac == 0.5 and lower % 2 == 1) else lower
    s_ts = nearest * tasks
    if s_ts > r:
        s_ts = (r // tasks) * tasks
    return r - s_ts, s_ts // tasks


@pytest.mark.parametrize(
    ("r", "tasks", "expected"), [(768, 8, (616, 19)), (768, 20, (608, 8)), (1024, 20, (824, 10))]
)
def test_iso_cts_sizes_worked_examples(r: int, tasks: int, expected: tuple[int, int]) -> None:
    assert tuple(core.iso_cts_sizes(r, tasks, 0.8)) == expected
    assert ref.iso_cts_sizes(r, tasks, 0.8) == expected
    assert contract_sizes(r, tasks, 0.8) == expected


@pytest.mark.parametrize("tasks", [8, 14, 20])
@pytest.mark.parametrize("r", [50, 768, 1024])
def test_iso_cts_sizes_formula(r: int, tasks: int) -> None:
    expected = contract_sizes(r, tasks, 0.8)
    assert tuple(core.iso_cts_sizes(r, tasks, 0.8)) == expected
    assert ref.iso_cts_sizes(r, tasks, 0.8) == expected
    k, s = expected
    assert k + s * tasks == r and k >= 0 and s >= 0


def test_iso_cts_sizes_other_fractions() -> None:
    for r in (1, 2, 7, 10, 30, 50, 96):
        for tasks in (1, 2, 3, 4, 6, 8, 14, 20):
            for f in (0.0, 0.1, 0.5, 0.8, 0.95, 1.0):
                got = tuple(core.iso_cts_sizes(r, tasks, f))
                assert got == ref.iso_cts_sizes(r, tasks, f) == contract_sizes(r, tasks, f), (
                    f"r={r} T={tasks} f={f}: core {got}"
                )


# ----------------------------------------------------------------------------- rank-deficient


RANK_CASES = [
    ("iso_c", {}),
    ("iso_cts", {}),
    ("iso_cts", {"common_space_fraction": 0.1}),
    ("tsv_m", {}),
]


@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(24, 24), (40, 30), (30, 40)], ids=str)
@pytest.mark.parametrize("case", RANK_CASES, ids=[case_id(c) for c in RANK_CASES])
def test_rank_deficient_matches_range_restricted_reference(
    case: tuple[str, dict[str, Any]], shape: tuple[int, int], compute: str, fresh: Fresh
) -> None:
    """Two rank-3 task matrices (sum of rank 6 < r): the reference's range-restricted rule."""
    method, params = case
    name = "layer.weight"
    base64 = {name: base_values(fresh.rng, shape)}
    fts64 = [{name: base64[name] + low_rank_delta(fresh.rng, shape, 3)} for _ in range(2)]
    base, fts = convert(base64, "numpy", compute), [convert(f, "numpy", compute) for f in fts64]
    got = isofast.merge(base, fts, method, ALPHA, compute_dtype=compute, threads=THREADS, **params)
    check_against_reference(
        got, base64, fts64, method, params, seed=0, compute=compute, fresh=fresh
    )
    if method == "iso_c":  # six equal singular values, the rest numerically zero
        update = (to_numpy(got[name]) - base64[name]) / ALPHA
        s = np.linalg.svd(update, compute_uv=False)
        rtol = 1e-8 if compute == "float64" else 1e-4
        np.testing.assert_allclose(s[:6], s[0], rtol=rtol, err_msg=str(fresh))
        assert s[6] <= rtol * s[0], f"rank above 6: {s[:8]} ({fresh})"


@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("case", METHOD_CASES, ids=METHOD_IDS)
def test_all_zero_update_gives_base(
    case: tuple[str, dict[str, Any]], compute: str, fresh: Fresh
) -> None:
    method, params = case
    base64, _ = make_models(fresh.rng, 1, SMALL_SPEC)
    base = convert(base64, "numpy", compute)
    fts = [convert(base64, "numpy", compute) for _ in range(3)]
    got = isofast.merge(base, fts, method, 1.3, compute_dtype=compute, **params)
    for name, x in base.items():
        assert np.array_equal(got[name], x), f"{name}: not exactly the base ({method}, {fresh})"


# ----------------------------------------------------------------------------- exclude rule


def test_text_projection_gets_mean_under_iso_c(fresh: Fresh) -> None:
    shape = (32, 24)
    names = ("model.text_projection", "model.visual.proj")
    base64 = {n: base_values(fresh.rng, shape) for n in names}
    fts64 = [{n: base64[n] + task_vector(fresh.rng, shape) for n in names} for _ in range(3)]
    got = isofast.merge(base64, fts64, "iso_c", ALPHA, compute_dtype="float64")
    check_against_reference(got, base64, fts64, "iso_c", {}, seed=0, compute="float64", fresh=fresh)
    for name in names:
        mean = base64[name] + ALPHA * np.mean([f[name] - base64[name] for f in fts64], axis=0)
        is_mean = rel_update_error(got[name], mean, base64[name]) <= 1e-12
        assert is_mean == ("text_projection" in name), f"{name} ({fresh})"

    # A user exclude list replaces the default one.
    with pytest.warns(isofast.MergeWarning):  # every 2-D key is excluded here
        got = isofast.merge(
            base64, fts64, "iso_c", ALPHA, compute_dtype="float64", exclude=("proj",)
        )
    check_against_reference(
        got,
        base64,
        fts64,
        "iso_c",
        {},
        seed=0,
        compute="float64",
        fresh=fresh,
        exclude=("proj",),
    )
    got = isofast.merge(base64, fts64, "iso_c", ALPHA, compute_dtype="float64", exclude=())
    check_against_reference(
        got, base64, fts64, "iso_c", {}, seed=0, compute="float64", fresh=fresh, exclude=()
    )
    mean = base64[names[0]] + ALPHA * np.mean([f[names[0]] - base64[names[0]] for f in fts64], 0)
    assert rel_update_error(got[names[0]], mean, base64[names[0]]) > 1e-3


# ----------------------------------------------------------------------------- empty tensors


def empty_model(kind: str, offset: float) -> Model:
    shapes = {"w": (3, 4), "empty": (0, 5), "none": (0,)}
    if kind == "torch-native":
        import torch

        return {n: torch.full(s, 1.0 + offset) for n, s in shapes.items()}
    arrays = {n: np.full(s, 1.0 + offset, dtype=np.float32) for n, s in shapes.items()}
    return convert(arrays, "torch" if kind == "torch-from-numpy" else "numpy", "float32")


# numpy (and torch.from_numpy) export arbitrary strides for zero-size arrays: not an error.
@pytest.mark.parametrize("kind", ["torch-native", "numpy", "torch-from-numpy"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "iso_c", "iso_cts", "tsv_m"])
def test_empty_tensors_are_merged(method: str, kind: str) -> None:
    if kind.startswith("torch"):
        pytest.importorskip("torch")
    base = empty_model(kind, 0.0)
    fts = [empty_model(kind, 0.5 * (t + 1)) for t in range(2)]
    got = isofast.merge(base, fts, method, threads=THREADS)
    for name, x in base.items():
        assert tuple(got[name].shape) == tuple(x.shape) and dtype_str(got[name]) == "float32"
