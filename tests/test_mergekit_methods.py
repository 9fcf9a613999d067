"""mergekit's interpolating methods (slerp, model_stock): isofast's kernels against the float64
reference (tests/reference.py) on fresh inputs, fp32 and bf16, gradients and filters of `t`,
thread independence, and mergekit configs end to end."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_mergekit import deltas_of, llama, rel, resolved, run_config, write_models

import isofast
from isofast import cli
from isofast.config import load_config
from isofast.errors import MergeInputError

import reference as ref
from conftest import THREADS, Fresh, convert, to_numpy

# Max relative error of the merged update vs the float64 reference, per compute dtype (the
# output is written in float64: a bf16 output would round the update).
TOL = {"float32": 1e-5, "float64": 1e-10}


def inputs(fresh: Fresh, tasks: int, dtype: str, ulps: bool) -> tuple[Any, list[Any]]:
    base, fts = llama(fresh, tasks, ulps=ulps)
    if dtype == "float32":
        return base, fts
    pytest.importorskip("torch")
    return convert(base, "torch", dtype), [convert(ft, "torch", dtype) for ft in fts]


def check(
    out: Mapping[str, Any], base: Mapping[str, Any], want: Mapping[str, Any], compute: str
) -> None:
    """The merged update out - base against the reference's: relative error <= TOL, plus the
    rounding of out = base + M in the compute dtype (eps |base|: updates near 0, as model_stock's
    t * mean or slerp at t = 0, have no relative accuracy left after that sum)."""
    eps = float(np.finfo(np.float32 if compute == "float32" else np.float64).eps)
    for n in want:
        b = to_numpy(base[n])
        err = float(np.linalg.norm(to_numpy(out[n]) - b - want[n]))
        bound = TOL[compute] * float(np.linalg.norm(want[n])) + eps * float(np.linalg.norm(b))
        assert err <= bound, (n, err, bound)


def theta0(base: Any) -> dict[str, np.ndarray]:
    return {n: to_numpy(x) for n, x in base.items()}


# ----------------------------------------------------------------------------- slerp


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("ulps", [False, True], ids=["spherical", "colinear"])
def test_slerp_matches_reference(fresh: Fresh, dtype: str, compute: str, ulps: bool) -> None:
    """Task vectors of 0.1 take the spherical branch; a few bf16 ULPs (|cos| > 0.9995) the
    linear fallback."""
    base, fts = inputs(fresh, 1, dtype, ulps)
    t = float(fresh.rng.uniform(-0.2, 1.2))
    out = isofast.merge(
        base, fts, "slerp", threads=THREADS, compute_dtype=compute, out_dtype="float64", t=t
    )
    want = ref.slerp_model(theta0(base), deltas_of(base, fts), t)
    check(out, base, want, compute)


def test_slerp_branches_are_exercised(fresh: Fresh) -> None:
    """The inputs above reach both of mergekit's branches (guards the test's data)."""
    for ulps, linear in ((False, False), (True, True)):
        base, fts = llama(fresh, 1, ulps=ulps)
        for n, x in base.items():
            a, b = np.ravel(x), np.ravel(fts[0][n])
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert (abs(cos) > 0.9995) == linear, (n, cos)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slerp_t_gradient_and_filters(fresh: Fresh, dtype: str) -> None:
    base, fts = inputs(fresh, 1, dtype, ulps=False)
    rng = fresh.rng
    t: Any = [
        {"filter": "self_attn", "value": [float(v) for v in rng.uniform(0, 1, 3)]},
        {"filter": "mlp", "value": [float(v) for v in rng.uniform(0, 1, 2)]},
        {"value": float(rng.uniform(0, 1))},
    ]
    out = isofast.merge(base, fts, "slerp", threads=THREADS, out_dtype="float64", t=t)
    want = ref.slerp_model(
        theta0(base), deltas_of(base, fts), per_tensor=lambda n: resolved(n, [t], 0.5)
    )
    check(out, base, want, "float32")


def test_slerp_ends_and_several_models(fresh: Fresh) -> None:
    """t = 0 is the base, t = 1 the fine-tune; several fine-tunes: slerp toward their mean."""
    base, fts = llama(fresh, 3)
    for t, want_model in ((0.0, base), (1.0, fts[0])):
        out = isofast.merge(base, fts[:1], "slerp", threads=THREADS, t=t)
        for n, x in want_model.items():
            np.testing.assert_allclose(to_numpy(out[n]), x, rtol=0, atol=1e-6, err_msg=n)
    t = float(fresh.rng.uniform(0, 1))
    out = isofast.merge(base, fts, "slerp", threads=THREADS, t=t)
    check(out, base, ref.slerp_model(theta0(base), deltas_of(base, fts), t), "float32")


# ----------------------------------------------------------------------------- model_stock


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(
    fresh: Fresh, dtype: str, compute: str, filter_wise: bool
) -> None:
    tasks = int(fresh.rng.integers(2, 5))
    base, fts = inputs(fresh, tasks, dtype, ulps=bool(fresh.rng.random() < 0.5))
    out = isofast.merge(
        base,
        fts,
        "model_stock",
        threads=THREADS,
        compute_dtype=compute,
        out_dtype="float64",
        filter_wise=filter_wise,
    )
    want = ref.model_stock_model(deltas_of(base, fts), filter_wise)
    check(out, base, want, compute)


def test_model_stock_opposite_updates_keep_the_base(fresh: Fresh) -> None:
    """cos = -1 with two models: 1 + (k - 1) cos = 0, no finite estimate: t = 0 (mergekit)."""
    base, fts = llama(fresh, 1)
    other = {n: 2 * x - fts[0][n] for n, x in base.items()}  # the opposite task vector
    out = isofast.merge(base, [fts[0], other], "model_stock", threads=THREADS)
    for n, x in base.items():
        np.testing.assert_array_equal(to_numpy(out[n]), x, err_msg=n)


def test_model_stock_needs_two_models(fresh: Fresh) -> None:
    base, fts = llama(fresh, 1)
    with pytest.raises(MergeInputError, match="at least two fine-tuned models"):
        isofast.merge(base, fts, "model_stock")


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize(
    ("method", "tasks", "params"),
    [("slerp", 1, {"t": 0.3}), ("model_stock", 3, {}), ("model_stock", 3, {"filter_wise": True})],
)
def test_results_do_not_depend_on_threads(
    fresh: Fresh, method: str, tasks: int, params: dict[str, Any]
) -> None:
    rng = fresh.rng
    base = {"w": rng.standard_normal((300, 700)).astype(np.float32)}  # several sum blocks
    fts = [{"w": base["w"] + 0.1 * rng.standard_normal((300, 700)).astype(np.float32)}]
    fts += [{"w": fts[0]["w"] + rng.standard_normal((300, 700)).astype(np.float32)}] * (tasks - 1)
    one = isofast.merge(base, fts, method, threads=1, **params)
    many = isofast.merge(base, fts, method, threads=7, **params)
    np.testing.assert_array_equal(to_numpy(one["w"]), to_numpy(many["w"]), err_msg=str(fresh))


def test_cli_lists_the_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "slerp" in text and "model_stock" in text and "filter_wise" in text


# ----------------------------------------------------------------------------- mergekit configs


def test_mergekit_slerp_config(tmp_path: Path, fresh: Fresh) -> None:
    """The usual mergekit SLERP: base_model listed among the models too, `t` filtered by
    self_attn / mlp with gradients over the layers and a default."""
    base, fts = llama(fresh, 1)
    write_models(tmp_path, base, fts)
    t: Any = [
        {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
        {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
        {"value": 0.5},
    ]
    config = {
        "merge_method": "slerp",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "ft0"}],
        "parameters": {"t": t},
        "dtype": "float32",
    }
    out = run_config(tmp_path, config)
    want = ref.slerp_model(
        theta0(base), deltas_of(base, fts), per_tensor=lambda n: resolved(n, [t], None)
    )
    check(out, base, want, "float32")
    assert load_config(tmp_path / "merge.yml").method == "slerp"


@pytest.mark.parametrize("filter_wise", [None, True])
def test_mergekit_model_stock_config(tmp_path: Path, fresh: Fresh, filter_wise: Any) -> None:
    base, fts = llama(fresh, 3)
    write_models(tmp_path, base, fts)
    config: dict[str, Any] = {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": [{"model": f"ft{i}"} for i in range(3)],
    }
    if filter_wise is not None:
        config["parameters"] = {"filter_wise": filter_wise}
    out = run_config(tmp_path, config)
    want = ref.model_stock_model(deltas_of(base, fts), bool(filter_wise))
    check(out, base, want, "float32")
    unfiltered = ref.model_stock_model(deltas_of(base, fts), not filter_wise)
    n = "model.layers.0.mlp.up_proj.weight"
    assert rel(to_numpy(out[n]) - base[n], unfiltered[n]) > 1e-4  # the option is applied


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {
                "merge_method": "slerp",
                "base_model": "base",
                "models": ["ft0", "ft1"],
                "parameters": {"t": 0.5},
            },
            "exactly one other model, got 2",
        ),
        ({"merge_method": "slerp", "base_model": "base", "models": ["ft0"]}, "parameter 't'"),
        ({"merge_method": "slerp", "models": ["base", "ft0"]}, "needs 'base_model'"),
        (
            {"merge_method": "model_stock", "base_model": "base", "models": ["base", "ft0"]},
            "at least two models besides base_model, got 1",
        ),
    ],
)
def test_mergekit_config_refusals(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    import yaml

    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(MergeInputError, match=message):
        load_config(path)
