"""`isofast analyze` (issue 16): subspace alignment, spectra and overlaps of a merge's inputs.

* SAR and the energy rank k_M match a float64 NumPy reference (plain SVD) on random wide and
  tall matrices, and end to end for task arithmetic in float64.
* Constructed cases: a task inside the merged subspace has SAR 1, an orthogonal one 0; when one
  task dominates the spectrum, task arithmetic leaves the other behind (SAR 0) and Iso-C
  raises the minimum per-task SAR (to 1).
* The analysis sees the merge's own update: M equals the merged model minus the base.
* `isofast analyze CONFIG OUT` writes the JSON, the Markdown report and the PNG plots (the
  plots are skipped, with a reason, without matplotlib; JSON and Markdown never need it).
* Bad input fails as a merge fails: same exception and message, exit code 2 on the CLI.
* LoRA adapters are analysed as the dense updates they stand for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

import isofast
from isofast import cli
from isofast.analysis import plots, spectra
from isofast.analysis.summary import layer_of
from isofast.io import CheckpointWriter

SHARE = 0.9


# ----------------------------------------------------------------------------- reference


def reference_sar(d: np.ndarray, m: np.ndarray, share: float) -> tuple[float, int]:
    """SAR(D, M; k_M) and k_M in float64 with a plain thin SVD (docs/ALGORITHMS.md, 9)."""
    u, s, _ = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    energy = np.cumsum(s**2)
    k = int(np.argmax(energy >= share * energy[-1])) + 1
    projected = u[:, :k].T @ d.astype(np.float64)
    return float(np.linalg.norm(projected) / np.linalg.norm(d)), k


def sar_of(d: np.ndarray, m: np.ndarray, share: float) -> tuple[float, int]:
    """SAR and k_M as the analysis computes them."""
    spec = spectra.spectrum(m)
    k = spectra.energy_rank(spec.values, share)
    basis = spectra.left_basis(m, spec, k)
    return spectra.alignment(spectra.projected_squared_norm(basis, d), spectra.squared_norm(d)), k


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (40, 40)])
def test_sar_matches_float64_reference_on_random_matrices(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for trial in range(5):
        # A decaying spectrum, so k_M is well inside (0, r].
        m = rng.standard_normal(shape) * np.exp(-0.15 * np.arange(shape[1]))
        d = rng.standard_normal(shape) + 0.5 * m
        got, k = sar_of(d, m, SHARE)
        want, k_want = reference_sar(d, m, SHARE)
        assert k == k_want, (trial, k, k_want)
        assert got == pytest.approx(want, abs=1e-10), trial
        values = np.linalg.svd(m, compute_uv=False)
        np.testing.assert_allclose(spectra.spectrum(m).values, values, rtol=1e-8, atol=1e-10)


def test_sar_of_constructed_cases() -> None:
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    inside, outside = q[:, :3], q[:, 3:6]
    merged = inside @ np.diag([3.0, 2.0, 1.0]) @ rng.standard_normal((3, 25))
    assert sar_of(inside @ rng.standard_normal((3, 25)), merged, 1.0)[0] == pytest.approx(1.0)
    assert sar_of(outside @ rng.standard_normal((3, 25)), merged, 1.0)[0] == pytest.approx(
        0.0, abs=1e-7
    )
    half = inside[:, :1] @ rng.standard_normal((1, 25))
    mixed = half + outside[:, :1] * (np.linalg.norm(half) / np.sqrt(25)) @ np.ones((1, 25))
    assert sar_of(mixed, merged, 1.0)[0] == pytest.approx(math.sqrt(0.5), abs=1e-7)


def test_spectrum_measures() -> None:
    flat = spectra.shape_stats(np.full(8, 2.0), 0.95, 1e-6)
    assert (flat.rank, flat.energy_rank, flat.flatness) == (8, 8, pytest.approx(1.0))
    assert flat.effective_rank == pytest.approx(8.0) and flat.condition_number == 1.0
    spiked = spectra.shape_stats(np.array([100.0, 1.0, 1.0, 0.0]), 0.95, 1e-6)
    assert spiked.rank == 3 and spiked.energy_rank == 1 and spiked.condition_number == 100.0
    assert spiked.flatness < 0.5
    empty = spectra.shape_stats(np.zeros(4), 0.95, 1e-6)
    assert empty.rank == 0 and math.isnan(empty.flatness)
    assert math.isnan(spectra.alignment(0.0, 0.0))  # a task that left the key alone
    a, b = np.eye(6)[:, :2], np.eye(6)[:, 1:4]
    assert spectra.subspace_overlap(a, b) == pytest.approx(0.5)
    assert spectra.subspace_overlap(a, np.eye(6)[:, 2:]) == 0.0


def test_layer_names() -> None:
    assert layer_of("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert layer_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_of("embeddings.word_embeddings.weight") == "embeddings"


# ----------------------------------------------------------------------------- end to end


def random_models(
    seed: int = 0, tasks: int = 3, dtype: type = np.float32
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    shapes = {
        "blocks.0.attn.weight": (24, 24),
        "blocks.0.mlp.up.weight": (48, 24),
        "blocks.0.mlp.up.bias": (48,),
        "blocks.1.mlp.down.weight": (24, 48),
        "text_projection": (24, 8),
    }
    base = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    base["position_ids"] = np.arange(6, dtype=np.int64)
    fts = []
    for _ in range(tasks):
        ft = dict(base)
        for n, s in shapes.items():
            ft[n] = (base[n] + 0.1 * rng.standard_normal(s)).astype(dtype)
        fts.append(ft)
    return base, fts


def test_task_arithmetic_sar_matches_reference_end_to_end() -> None:
    base, fts = random_models(dtype=np.float64)
    data = isofast.analyze(
        base, fts, "task_arithmetic", energy_share=SHARE, compute_dtype="float64"
    )
    assert list(data["methods"]) == ["task_arithmetic"]
    assert [k["name"] for k in data["keys"]] == [
        "blocks.0.attn.weight",
        "blocks.0.mlp.up.weight",
        "blocks.1.mlp.down.weight",
    ]  # float 2-D keys outside the default exclude ("text_projection")
    for key in data["keys"]:
        deltas = [ft[key["name"]] - base[key["name"]] for ft in fts]
        merged = sum(deltas)
        want = [reference_sar(d, merged, SHARE) for d in deltas]
        entry = key["methods"]["task_arithmetic"]
        assert entry["energy_rank"] == want[0][1]
        np.testing.assert_allclose(entry["sar"], [w[0] for w in want], rtol=1e-5)
        np.testing.assert_allclose(
            entry["singular_values"], np.linalg.svd(merged, compute_uv=False), rtol=1e-5
        )


def dominated_models(dtype: type = np.float32) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Task 0 changes rows 0-1 ten times as strongly as task 1 changes rows 2-3 (orthogonal
    row spaces too): the task sum's spectrum is (10, 10, 1, 1), and task 1 lies in its weak
    directions."""
    rng = np.random.default_rng(7)
    base = {"layers.0.w": rng.standard_normal((16, 12)).astype(dtype)}
    right = np.linalg.qr(rng.standard_normal((12, 4)))[0]  # orthonormal columns
    d0, d1 = np.zeros((16, 12)), np.zeros((16, 12))
    d0[:2] = 10 * right[:, :2].T
    d1[2:4] = right[:, 2:].T
    return base, [{"layers.0.w": (base["layers.0.w"] + d).astype(dtype)} for d in (d0, d1)]


def test_iso_c_raises_the_minimum_task_sar_when_one_task_dominates() -> None:
    base, fts = dominated_models()
    data = isofast.analyze(base, fts, "iso_c", methods="task_arithmetic,iso_c", energy_share=0.95)
    ta, iso = data["summary"]["task_arithmetic"], data["summary"]["iso_c"]
    assert ta["least_aligned_task"] == "task1"
    assert ta["min_task_sar"] == pytest.approx(0.0, abs=1e-3)  # left behind
    assert iso["min_task_sar"] == pytest.approx(1.0, abs=1e-3)  # flat: every task kept
    assert iso["min_task_sar"] > ta["min_task_sar"]
    assert iso["mean_flatness"] == pytest.approx(1.0, abs=1e-6) and ta["mean_flatness"] < 0.9
    key = data["keys"][0]
    assert key["task_arithmetic_sum"]["energy_rank"] == 2
    assert key["methods"]["iso_c"]["energy_rank"] == 4
    assert key["norm_share"] == pytest.approx([10 / 11, 1 / 11], rel=1e-4)
    assert key["overlaps"][0][1] == pytest.approx(0.0, abs=1e-6)  # disjoint rows
    assert key["overlaps"][0][0] == pytest.approx(1.0)


def test_the_update_is_the_merges_own() -> None:
    base, fts = random_models(dtype=np.float64)
    from isofast.analysis.keys import task_matrices
    from isofast.analysis.updates import MethodUpdates
    from isofast.models import ModelSet

    for method in ("iso_cts", "ties", "dare_ties"):
        request = isofast.MergeRequest(base, tuple(fts), method, compute_dtype="float64")
        merged = isofast.merge(base, fts, method, compute_dtype="float64")
        with ModelSet(request) as models:
            source = MethodUpdates(request, method, {}, models)
            for name in ("blocks.0.attn.weight", "blocks.1.mlp.down.weight"):
                update = source.update(name, task_matrices(name, models, "float64"))
                np.testing.assert_allclose(update, merged[name] - base[name], atol=1e-13)


def test_several_methods_in_one_pass_agree_with_single_runs() -> None:
    base, fts = random_models()
    both = isofast.analyze(base, fts, methods=["iso_cts", "tsv_m"])
    alone = isofast.analyze(base, fts, "tsv_m", methods="tsv_m")
    assert list(both["methods"]) == ["iso_cts", "tsv_m"]
    assert [k["methods"]["tsv_m"]["sar"] for k in both["keys"]] == [
        k["methods"]["tsv_m"]["sar"] for k in alone["keys"]
    ]
    default = isofast.analyze(base, fts, "iso_cts", common_space_fraction=0.5)
    assert list(default["methods"]) == ["task_arithmetic", "iso_cts"]
    assert default["methods"]["iso_cts"]["parameters"]["common_space_fraction"] == 0.5


# ----------------------------------------------------------------------------- command line


def write_checkpoints(
    folder: Path, base: dict[str, np.ndarray], fts: Sequence[dict[str, np.ndarray]]
) -> Path:
    """base/ and ft0/, ft1/, ... as safetensors folders, and a config naming them."""
    for label, state in [("base", base)] + [(f"ft{i}", ft) for i, ft in enumerate(fts)]:
        with CheckpointWriter(folder / label) as w:
            for name, array in state.items():
                w.add(name, np.ascontiguousarray(array))
    config = folder / "merge.yml"
    config.write_text(
        yaml.safe_dump(
            {"base_model": "base", "models": [f"ft{i}" for i in range(len(fts))], "method": "iso_c"}
        )
    )
    return config


def test_cli_writes_json_markdown_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install 'isofast[plot]')")
    config = write_checkpoints(tmp_path, *dominated_models())
    out = tmp_path / "report"
    assert cli.main(["analyze", str(config), str(out), "--methods", "task_arithmetic,iso_c"]) == 0
    printed = capsys.readouterr().out
    assert "min task SAR" in printed and "iso_c" in printed and "SAR (subspace" in printed
    data = json.loads((out / "analysis.json").read_text())
    assert data["tasks"] == ["ft0", "ft1"]
    assert (
        data["summary"]["iso_c"]["min_task_sar"]
        > data["summary"]["task_arithmetic"]["min_task_sar"]
    )
    text = (out / "analysis.md").read_text()
    assert "| iso_c |" in text and "## SAR per layer" in text
    for name in plots.PLOT_NAMES:
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
        assert f"]({name})" in text


def test_reports_do_not_need_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(plots, "available", lambda: False)
    base, fts = random_models(tasks=2)
    isofast.analyze(base, fts, "iso_c", out=tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "analysis.json",
        "analysis.md",
    ]
    assert "matplotlib is not installed" in caplog.text


def test_bad_input_fails_as_a_merge_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, fts = random_models(tasks=2)
    config = write_checkpoints(tmp_path, base, fts)
    cases: list[tuple[str, dict]] = []
    fts_bad = [dict(fts[0]), fts[1]]
    fts_bad[0]["blocks.0.attn.weight"] = fts_bad[0]["blocks.0.attn.weight"][:, :20].copy()
    cases.append(("shape", {"base": base, "finetuned": fts_bad}))
    fts_nan = [fts[0], dict(fts[1])]
    fts_nan[1]["blocks.1.mlp.down.weight"] = fts[1]["blocks.1.mlp.down.weight"].copy()
    fts_nan[1]["blocks.1.mlp.down.weight"][3, 4] = np.nan
    cases.append(("nan", {"base": base, "finetuned": fts_nan}))
    cases.append(("missing", {"base": str(tmp_path / "base"), "finetuned": [tmp_path / "nope"]}))
    cases.append(("method", {"base": base, "finetuned": fts, "method": "iso_d"}))
    for what, kwargs in cases:
        with pytest.raises(isofast.IsofastError) as merging:
            isofast.merge(**kwargs)
        with pytest.raises(isofast.IsofastError) as analysing:
            isofast.analyze(**kwargs)
        assert type(analysing.value) is type(merging.value), what
        assert str(analysing.value) == str(merging.value), what

    # On disk: a NaN names the model's path and file, as the merge does.
    bad = dict(fts[1])
    bad["blocks.0.mlp.up.weight"] = bad["blocks.0.mlp.up.weight"].copy()
    bad["blocks.0.mlp.up.weight"][0, 0] = np.inf
    bad_config = write_checkpoints(tmp_path / "inf", base, [fts[0], bad])
    ft1 = tmp_path / "inf" / "ft1"
    code = cli.main(["analyze", str(bad_config), str(tmp_path / "r"), "-q"])
    merge_code = cli.main(["merge", str(bad_config), str(tmp_path / "m"), "-q"])
    err = capsys.readouterr().err.splitlines()
    assert code == merge_code == 2
    assert err[0].removeprefix("isofast analyze: ") == err[1].removeprefix("isofast merge: ")
    assert str(ft1) in err[0] and "NaN or Inf" in err[0]
    assert not (tmp_path / "r").exists()

    for args, message in [
        (["--methods", "iso_c,nope"], "unknown merge method 'nope'"),
        (["--energy-share", "0"], "energy_share must be in (0, 1]"),
        (["--include", "no_such_key"], "nothing to analyse"),
    ]:
        assert cli.main(["analyze", str(config), str(tmp_path / "r"), *args]) == 2
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- LoRA adapters


def lora_adapters(tasks: int = 3) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
    """PEFT-style LoRA adapters in memory (config + factors) on three modules, the last one
    touched by the first two adapters only; and their dense updates s * B A by weight name."""
    rng = np.random.default_rng(5)
    shapes = {"layers.0.q": (20, 12), "layers.0.v": (12, 12), "layers.1.down": (12, 28)}
    adapters, dense = [], []
    for t in range(tasks):
        weights, updates = {}, {}
        for module, (out_f, in_f) in shapes.items():
            if module == "layers.1.down" and t == tasks - 1:
                updates[f"{module}.weight"] = np.zeros((out_f, in_f))
                continue
            a = rng.standard_normal((4, in_f)).astype(np.float32)
            b = rng.standard_normal((out_f, 4)).astype(np.float32)
            weights[f"base_model.model.{module}.lora_A.weight"] = a
            weights[f"base_model.model.{module}.lora_B.weight"] = b
            updates[f"{module}.weight"] = 2.0 * b.astype(np.float64) @ a.astype(np.float64)
        adapters.append(
            {"config": {"peft_type": "LORA", "r": 4, "lora_alpha": 8}, "weights": weights}
        )
        dense.append(updates)
    return adapters, dense


def test_adapters_are_analysed_as_their_dense_updates() -> None:
    """The adapter merge (factored Iso-C / Iso-CTS, dense TIES, concatenated task arithmetic)
    gives the updates a merge of the dense task matrices gives, so the analyses agree; the
    third module, which one adapter leaves alone, exercises rank-deficient sums."""
    adapters, dense = lora_adapters()
    methods = "task_arithmetic,ties,iso_c,iso_cts"
    got = isofast.analyze(None, adapters=adapters, methods=methods, compute_dtype="float64")
    zeros = {n: np.zeros_like(d) for n, d in dense[0].items()}
    want = isofast.analyze(zeros, dense, methods=methods, compute_dtype="float64")
    by_name = {k["name"]: k for k in want["keys"]}
    assert sorted(by_name) == sorted(k["name"] for k in got["keys"])
    for key in got["keys"]:
        for m in methods.split(","):
            np.testing.assert_allclose(
                np.array(key["methods"][m]["sar"], dtype=float),  # None (undefined) -> NaN
                np.array(by_name[key["name"]]["methods"][m]["sar"], dtype=float),
                atol=1e-5,
                err_msg=f"{key['name']} {m}",
            )
    untouched = next(k for k in got["keys"] if k["name"] == "layers.1.down.weight")
    assert untouched["methods"]["iso_c"]["sar"][2] is None  # the last adapter left it alone
    assert got["summary"]["iso_c"]["mean_flatness"] == pytest.approx(1.0, abs=1e-5)
