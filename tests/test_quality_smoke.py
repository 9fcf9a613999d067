"""The merging-quality benchmark (bench/quality) end to end, in its synthetic setting.

``run.py --smoke --synthetic``: a tiny random BERT and generated tasks, so only the ``test``
extras are needed (the real model and corpora are optional wheels; their smoke test is
bench/quality/test_smoke.py). Fine-tunes, caches, merges with every method, picks alpha and
writes the report in a few seconds; keeps the benchmark script working.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("bench") is None:  # plain `pytest` puts tests/, not the root, first
    # Appended, not prepended: the installed isofast must win over the un-built source tree.
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from bench.quality import synthetic
from bench.quality.test_smoke import check_smoke_run


def test_synthetic_smoke_run(tmp_path: Path) -> None:
    result = check_smoke_run(tmp_path, ["--synthetic"], set(synthetic.TASK_NAMES))
    assert result["spectrum"]["layer"] == synthetic.SPECTRUM_LAYER
    assert result["model"] == synthetic.MODEL_NAME
    assert result["rows"][1]["avg"] > 0.5  # individually fine-tuned heads beat chance
