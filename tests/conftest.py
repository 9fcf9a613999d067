"""Shared fixtures and helpers of the isofast test suite.

Random models are built so that every comparison with the float64 reference is decided by
the algorithm, not by rounding luck:

* base weights are multiples of 1/16 with magnitude in [0.5, 2] (exact in bf16/fp16/fp32);
* task vectors are odd multiples of 2**-20 with magnitude <= 0.75, so fine-tuned weights,
  task vectors and sums of up to 8 of them are exact in float32. TIES thresholds, elected
  signs and DARE rescaling by a power of two are therefore bit-identical in float32 and
  float64, and the TALL-mask test |D_t| >= 0.4 |tau - D_t| can never be an exact tie.

Every test that draws random inputs takes a FRESH seed (np.random.SeedSequence().entropy);
failure messages print it. Set ISOFAST_TEST_SEED=<seed> to replay a failure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

# Child processes (CLI runs, crash and kill tests) must import the installed package: with the
# repo root as working directory, Python would otherwise put the uncompiled source tree first.
os.environ["PYTHONSAFEPATH"] = "1"

F32_EPS = float(np.finfo(np.float32).eps)
F64_EPS = float(np.finfo(np.float64).eps)
GRID = 2.0**-20
# Threads for the many small merges of the equivalence tests. A multi-threaded BLAS on tiny
# matrices is slow, and very slow on a loaded machine; the default (None: every core) is
# still exercised by the framework/dtype tests. Override with ISOFAST_TEST_THREADS.
THREADS = int(os.environ.get("ISOFAST_TEST_THREADS", "1"))

# name -> (shape, kind): "float" tensors take the dtype under test; "int64" and "bool"
# tensors keep that dtype (a merge copies them from the base model).
ModelSpec = dict[str, tuple[tuple[int, ...], str]]

# Square, tall and wide matrices (two of some shapes: isofast may merge same-shape matrices
# side by side), a bias, a 3-D kernel and an integer buffer.
DEFAULT_SPEC: ModelSpec = {
    "blocks.0.attn.square.weight": ((64, 64), "float"),
    "blocks.0.mlp.tall.weight": ((96, 48), "float"),
    "blocks.0.mlp.wide.weight": ((40, 88), "float"),
    "blocks.0.mlp.bias": ((64,), "float"),
    "blocks.1.attn.square.weight": ((64, 64), "float"),
    "blocks.1.mlp.tall.weight": ((96, 48), "float"),
    "patch_embed.conv.weight": ((4, 6, 5), "float"),
    "position_ids": ((12,), "int64"),
}

SMALL_SPEC: ModelSpec = {
    "square.weight": ((24, 24), "float"),
    "tall.weight": ((36, 20), "float"),
    "wide.weight": ((16, 40), "float"),
    "bias": ((24,), "float"),
    "square2.weight": ((24, 24), "float"),
    "conv.weight": ((3, 4, 5), "float"),
    "ids": ((7,), "int64"),
}

Model = dict[str, Any]


# ----------------------------------------------------------------------------- seeds


def fresh_seed() -> int:
    """A new 128-bit seed per call, or ISOFAST_TEST_SEED when set (to replay a failure)."""
    env = os.environ.get("ISOFAST_TEST_SEED")
    if env:
        return int(env)
    return int(np.random.SeedSequence().entropy)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Fresh:
    """A fresh seed and the generator it seeds; str() is the reproduction hint."""

    seed: int
    rng: np.random.Generator

    def __str__(self) -> str:
        return f"seed={self.seed} (replay with ISOFAST_TEST_SEED={self.seed})"


@pytest.fixture
def fresh() -> Fresh:
    seed = fresh_seed()
    return Fresh(seed, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def single_thread_blas() -> Iterator[None]:
    """numpy's BLAS on one thread while a module runs (when threadpoolctl is installed).

    The reference does hundreds of SVDs of matrices below 100 x 100, where a threaded BLAS
    only adds hand-off cost, and on a loaded machine spinning BLAS threads make such tests
    10x slower. isofast sets its own thread count on every merge call, so this does not
    change what the library under test does.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# ----------------------------------------------------------------------------- random models


def base_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/16 in +-[0.5, 2]: exact in every float dtype."""
    sign = rng.choice(np.array([-1.0, 1.0]), size=shape)
    return sign * rng.integers(8, 33, size=shape).astype(np.float64) / 16.0


def task_vector(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.1) -> np.ndarray:
    """Odd multiples of 2**-20 drawn from N(0, scale), |x| <= 0.75 (exact in float32)."""
    x = np.clip(rng.standard_normal(shape) * scale, -0.7, 0.7)
    return (2.0 * np.floor(x / (2.0 * GRID)) + 1.0) * GRID


def non_float(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if kind == "bool":
        return rng.random(shape) < 0.5
    return rng.integers(0, 1000, size=shape).astype(kind)


def make_models(
    rng: np.random.Generator,
    tasks: int,
    spec: Mapping[str, tuple[tuple[int, ...], str]] = DEFAULT_SPEC,
) -> tuple[Model, list[Model]]:
    """A numpy base model (float64 and integer/bool tensors) and `tasks` fine-tunes whose
    task matrices have full rank. Integer/bool tensors of the fine-tunes differ from the
    base's: a merge must copy the base's.
    """
    base: Model = {}
    for name, (shape, kind) in spec.items():
        base[name] = base_values(rng, shape) if kind == "float" else non_float(rng, shape, kind)
    finetuned = []
    for _ in range(tasks):
        ft: Model = {}
        for name, (shape, kind) in spec.items():
            if kind == "float":
                ft[name] = base[name] + task_vector(rng, shape)
            else:
                ft[name] = non_float(rng, shape, kind)
        finetuned.append(ft)
    return base, finetuned


def low_rank_delta(rng: np.random.Generator, shape: tuple[int, int], rank: int) -> np.ndarray:
    """A rank-`rank` matrix A @ B with A, B multiples of 1/16 in [-0.5, 0.5]: every entry is
    a multiple of 2**-8 below 0.25 * rank, so it is exact in float32 and so is base + it."""
    a = rng.integers(-8, 9, size=(shape[0], rank)) / 16.0
    b = rng.integers(-8, 9, size=(rank, shape[1])) / 16.0
    return a @ b


# ----------------------------------------------------------------------------- conversions


def is_float_array(x: Any) -> bool:
    return str(getattr(x, "dtype", "")).removeprefix("torch.") in (
        "float16",
        "bfloat16",
        "float32",
        "float64",
    )


def convert(model: Mapping[str, Any], kind: str, dtype: str) -> Model:
    """The model as numpy arrays or torch tensors; float tensors in `dtype`, ints unchanged."""
    out: Model = {}
    for name, x in model.items():
        arr = np.asarray(x)
        floating = arr.dtype.kind == "f"
        if kind == "numpy":
            if dtype == "bfloat16" and floating:
                raise ValueError("numpy has no bfloat16")
            out[name] = np.ascontiguousarray(arr.astype(dtype) if floating else arr.copy())
        elif kind == "torch":
            import torch

            t = torch.from_numpy(np.array(arr, copy=True))
            out[name] = t.to(getattr(torch, dtype)) if floating else t
        else:
            raise ValueError(kind)
    return out


def to_numpy(x: Any) -> np.ndarray:
    """Any tensor/array as numpy; float tensors upcast to float64 (exactly)."""
    if hasattr(x, "detach"):  # torch
        import torch

        t = x.detach().to(torch.float64) if x.is_floating_point() else x.detach()
        return np.asarray(t.numpy())
    arr = np.asarray(x)
    return arr.astype(np.float64) if arr.dtype.kind == "f" else arr


def to_f64(model: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {name: to_numpy(x) for name, x in model.items()}


def dtype_str(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """x rounded to `dtype` and back to float64."""
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(np.array(x)).to(torch.bfloat16).to(torch.float64).numpy()
    return np.asarray(x).astype(dtype).astype(np.float64)


# ----------------------------------------------------------------------------- comparisons


def rel_update_error(got: np.ndarray, want: np.ndarray, base: np.ndarray) -> float:
    """||(got - base) - (want - base)||_F / ||want - base||_F (0/0 = 0, x/0 = inf)."""
    diff = float(np.linalg.norm(np.asarray(got, np.float64) - np.asarray(want, np.float64)))
    scale = float(np.linalg.norm(np.asarray(want, np.float64) - np.asarray(base, np.float64)))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def assert_model_matches(
    got: Mapping[str, Any],
    want: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    tol: float | Callable[[str], float],
    context: str,
) -> None:
    """Same names; integer tensors equal to the base; float tensors within `tol` (per name)."""
    assert set(got) == set(want), f"names differ: {sorted(set(got) ^ set(want))} ({context})"
    for name, w in want.items():
        g = to_numpy(got[name])
        assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape} ({context})"
        if w.dtype.kind != "f":
            assert np.array_equal(g, base[name]), f"{name}: integer tensor changed ({context})"
            continue
        limit = tol(name) if callable(tol) else tol
        err = rel_update_error(g, w, base[name])
        assert err <= limit, f"{name}: relative error {err:.3e} > {limit:.1e} ({context})"


def perturbed(
    models: Sequence[Mapping[str, np.ndarray]],
    base: Mapping[str, np.ndarray],
    eps: float,
    rng: np.random.Generator,
) -> list[dict[str, np.ndarray]]:
    """Fine-tunes whose task vectors are perturbed entrywise by a relative `eps`."""
    out = []
    for ft in models:
        p = {}
        for name, x in ft.items():
            if x.dtype.kind == "f":
                d = x - base[name]
                p[name] = base[name] + d * (1.0 + eps * rng.uniform(-1.0, 1.0, size=d.shape))
            else:
                p[name] = x
        out.append(p)
    return out
