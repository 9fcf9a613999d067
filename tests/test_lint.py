"""Static checks that CI must run: ruff (lint + format) and mypy on the public package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (ROOT / "pyproject.toml").exists(),
    reason="ruff not installed",
)
def test_ruff_clean() -> None:
    lint = _run("ruff", "check", "isofast", "tests", "bench")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _run("ruff", "format", "--check", "isofast", "tests", "bench")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_clean() -> None:
    result = _run("mypy", "--no-incremental", "isofast")
    assert result.returncode == 0, result.stdout + result.stderr
