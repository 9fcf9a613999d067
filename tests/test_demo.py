"""`isofast demo` (issue 16, item 4): per-task alignment and flatness instead of distances.

The demo's fine-tunes differ in strength (each half the previous one), so task arithmetic
neglects the weakest: the table must show Iso-C and Iso-CTS raising the minimum task SAR, with
flat spectra, and say in one line what the numbers mean.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import isofast
from isofast import cli


def test_demo_shows_alignment_and_flatness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", "--tasks", "3", "--keep", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "min task SAR | mean task SAR | flatness" in text
    assert "1 = kept, 0 = ignored" in text and "dist" not in text
    rows = {
        cells[0]: [float(c) for c in cells[2:]]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert set(rows) == set(isofast.methods())
    ta, iso_c, iso_cts = rows["task_arithmetic"], rows["iso_c"], rows["iso_cts"]
    # columns: seconds, min SAR, mean SAR, flatness
    assert iso_c[1] > ta[1] + 0.03 and iso_cts[1] > ta[1] + 0.03
    assert iso_c[3] == pytest.approx(1.0, abs=1e-3) and ta[3] < 0.9
    assert all(0.0 <= r[1] <= r[2] <= 1.0 for r in rows.values())
