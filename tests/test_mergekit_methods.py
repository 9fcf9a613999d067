"""mergekit's methods beyond gta's (slerp, model_stock, nuslerp, multislerp, karcher, sce) and
della's MagPrune (gta's della_magprune): isofast's kernels against the float64 reference
(tests/reference.py) on fresh inputs, fp32 and bf16, gradients and filters, thread
independence, and mergekit configs end to end."""

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


# ----------------------------------------------------------------------------- nuslerp


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize(("row_wise", "flatten"), [(False, True), (False, False), (True, False)])
def test_nuslerp_matches_reference(
    fresh: Fresh, dtype: str, compute: str, row_wise: bool, flatten: bool
) -> None:
    base, fts = inputs(fresh, 2, dtype, ulps=bool(fresh.rng.random() < 0.5))
    weight = {"models": [float(v) for v in fresh.rng.uniform(0.1, 2.0, 2)]}
    out = isofast.merge(
        base,
        fts,
        "nuslerp",
        threads=THREADS,
        compute_dtype=compute,
        out_dtype="float64",
        weight=weight,
        nuslerp_row_wise=row_wise,
        nuslerp_flatten=flatten,
    )
    want = ref.nuslerp_model(deltas_of(base, fts), weight["models"], row_wise, flatten)
    check(out, base, want, compute)


def test_nuslerp_weight_filters_and_colinear(fresh: Fresh) -> None:
    """A filtered per-model weight; colinear task vectors take the linear branch."""
    base, fts = llama(fresh, 2)
    rng = fresh.rng
    w1: Any = [
        {"filter": "mlp", "value": [float(v) for v in rng.uniform(0.1, 2, 3)]},
        {"value": 1.0},
    ]
    weight = {"models": [1.0, w1]}
    out = isofast.merge(base, fts, "nuslerp", threads=THREADS, out_dtype="float64", weight=weight)
    want = ref.nuslerp_model(
        deltas_of(base, fts), per_tensor=lambda n: [1.0, resolved(n, [w1], 1.0)]
    )
    check(out, base, want, "float32")
    scaled = {n: x + 3.0 * (fts[0][n] - x) for n, x in base.items()}  # 3 D_0: colinear
    out = isofast.merge(base, [fts[0], scaled], "nuslerp", threads=THREADS, weight=0.5)
    want = {n: 2.0 * d for n, d in deltas_of(base, fts[:1])[0].items()}  # (D + 3 D) / 2
    check(out, base, want, "float32")


@pytest.mark.parametrize("tasks", [1, 3])
def test_nuslerp_other_counts_fold(fresh: Fresh, tasks: int) -> None:
    """One model: its task vector; more than two: folded in one at a time (isofast's own
    schema; mergekit configs take exactly two)."""
    base, fts = llama(fresh, tasks)
    weight = {"models": [float(v) for v in fresh.rng.uniform(0.1, 2.0, tasks)]}
    out = isofast.merge(base, fts, "nuslerp", threads=THREADS, out_dtype="float64", weight=weight)
    want = ref.nuslerp_model(deltas_of(base, fts), weight["models"])
    check(out, base, want, "float32")


# ----------------------------------------------------------------------------- multislerp


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp_matches_reference(
    fresh: Fresh, dtype: str, compute: str, normalize_weights: bool
) -> None:
    tasks = int(fresh.rng.integers(2, 5))
    base, fts = inputs(fresh, tasks, dtype, ulps=bool(fresh.rng.random() < 0.5))
    weight = {"models": [float(v) for v in fresh.rng.uniform(0.1, 2.0, tasks)]}
    out = isofast.merge(
        base,
        fts,
        "multislerp",
        threads=THREADS,
        compute_dtype=compute,
        out_dtype="float64",
        weight=weight,
        normalize_weights=normalize_weights,
    )
    want = ref.multislerp_model(deltas_of(base, fts), weight["models"], normalize_weights)
    check(out, base, want, compute)


def test_multislerp_one_model_and_antipodes(fresh: Fresh) -> None:
    """One model: that model; two opposite task vectors with equal weights: mergekit's linear
    fallback (the base); three that cancel: an error."""
    base, fts = llama(fresh, 1)
    out = isofast.merge(base, fts, "multislerp", threads=THREADS)
    for n, x in fts[0].items():
        np.testing.assert_allclose(to_numpy(out[n]), x, rtol=0, atol=1e-6, err_msg=n)
    other = {n: 2 * x - fts[0][n] for n, x in base.items()}
    out = isofast.merge(base, [fts[0], other], "multislerp", threads=THREADS)
    for n, x in base.items():
        np.testing.assert_allclose(to_numpy(out[n]), x, rtol=0, atol=1e-6, err_msg=n)
    with pytest.raises(ValueError, match="weighted sum of the unit task vectors is zero"):
        isofast.merge(
            base, [fts[0], other, fts[0]], "multislerp", weight={"models": [1.0, 2.0, 1.0]}
        )


# ----------------------------------------------------------------------------- nuslerp, multislerp


@pytest.mark.parametrize(
    ("method", "tasks", "params"),
    [
        ("nuslerp", 2, {"weight": {"models": [0.3, 0.7]}}),
        ("nuslerp", 2, {"nuslerp_flatten": False}),
        ("nuslerp", 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        ("multislerp", 3, {"weight": {"models": [0.3, 0.7, 1.0]}}),
    ],
)
def test_spherical_results_do_not_depend_on_threads(
    fresh: Fresh, method: str, tasks: int, params: dict[str, Any]
) -> None:
    rng = fresh.rng
    base = {"w": rng.standard_normal((300, 700)).astype(np.float32)}  # several sum blocks
    fts = [
        {"w": base["w"] + rng.standard_normal((300, 700)).astype(np.float32)} for _ in range(tasks)
    ]
    one = isofast.merge(base, fts, method, threads=1, **params)
    many = isofast.merge(base, fts, method, threads=7, **params)
    np.testing.assert_array_equal(to_numpy(one["w"]), to_numpy(many["w"]), err_msg=str(fresh))


def test_cli_lists_the_spherical_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["methods"]) == 0
    text = capsys.readouterr().out
    for word in ("nuslerp", "nuslerp_row_wise", "multislerp", "normalize_weights"):
        assert word in text


def test_mergekit_nuslerp_config(tmp_path: Path, fresh: Fresh) -> None:
    """Per-model weights (one filtered, with the top-level value as its fallback), rows of the
    last axis; the base listed among the models too."""
    base, fts = llama(fresh, 2)
    write_models(tmp_path, base, fts)
    own: Any = [{"filter": "self_attn", "value": [0.2, 0.9]}]
    config = {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [
            {"model": "base"},
            {"model": "ft0", "parameters": {"weight": 0.6}},
            {"model": "ft1", "parameters": {"weight": own}},
        ],
        "parameters": {"weight": 0.4, "nuslerp_flatten": False},
        "dtype": "float32",
    }
    out = run_config(tmp_path, config)
    want = ref.nuslerp_model(
        deltas_of(base, fts),
        flatten=False,
        per_tensor=lambda n: [0.6, resolved(n, [own, 0.4], None)],
    )
    check(out, base, want, "float32")
    assert load_config(tmp_path / "merge.yml").method == "nuslerp"


def test_mergekit_multislerp_config(tmp_path: Path, fresh: Fresh) -> None:
    base, fts = llama(fresh, 3)
    write_models(tmp_path, base, fts)
    weights = [float(v) for v in fresh.rng.uniform(0.2, 2.0, 3)]
    config = {
        "merge_method": "multislerp",
        "base_model": "base",
        "models": [{"model": f"ft{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)],
        "parameters": {"normalize_weights": False},
    }
    out = run_config(tmp_path, config)
    want = ref.multislerp_model(deltas_of(base, fts), weights, normalize_weights=False)
    check(out, base, want, "float32")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {
                "merge_method": "nuslerp",
                "base_model": "base",
                "models": [{"model": "ft0", "parameters": {"weight": 1.0}}],
            },
            "exactly two models besides base_model, got 1",
        ),
        (
            {
                "merge_method": "nuslerp",
                "base_model": "base",
                "models": [{"model": "ft0", "parameters": {"weight": 1.0}}, {"model": "ft1"}],
            },
            "needs parameter 'weight' for every model",
        ),
        ({"merge_method": "multislerp", "models": ["ft0"]}, "needs 'base_model'"),
        (
            {"merge_method": "multislerp", "base_model": "base", "models": ["base"]},
            "needs a model besides base_model",
        ),
    ],
)
def test_mergekit_spherical_config_refusals(
    tmp_path: Path, config: dict[str, Any], message: str
) -> None:
    import yaml

    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(MergeInputError, match=message):
        load_config(path)


# ----------------------------------------------------------------------------- karcher


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_karcher_matches_reference(fresh: Fresh, dtype: str, compute: str) -> None:
    tasks = int(fresh.rng.integers(1, 4))
    base, fts = inputs(fresh, tasks, dtype, ulps=bool(fresh.rng.random() < 0.5))
    max_iter = int(fresh.rng.integers(0, 12))
    out = isofast.merge(
        base,
        fts,
        "karcher",
        threads=THREADS,
        compute_dtype=compute,
        out_dtype="float64",
        max_iter=max_iter,
    )
    want = ref.karcher_model(theta0(base), deltas_of(base, fts), max_iter=max_iter)
    check(out, base, want, compute)


def test_karcher_of_two_is_the_slerp_midpoint(fresh: Fresh) -> None:
    """Two models of equal norm: the Karcher mean is the slerp midpoint (guards the
    reference too)."""
    base, fts = llama(fresh, 1)
    ft = {n: x * np.linalg.norm(base[n]) / np.linalg.norm(x) for n, x in fts[0].items()}
    out = isofast.merge(base, [ft], "karcher", threads=THREADS, out_dtype="float64", max_iter=50)
    want = ref.slerp_model(theta0(base), deltas_of(base, [ft]), 0.5)
    check(out, base, want, "float32")


def test_karcher_options_are_checked(fresh: Fresh) -> None:
    base, fts = llama(fresh, 1)
    with pytest.raises(MergeInputError, match="max_iter must be an integer"):
        isofast.merge(base, fts, "karcher", max_iter=-1)
    with pytest.raises(MergeInputError, match="tol must be in"):
        isofast.merge(base, fts, "karcher", tol=-1.0)


@pytest.mark.parametrize("tasks", [1, 3])
def test_karcher_does_not_depend_on_threads(fresh: Fresh, tasks: int) -> None:
    rng = fresh.rng
    base = {"w": rng.standard_normal((300, 700)).astype(np.float32)}  # several sum blocks
    fts = [
        {"w": base["w"] + rng.standard_normal((300, 700)).astype(np.float32)} for _ in range(tasks)
    ]
    one = isofast.merge(base, fts, "karcher", threads=1)
    many = isofast.merge(base, fts, "karcher", threads=7)
    np.testing.assert_array_equal(to_numpy(one["w"]), to_numpy(many["w"]), err_msg=str(fresh))


@pytest.mark.parametrize("with_base", [True, False])
def test_mergekit_karcher_config(tmp_path: Path, fresh: Fresh, with_base: bool) -> None:
    """With base_model the mean includes it; without, the mean of the models (the first one
    is isofast's base)."""
    base, fts = llama(fresh, 2)
    write_models(tmp_path, base, fts)
    config: dict[str, Any] = {
        "merge_method": "karcher",
        "models": [{"model": "ft0"}, {"model": "ft1"}],
        "parameters": {"max_iter": 20, "tol": 1e-7},
    }
    if with_base:
        config["base_model"] = "base"
        want = ref.karcher_model(theta0(base), deltas_of(base, fts), max_iter=20, tol=1e-7)
        start = base
    else:
        want = ref.karcher_model(theta0(fts[0]), deltas_of(fts[0], fts[1:]), 20, 1e-7)
        start = fts[0]
    out = run_config(tmp_path, config)
    check(out, start, want, "float32")
    assert load_config(tmp_path / "merge.yml").method == "karcher"
    cli_text = " ".join(isofast.methods()["karcher"]["parameters"])
    assert "max_iter" in cli_text and "tol" in cli_text


# ----------------------------------------------------------------------------- della (gta)


def della_params(fresh: Fresh, tasks: int, elect: str) -> dict[str, Any]:
    rng = fresh.rng
    densities = [float(d) for d in rng.uniform(0.2, 0.8, tasks)]
    return {
        "elect": elect,
        "weight": {"models": [float(w) for w in rng.uniform(0.2, 1.5, tasks)]},
        "density": {"models": densities},
        "epsilon": {"models": [float(rng.uniform(0, min(d, 1 - d))) * 0.99 for d in densities]},
        "rescale": bool(rng.random() < 0.7),
        "normalize": elect == "sum",
        "lam": float(rng.uniform(0.5, 1.5)),
    }


def della_ref_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v["models"] if isinstance(v, dict) else v for k, v in params.items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("elect", ["sum", "none"], ids=["della", "della_linear"])
def test_della_matches_reference(fresh: Fresh, dtype: str, compute: str, elect: str) -> None:
    """gta with DELLA's MagPrune: the same kept entries as the reference (the contract's draw
    against rank-dependent probabilities), the same merged update."""
    tasks = int(fresh.rng.integers(1, 4))
    base, fts = inputs(fresh, tasks, dtype, ulps=bool(fresh.rng.random() < 0.5))
    params = della_params(fresh, tasks, elect)
    seed = int(fresh.rng.integers(2**32))
    out = isofast.merge(
        base,
        fts,
        "gta",
        threads=THREADS,
        seed=seed,
        compute_dtype=compute,
        out_dtype="float64",
        sparsify="della_magprune",
        **params,
    )
    want = ref.della_model(deltas_of(base, fts), seed=seed, **della_ref_params(params))
    check(out, base, want, compute)


def test_della_keeps_density_on_average_and_favours_large_entries(fresh: Fresh) -> None:
    rng = fresh.rng
    x = rng.standard_normal((400, 500))
    density, epsilon = 0.3, 0.2
    keep = ref.della_mask(x, 0, "w", 0, density, epsilon)
    assert abs(keep.mean() - density) < 0.01
    big = np.abs(x) > np.quantile(np.abs(x), 0.9, axis=1, keepdims=True)
    assert keep[big].mean() > density + 0.7 * epsilon  # large entries: p near density + eps
    base = {"w": np.zeros((400, 500), np.float32)}
    out = isofast.merge(
        base,
        [{"w": x.astype(np.float32)}],
        "gta",
        threads=THREADS,
        sparsify="della_magprune",
        density=density,
        epsilon=epsilon,
    )
    np.testing.assert_array_equal(to_numpy(out["w"]) != 0, keep & (x.astype(np.float32) != 0))


def test_della_epsilon_is_checked(fresh: Fresh) -> None:
    base, fts = llama(fresh, 1)
    with pytest.raises(ValueError, match="density \\+- epsilon in \\(0, 1\\)"):
        isofast.merge(base, fts, "gta", sparsify="della_magprune", density=0.1, epsilon=0.2)


@pytest.mark.parametrize("shape", [(300, 700), (5000,), (7, 40, 300)])
def test_della_does_not_depend_on_threads(fresh: Fresh, shape: tuple[int, ...]) -> None:
    rng = fresh.rng
    base = {"w": rng.standard_normal(shape).astype(np.float32)}
    fts = [{"w": base["w"] + rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]
    params: dict[str, Any] = {"sparsify": "della_magprune", "elect": "sum", "density": 0.4}
    params |= {"epsilon": 0.2, "rescale": True, "normalize": True}
    one = isofast.merge(base, fts, "gta", threads=1, seed=3, **params)
    many = isofast.merge(base, fts, "gta", threads=7, seed=3, **params)
    np.testing.assert_array_equal(to_numpy(one["w"]), to_numpy(many["w"]), err_msg=str(fresh))


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_mergekit_della_config(tmp_path: Path, fresh: Fresh, method: str) -> None:
    """Per-model weight, density and epsilon (one filtered with a gradient), mergekit's
    defaults (della: elect sum, normalize, rescale; della_linear: rescale), seed."""
    base, fts = llama(fresh, 3)
    write_models(tmp_path, base, fts)
    eps0: Any = [{"filter": "mlp", "value": [0.05, 0.2]}, {"value": 0.1}]
    config = {
        "merge_method": method,
        "base_model": "base",
        "models": [
            {"model": "ft0", "parameters": {"weight": 0.5, "density": 0.4, "epsilon": eps0}},
            {"model": "ft1", "parameters": {"weight": 1.2, "density": 0.6}},
            {"model": "ft2", "parameters": {"weight": 0.8, "density": 0.5}},
        ],
        "parameters": {"epsilon": 0.3},
        "seed": 11,
        "dtype": "float32",
    }
    out = run_config(tmp_path, config)
    want = ref.della_model(
        deltas_of(base, fts),
        seed=11,
        elect="sum" if method == "della" else "none",
        normalize=method == "della",
        weight=[0.5, 1.2, 0.8],
        density=[0.4, 0.6, 0.5],
        per_tensor=lambda n: {"epsilon": [resolved(n, [eps0], None), 0.3, 0.3]},
    )
    check(out, base, want, "float32")
    request = load_config(tmp_path / "merge.yml")
    assert request.method == "gta" and request.params["sparsify"] == "della_magprune"


# ----------------------------------------------------------------------------- sce


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_matches_reference(fresh: Fresh, dtype: str, compute: str, select_topk: float) -> None:
    """bf16 ULP task vectors (ulps) tie massively in variance: the exact top-k by index."""
    tasks = int(fresh.rng.integers(1, 5))
    base, fts = inputs(fresh, tasks, dtype, ulps=bool(fresh.rng.random() < 0.5))
    out = isofast.merge(
        base,
        fts,
        "sce",
        threads=THREADS,
        compute_dtype=compute,
        out_dtype="float64",
        select_topk=select_topk,
    )
    want = ref.sce_model(deltas_of(base, fts), select_topk)
    check(out, base, want, compute)


def test_sce_selects_the_share_of_varying_entries(fresh: Fresh) -> None:
    """Entries where every task agrees have variance 0: not counted in k, never selected;
    select_topk 0 keeps nothing."""
    rng = fresh.rng
    base = {"w": np.zeros((50, 40), np.float32)}
    shared = rng.standard_normal((50, 40)).astype(np.float32)
    agree = rng.random((50, 40)) < 0.5
    fts = [{"w": np.where(agree, shared, rng.standard_normal((50, 40)).astype(np.float32))}]
    fts.append({"w": np.where(agree, shared, rng.standard_normal((50, 40)).astype(np.float32))})
    out = isofast.merge(base, fts, "sce", threads=THREADS, select_topk=0.5)
    assert np.count_nonzero(out["w"]) == int(np.count_nonzero(~agree) * 0.5)
    assert not np.any(out["w"][agree])
    out = isofast.merge(base, fts, "sce", threads=THREADS, select_topk=0.0)
    assert not np.any(out["w"])


@pytest.mark.parametrize("select_topk", [1.0, 0.2])
def test_sce_does_not_depend_on_threads(fresh: Fresh, select_topk: float) -> None:
    rng = fresh.rng
    base = {"w": rng.standard_normal((300, 700)).astype(np.float32)}  # several sum blocks
    fts = [{"w": base["w"] + rng.standard_normal((300, 700)).astype(np.float32)} for _ in range(3)]
    one = isofast.merge(base, fts, "sce", threads=1, select_topk=select_topk)
    many = isofast.merge(base, fts, "sce", threads=7, select_topk=select_topk)
    np.testing.assert_array_equal(to_numpy(one["w"]), to_numpy(many["w"]), err_msg=str(fresh))


def test_mergekit_sce_config(tmp_path: Path, fresh: Fresh) -> None:
    base, fts = llama(fresh, 3)
    write_models(tmp_path, base, fts)
    config = {
        "merge_method": "sce",
        "base_model": "base",
        "models": [{"model": "base"}, *({"model": f"ft{i}"} for i in range(3))],
        "parameters": {"select_topk": 0.4, "int8_mask": True},
        "dtype": "float32",
    }
    out = run_config(tmp_path, config)
    check(out, base, ref.sce_model(deltas_of(base, fts), 0.4), "float32")
    request = load_config(tmp_path / "merge.yml")
    assert request.method == "sce" and request.params == {"select_topk": 0.4}
    text = " ".join(isofast.methods()["sce"]["parameters"])
    assert "select_topk" in text
