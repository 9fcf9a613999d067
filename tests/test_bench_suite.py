"""The benchmark suite keeps working: `pytest bench --benchmark-disable` runs every benchmark
body once (isofast and its reference loop per method, with their correctness checks) on the
smallest inputs. Timings are not looked at here: they live in bench/RESULTS.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_suite_runs(tmp_path: Path) -> None:
    pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark (the test extras)")
    args = ["bench/test_bench_methods.py", "--benchmark-disable", "--bench-size", "tiny", "-q"]
    args += ["-p", "no:cacheprovider"]
    # PYTHONSAFEPATH (set by conftest) keeps the uncompiled source tree off sys.path.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
