"""The float64 NumPy ground truth of every merging method (tests/reference.py), for bench/.

tests/ is not a package on the path of a benchmark run, so the repository root is appended to
sys.path, the way tests/test_quality_smoke.py reaches bench/.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("tests") is None:
    # Appended, not prepended: the installed isofast must win over the un-built source tree.
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from tests.reference import dare_mask, merge_model

__all__ = ["dare_mask", "merge_model"]
