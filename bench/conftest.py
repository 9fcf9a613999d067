"""Options of the pytest-benchmark suite (bench/test_bench_methods.py) and its summary table.

    pytest bench --benchmark-only [--bench-size tiny|small|b32] [--bench-threads N]
                                  [--bench-rounds N]

A plain `pytest` never loads this file: testpaths is tests/.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from harness import Spread, machine_summary, markdown_table

# name -> (residual blocks of ViT-B/32 besides the stem and head, number of tasks T)
SIZES: dict[str, tuple[int, int]] = {"tiny": (0, 4), "small": (1, 8), "b32": (12, 8)}
TIMED_SIZE, SMOKE_SIZE = "small", "tiny"


@dataclass(frozen=True)
class Settings:
    size: str
    blocks: int
    tasks: int
    threads: int
    rounds: int


@dataclass(frozen=True)
class Timing:
    group: str
    side: str  # "isofast" or "reference"
    seconds: Spread | None  # None under --benchmark-disable (one untimed run)
    error: float
    peak_mib: float | None


TIMINGS = pytest.StashKey[list[Timing]]()
LOAD_AT_START = pytest.StashKey[tuple[float, float, float]]()


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    group = parser.getgroup("isofast benchmarks")
    group.addoption(
        "--bench-size",
        choices=sorted(SIZES),
        default=None,
        help="ViT-B/32-shaped inputs: tiny = stem and head only, T=4; small = + 1 block, T=8; "
        f"b32 = all 12 blocks, T=8 (default: {TIMED_SIZE}, or {SMOKE_SIZE} with "
        "--benchmark-disable)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch.set_num_threads and isofast.merge(threads=) (default: every CPU)",
    )
    group.addoption("--bench-rounds", type=int, default=3, help="timed rounds per benchmark")
    if not pluginmanager.hasplugin("benchmark"):
        # Accept pytest-benchmark's switches, so that without it the suite skips with its
        # reason (test_bench_methods.py) instead of stopping at a usage error.
        group.addoption("--benchmark-only", action="store_true", help="(pytest-benchmark)")
        group.addoption("--benchmark-disable", action="store_true", help="(pytest-benchmark)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not active (pip install '.[bench]')")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[LOAD_AT_START] = os.getloadavg()


def settings(config: pytest.Config) -> Settings:
    size = config.getoption("bench_size") or (
        SMOKE_SIZE if config.getoption("benchmark_disable") else TIMED_SIZE
    )
    blocks, tasks = SIZES[size]
    rounds = int(config.getoption("bench_rounds"))
    threads = int(config.getoption("bench_threads"))
    if rounds < 1 or threads < 1:
        raise pytest.UsageError("--bench-rounds and --bench-threads must be >= 1")
    return Settings(size, blocks, tasks, threads, rounds)


@pytest.fixture(scope="session")
def bench_settings(pytestconfig: pytest.Config) -> Settings:
    return settings(pytestconfig)


@pytest.fixture
def record_timing(pytestconfig: pytest.Config) -> Callable[[Timing], None]:
    """Collects each benchmark's result for the summary table at the end of the run."""
    return pytestconfig.stash.setdefault(TIMINGS, []).append


def _seconds(timing: Timing | None) -> str:
    if timing is None or timing.seconds is None:
        return "-"
    s = timing.seconds
    return f"{s.median:.3f} ({s.low:.3f}-{s.high:.3f})"


def _ratio(reference: Timing | None, isofast: Timing | None) -> str:
    if reference is None or isofast is None or not reference.seconds or not isofast.seconds:
        return "-"
    return f"{reference.seconds.median / isofast.seconds.median:.2f}x"


def summary_table(timings: list[Timing]) -> str:
    by_group: dict[str, dict[str, Timing]] = {}
    for timing in timings:
        by_group.setdefault(timing.group, {})[timing.side] = timing
    header = ["group", "reference s", "isofast s", "reference / isofast"]
    header += ["reference err", "isofast err", "reference peak MiB", "isofast peak MiB"]
    rows = []
    for group, sides in by_group.items():
        ref, iso = sides.get("reference"), sides.get("isofast")
        row = [group, _seconds(ref), _seconds(iso), _ratio(ref, iso)]
        row += [f"{t.error:.1e}" if t else "-" for t in (ref, iso)]
        row += [f"{t.peak_mib:.0f}" if t and t.peak_mib is not None else "-" for t in (ref, iso)]
        rows.append(row)
    return markdown_table(header, rows, right=range(1, len(header)))


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    timings = config.stash.get(TIMINGS, [])
    if not timings:
        return
    s = settings(config)
    disabled = config.getoption("benchmark_disable")
    rounds = "one untimed run each (benchmarks disabled)" if disabled else f"{s.rounds} rounds each"
    write = terminalreporter.write_line
    terminalreporter.write_sep("-", "isofast against the reference loop (medians, min-max)")
    write(f"command: pytest {shlex.join(config.invocation_params.args)}")
    write(
        f"inputs: ViT-B/32 shapes, stem and head + {s.blocks} block(s), T = {s.tasks}, float32, "
        f"base all zeros; threads {s.threads} each side; {rounds}"
    )
    write(f"machine: {machine_summary(config.stash[LOAD_AT_START], os.getloadavg())}")
    write("errors: relative Frobenius error of M against tests/reference.py in float64")
    for line in summary_table(timings).splitlines():
        write(line)
