"""Static checks that CI must run: ruff (lint + format) and mypy on the public package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_DIRS = [d for d in ("isofast", "tests", "bench") if (ROOT / d).is_dir()]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_clean() -> None:
    lint = _run("ruff", "check", *PYTHON_DIRS)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", *PYTHON_DIRS)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_clean() -> None:
    result = _run("mypy", "--no-incremental", "isofast")
    assert result.returncode == 0, result.stdout + result.stderr
