"""isofast.merge against the reference loop of every method, as a pytest-benchmark suite.

Every method is one benchmark group of two: `isofast` (`isofast.merge(..., compute_dtype=
"float32", threads=N)`) and `reference` (bench/reference_impl.py for Iso-C, Iso-CTS and TSV-M,
bench/reference_elementwise.py for the others; float32, `torch.set_num_threads(N)`), timed
in this process on the same seeded ViT-B/32-shaped task vectors (bench/shapes.py). The base
model is all zeros, so both sides merge exactly the same D_t and M is the merged output.
Each benchmark then checks its last result against the float64 ground truth
(tests/reference.py), so that a fast but wrong path cannot win, and stores that error and
the peak memory of its rounds in `extra_info`.

    pytest bench --benchmark-only          # options and reading the results: bench/README.md
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark: pip install '.[bench]'")
torch = pytest.importorskip("torch", reason="needs torch: pip install '.[bench]'")

import ground_truth  # noqa: E402
import numpy as np  # noqa: E402
import reference_elementwise  # noqa: E402
import reference_impl  # noqa: E402
import synthetic_inputs  # noqa: E402
from harness import PeakMemory, Spread, release_free_memory  # noqa: E402
from pytest_benchmark.fixture import BenchmarkFixture  # noqa: E402

import isofast  # noqa: E402

from conftest import Settings, Timing  # noqa: E402

MODEL = "B/32"
METHODS = (
    "iso_c",
    "iso_cts",
    "tsv_m",
    "ties",
    "task_arithmetic",
    "weight_average",
    "dare_linear",
    "dare_ties",
    "consensus",
)
# isofast must match float64; the float32 reference loops are themselves up to ~1e-3 off
# (their SVDs in float32, bench/RESULTS.md), so theirs is only a check that they ran right.
TOLERANCE = {"isofast": 1e-4, "reference": 1e-2}

StateDict = dict[str, torch.Tensor]


def reference_merge(method: str, base: StateDict, task_vectors: list[StateDict]) -> StateDict:
    """theta0 + M from the reference loop of `method`, starting from the task vectors."""
    if method in reference_impl.REFERENCE_METHODS:
        update = reference_impl.reference_update(method, task_vectors)
    else:
        update = reference_elementwise.reference_update(method, task_vectors)
    return reference_impl.apply_update(base, update, 1.0)


def relative_error(merged: Mapping[str, torch.Tensor], exact: Mapping[str, torch.Tensor]) -> float:
    """Relative Frobenius error over all tensors together, in float64."""
    diff = sum(float((merged[k].double() - v).square().sum()) for k, v in exact.items())
    norm = sum(float(v.square().sum()) for v in exact.values())
    return math.sqrt(diff / norm)


@pytest.fixture(scope="session")
def task_vectors(bench_settings: Settings) -> list[StateDict]:
    torch.set_num_threads(bench_settings.threads)
    vectors = synthetic_inputs.task_vectors(
        synthetic_inputs.DEFAULT_CACHE, MODEL, bench_settings.blocks, bench_settings.tasks
    )
    # Load each side's libraries and start its thread pools before anything is timed.
    tiny = [{"w": torch.randn(16, 8)} for _ in range(2)]
    isofast.merge({"w": torch.zeros(16, 8)}, tiny, "iso_c", threads=bench_settings.threads)
    reference_impl.reference_update("iso_c", tiny)
    return vectors


@pytest.fixture(scope="session")
def zero_base(task_vectors: list[StateDict]) -> StateDict:
    return {name: torch.zeros_like(x) for name, x in task_vectors[0].items()}


@pytest.fixture(scope="session")
def float64_truth(
    bench_settings: Settings, task_vectors: list[StateDict], zero_base: StateDict
) -> Callable[[str], StateDict]:
    """method -> M in float64 from tests/reference.py, cached next to the inputs."""
    folder = synthetic_inputs.inputs_dir(
        synthetic_inputs.DEFAULT_CACHE, MODEL, bench_settings.blocks, bench_settings.tasks
    )
    source = Path(sys.modules[ground_truth.merge_model.__module__].__file__ or "")
    version = hashlib.sha256(source.read_bytes()).hexdigest()[:8]

    def compute(method: str) -> StateDict:
        base = {name: x.numpy() for name, x in zero_base.items()}
        finetuned = [{name: x.numpy() for name, x in tv.items()} for tv in task_vectors]
        merged: dict[str, np.ndarray] = ground_truth.merge_model(base, finetuned, method)
        return {name: torch.from_numpy(x) for name, x in merged.items()}

    def truth(method: str) -> StateDict:
        path = folder / f"truth64-{method}-{version}.pt"
        return synthetic_inputs.cached_state_dict(path, lambda: compute(method))

    return truth


def time_rounds(
    benchmark: BenchmarkFixture, merge: Callable[[], StateDict], rounds: int
) -> tuple[StateDict, float | None]:
    """`rounds` timed runs of `merge`: (the last result, the largest peak RSS growth in MiB).

    The peak goes to `extra_info` too, with how it was measured."""
    held: list[StateDict] = []
    meters: list[PeakMemory] = []
    peaks: list[float] = []

    def setup() -> None:
        held.clear()  # the previous output is freed before the round, not inside it
        release_free_memory()
        meters[:] = [PeakMemory()]

    def run() -> None:
        held.append(merge())

    def teardown() -> None:
        peaks.append(meters[0].peak_delta_mib())

    benchmark.pedantic(run, setup=setup, teardown=teardown, rounds=rounds, iterations=1)
    if not peaks:  # --benchmark-disable: one untimed run, no teardown; stop the meter
        meters[0].peak_delta_mib()
    peak = max(peaks, default=None)
    benchmark.extra_info.update(peak_rss_growth_mib=peak, peak_rss_method=meters[0].method)
    return held[0], peak


@pytest.mark.parametrize("side", ["reference", "isofast"])
@pytest.mark.parametrize("method", METHODS)
def test_merge(
    benchmark: BenchmarkFixture,
    bench_settings: Settings,
    task_vectors: list[StateDict],
    zero_base: StateDict,
    float64_truth: Callable[[str], StateDict],
    record_timing: Callable[[Timing], None],
    method: str,
    side: str,
) -> None:
    threads = bench_settings.threads

    def merge() -> StateDict:
        if side == "isofast":
            merged: StateDict = isofast.merge(
                zero_base, task_vectors, method, 1.0, compute_dtype="float32", threads=threads
            )
            return merged
        return reference_merge(method, zero_base, task_vectors)

    benchmark.group = method
    merged, peak_mib = time_rounds(benchmark, merge, bench_settings.rounds)
    error = relative_error(merged, float64_truth(method))
    benchmark.extra_info.update(
        side=side,
        method=method,
        size=bench_settings.size,
        tasks=bench_settings.tasks,
        blocks=bench_settings.blocks,
        threads=threads,
        rel_error_vs_float64=error,
    )
    stats = benchmark.stats
    seconds = Spread.of(stats.stats.data) if stats else None
    record_timing(Timing(method, side, seconds, error, peak_mib))
    assert error < TOLERANCE[side], f"{side} {method}: error {error:.2e} against float64"
