"""mergekit configs give mergekit's result: its methods and rules (exact top-k trim, sign
election, weighted divisors, L1 rescale, lambda), per-model parameters, gradients over the
layers and filtered values; checked against the float64 reference (tests/reference.py) on
fresh inputs. The reference's parameter resolution here is written apart from isofast's."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

import isofast
from isofast.config import load_config
from isofast.errors import MergeInputError, MergeWarning

import reference as ref
from conftest import THREADS, Fresh, base_values, convert, task_vector, to_numpy

LAYERS = 3
SHAPES = {
    "model.embed_tokens.weight": (24, 16),
    **{
        f"model.layers.{i}.{part}.weight": shape
        for i in range(LAYERS)
        for part, shape in (("self_attn.q_proj", (16, 16)), ("mlp.up_proj", (20, 16)))
    },
    "model.layers.0.input_layernorm.weight": (16,),
    "model.norm.weight": (16,),
}


def llama(fresh: Fresh, tasks: int, ulps: bool = False) -> tuple[dict[str, Any], list[Any]]:
    """A small Llama-named base and fine-tunes. ulps: task vectors of a few bf16 ULPs (the
    massive ties of bf16 checkpoints), else the exact float32 grid of conftest."""
    rng = fresh.rng
    base = {n: base_values(rng, s) for n, s in SHAPES.items()}
    fts = []
    for _ in range(tasks):
        ft = {}
        for n, x in base.items():
            if ulps:  # |x| in [0.5, 2]: bf16 ULP 2**-8 or 2**-7
                ulp = np.where(np.abs(x) < 1, 2.0**-8, 2.0**-7)
                ft[n] = x + rng.integers(-3, 4, size=x.shape) * ulp
            else:
                ft[n] = x + task_vector(rng, x.shape)
        fts.append(ft)
    return base, fts


def deltas_of(base: Mapping[str, Any], fts: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    b = {n: to_numpy(x) for n, x in base.items()}
    return [{n: to_numpy(ft[n]) - b[n] for n in b} for ft in fts]


def rel(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.linalg.norm(want))
    return float(np.linalg.norm(got - want)) / scale if scale else float(np.linalg.norm(got))


def check(out: Mapping[str, Any], base: Mapping[str, Any], want: Mapping[str, Any], tol: float):
    for n in want:
        got = to_numpy(out[n]) - to_numpy(base[n])
        assert rel(got, want[n]) <= tol, n


# ----------------------------------------------------------------------------- resolution


def evaluate(setting: Any, name: str, t: float) -> Any:
    """mergekit's evaluate_setting, restated: scalar, gradient, or first matching filter."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(not isinstance(e, dict) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in name:
            return evaluate(cond["value"], name, t)
    return None


def t_of(name: str) -> float:
    parts = name.split(".")
    if "layers" not in parts:
        return 0.0
    return int(parts[parts.index("layers") + 1]) / (LAYERS - 1)


def resolved(name: str, scopes: Sequence[Any], default: Any) -> Any:
    for scope in scopes:
        if scope is not None:
            v = evaluate(scope, name, t_of(name))
            if v is not None:
                return v
    return default


# ----------------------------------------------------------------------------- exact top-k


@pytest.mark.parametrize("threads", [1, 5])
def test_magnitude_keeps_exactly_k_in_bf16_ties(fresh: Fresh, threads: int) -> None:
    """bf16 task vectors of a few ULPs tie massively at the threshold: exactly
    k = int(density n) entries stay per tensor, ties going to the lowest index."""
    torch = pytest.importorskip("torch")
    base, fts = llama(fresh, 1, ulps=True)
    density = float(fresh.rng.uniform(0.05, 0.6))
    tb, tf = convert(base, "torch", "bfloat16"), [convert(ft, "torch", "bfloat16") for ft in fts]
    out = isofast.merge(
        tb,
        tf,
        "gta",
        1.0,
        threads=threads,
        sparsify="magnitude",
        density=density,
        compute_dtype="float64",
        out_dtype="float64",
    )
    d = deltas_of(tb, tf)[0]
    for n, x in d.items():
        got = to_numpy(out[n]) - to_numpy(tb[n])
        k = max(1, int(density * x.size))
        assert np.count_nonzero(got) == k, (n, fresh)
        flat = x.ravel()
        order = np.lexsort((np.arange(flat.size), -np.abs(flat)))[:k]
        want = np.zeros_like(flat)
        want[order] = flat[order]
        np.testing.assert_array_equal(got.ravel(), want, err_msg=f"{n} {fresh}")
    assert torch is not None


def test_results_do_not_depend_on_threads(fresh: Fresh) -> None:
    base, fts = llama(fresh, 3, ulps=True)
    params = dict(
        sparsify="magnitude_outliers",
        elect="sum",
        density=0.3,
        gamma=0.05,
        rescale=True,
        normalize=True,
        weight={"models": [1.0, 0.4, 0.7]},
    )
    one = isofast.merge(base, fts, "gta", 1.0, threads=1, **params)
    many = isofast.merge(base, fts, "gta", 1.0, threads=7, **params)
    for n in one:
        np.testing.assert_array_equal(to_numpy(one[n]), to_numpy(many[n]), err_msg=str(fresh))


@pytest.mark.parametrize("sparsify", ["none", "magnitude", "random", "magnitude_outliers"])
@pytest.mark.parametrize("elect", ["none", "sum", "count"])
@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_gta_matches_reference(fresh: Fresh, sparsify: str, elect: str, compute: str) -> None:
    base, fts = llama(fresh, 3, ulps=fresh.rng.random() < 0.5)
    weights = [float(w) for w in fresh.rng.uniform(-0.5, 1.5, 3)]
    densities = [float(d) for d in fresh.rng.uniform(0.1, 0.9, 3)]
    params: dict[str, Any] = dict(
        sparsify=sparsify,
        elect=elect,
        gamma=0.05,
        rescale=bool(fresh.rng.random() < 0.5),
        normalize=bool(fresh.rng.random() < 0.5),
        lam=float(fresh.rng.uniform(0.5, 1.5)),
    )
    seed = int(fresh.rng.integers(2**32))
    out = isofast.merge(
        base,
        fts,
        "gta",
        1.0,
        threads=THREADS,
        seed=seed,
        compute_dtype=compute,
        weight={"models": weights},
        density={"models": densities},
        **params,
    )
    want = ref.gta_model(
        deltas_of(base, fts), seed=seed, weight=weights, density=densities, **params
    )
    # float32: weights of mixed signs make divisors that cancel (test_methods uses 1e-4 too)
    check(out, base, want, 1e-10 if compute == "float64" else 1e-4)


# ----------------------------------------------------------------------------- mergekit configs


def write_models(tmp: Path, base: Mapping[str, Any], fts: Sequence[Mapping[str, Any]]) -> None:
    for name, model in [("base", base), *((f"ft{i}", ft) for i, ft in enumerate(fts))]:
        (tmp / name).mkdir()
        save_file(
            {n: np.asarray(x, np.float32) for n, x in model.items()},
            str(tmp / name / "model.safetensors"),
        )


def run_config(tmp: Path, config: dict[str, Any]) -> dict[str, Any]:
    path = tmp / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    request = load_config(path, threads=THREADS)
    return dict(
        isofast.merge(
            request.base,
            request.models,
            request.method,
            request.alpha,
            threads=THREADS,
            seed=request.seed,
            **request.params,
        )
    )


# mergekit method -> (sparsify, elect, normalize, rescale) by mergekit's defaults.
DEFAULTS = {
    "task_arithmetic": ("none", "none", False, False),
    "ties": ("magnitude", "sum", True, False),
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", "none", False, True),
    "breadcrumbs": ("magnitude_outliers", "none", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
}


@pytest.mark.parametrize("method", sorted(DEFAULTS))
def test_mergekit_methods_with_schedules(tmp_path: Path, fresh: Fresh, method: str) -> None:
    """Per-model weights and densities, a density gradient over the layers, a filtered
    weight, global lambda: every tensor merged with mergekit's resolved values and rules."""
    base, fts = llama(fresh, 3)
    write_models(tmp_path, base, fts)
    rng = fresh.rng
    own = [
        {"weight": float(rng.uniform(0.2, 1.2)), "density": float(rng.uniform(0.2, 0.9))},
        {"weight": [{"filter": "mlp", "value": 0.3}], "density": [0.2, 0.9]},
        {},
    ]
    shared = {"weight": 0.8, "density": 0.5, "lambda": float(rng.uniform(0.5, 1.5))}
    if method.startswith("breadcrumbs"):
        shared["gamma"] = 0.05
    config = {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": f"ft{i}", "parameters": p} for i, p in enumerate(own)],
        "parameters": shared,
        "seed": int(rng.integers(1000)),
    }
    out = run_config(tmp_path, config)
    sparsify, elect, normalize, rescale = DEFAULTS[method]

    def per_tensor(name: str) -> dict[str, Any]:
        return {
            "weight": [resolved(name, [o.get("weight"), shared["weight"]], 1.0) for o in own],
            "density": [resolved(name, [o.get("density"), shared["density"]], 1.0) for o in own],
        }

    want = ref.gta_model(
        deltas_of(base, fts),
        seed=config["seed"],
        per_tensor=per_tensor,
        sparsify=sparsify,
        elect=elect,
        normalize=normalize,
        rescale=rescale,
        lam=shared["lambda"],
        gamma=0.05 if sparsify == "magnitude_outliers" else 0.01,
    )
    check(out, base, want, 1e-5)


def test_mergekit_linear_includes_the_base(tmp_path: Path, fresh: Fresh) -> None:
    base, fts = llama(fresh, 2)
    write_models(tmp_path, base, fts)
    config = {
        "merge_method": "linear",
        "base_model": "base",
        "models": [
            {"model": "ft0", "parameters": {"weight": 0.7}},
            {"model": "ft1", "parameters": {"weight": [0.1, 0.5]}},
        ],
        "parameters": {"weight": 0.2},
    }
    out = run_config(tmp_path, config)
    for n, x in base.items():
        w = [0.7, evaluate([0.1, 0.5], n, t_of(n)), 0.2]
        want = (w[0] * fts[0][n] + w[1] * fts[1][n] + w[2] * x) / sum(w)
        assert rel(to_numpy(out[n]) - x, want - x) <= 1e-5, n


def test_isofast_schema_takes_per_model_parameters(tmp_path: Path, fresh: Fresh) -> None:
    base, fts = llama(fresh, 2)
    write_models(tmp_path, base, fts)
    config = {
        "base_model": "base",
        "models": [{"model": "ft0", "parameters": {"weight": 0.25}}, "ft1"],
        "method": "gta",
        "parameters": {
            "sparsify": "magnitude",
            "elect": "sum",
            "density": 0.4,
            "normalize": True,
            "weight": [{"filter": "self_attn", "value": 2.0}, {"value": 1.0}],
        },
    }
    request = load_config(_write(tmp_path, config))
    assert request.params["weight"] == {"models": [0.25, config["parameters"]["weight"]]}
    out = run_config(tmp_path, config)

    def per_tensor(name: str) -> dict[str, Any]:
        return {"weight": [0.25, 2.0 if "self_attn" in name else 1.0]}

    want = ref.gta_model(
        deltas_of(base, fts),
        per_tensor=per_tensor,
        sparsify="magnitude",
        elect="sum",
        density=0.4,
        normalize=True,
    )
    check(out, base, want, 1e-5)
    # The written config reproduces the request.
    again = isofast.MergeRequest.make(
        {
            "base": request.base,
            "models": request.models,
            "method": "gta",
            "params": request.to_config()["parameters"],
        },
        "written",
    )
    assert again.method_params == request.method_params


def _write(tmp: Path, config: dict[str, Any]) -> Path:
    path = tmp / "own.yml"
    path.write_text(yaml.safe_dump(config))
    return path


# ----------------------------------------------------------------------------- resolution rules


def test_gradient_and_filter_resolution() -> None:
    from isofast import param_schedule as s

    names = [f"model.layers.{i}.mlp.w" for i in range(5)] + ["lm_head.weight"]
    assert s.position("model.layers.2.mlp.w", names) == 0.5
    assert s.position("lm_head.weight", names) == 0.0
    assert s.resolve([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert s.resolve([0.0, 1.0], "x", 1.0) == 1.0
    conds = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.3}]
    assert s.resolve(conds, "a.self_attn.q", 0.5) == pytest.approx(0.5)
    assert s.resolve(conds, "a.mlp.up", 0.5) == 0.3
    assert s.resolve(conds, "a.norm", 0.5) is None
    assert s.resolve(s.with_fallback(conds, 0.9), "a.norm", 0.5) == 0.9
    assert s.resolve({"models": [1.0, conds]}, "a.mlp", 0) == (1.0, 0.3)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"merge_method": "nearswap"}, "not supported"),
        ({"merge_method": "ties", "slices": [{"sources": []}]}, "slices"),
        ({"merge_method": "ties", "models": ["ft0"]}, "base_model"),
        ({"merge_method": "ties", "tokenizer_source": "union"}, "tokenizer_source"),
        ({"merge_method": "linear", "parameters": {"normalize": False, "weight": 1}}, "normalize"),
        ({"merge_method": "linear", "base_model": "base", "models": ["ft0"]}, "weight"),
        (
            {"merge_method": "ties", "parameters": {"density": [{"filter": 3, "value": 1}]}},
            "filter",
        ),
        ({"merge_method": "ties", "parameters": {"density": 1.5}}, "density"),
    ],
)
def test_refusals(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    config = {"base_model": "base", "models": ["ft0"], **config}
    if (
        config.get("models") == ["ft0"]
        and "base_model" in config
        and config["merge_method"] == "ties"
        and message == "base_model"
    ):
        del config["base_model"]
    with pytest.raises(MergeInputError, match=message):
        load_config(_write(tmp_path, config))


def test_unknown_mergekit_parameters_are_ignored_with_a_warning(tmp_path: Path) -> None:
    config = {
        "merge_method": "ties",
        "base_model": "base",
        "models": ["ft0"],
        "parameters": {"density": 0.5, "weight": 1.0, "epsilon": 0.1},
    }
    with pytest.warns(MergeWarning, match="epsilon"):
        request = load_config(_write(tmp_path, config))
    assert request.method == "gta" and math.isclose(request.params["density"], 0.5)


def test_per_model_count_must_match(tmp_path: Path) -> None:
    with pytest.raises(MergeInputError, match="per-model"):
        isofast.MergeRequest("base", ("a", "b"), "gta", params={"weight": {"models": [1.0]}})
