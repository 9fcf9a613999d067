"""Merges into a folder (`isofast.merge(..., out=...)`, `isofast merge`).

What is published (tensors, metadata, model card, reproducing config, side files), the
progress callback, torch `.bin` inputs, alpha = 0, and that a merge that fails or is killed
midway never publishes anything under the final name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

import isofast
from isofast import cli
from isofast._native import core
from isofast.api import run
from isofast.config import load_config
from isofast.errors import MergeInputError
from isofast.io import INDEX_NAME, SINGLE_NAME, CheckpointWriter
from isofast.request import MergeRequest

from conftest import fresh_seed

METHODS = tuple(isofast.methods())
THREADS = 2
StateDict = dict[str, torch.Tensor]

SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (64, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.self_attn.o_proj.weight": (32, 32),
    "model.layers.0.mlp.up_proj.weight": (80, 32),
    "model.layers.0.mlp.down_proj.weight": (32, 80),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.norm.weight": (32,),
    "vision.conv.weight": (16, 3, 2, 2),
}


def make(seed: int, dtype: torch.dtype, tasks: int = 3) -> tuple[StateDict, list[StateDict]]:
    gen = torch.Generator().manual_seed(seed % 2**63)
    base = {n: (0.3 * torch.randn(s, generator=gen)).to(dtype) for n, s in SHAPES.items()}
    base["model.position_ids"] = torch.arange(16)
    fts = []
    for _ in range(tasks):
        fts.append(
            {
                n: (t.float() + 0.02 * torch.randn(t.shape, generator=gen)).to(dtype)
                if t.is_floating_point()
                else t.clone()
                for n, t in base.items()
            }
        )
    return base, fts


def save(state: Mapping[str, torch.Tensor], folder: Path, max_shard_bytes: int = 2**30) -> Path:
    with CheckpointWriter(folder, max_shard_bytes) as w:
        for name, t in state.items():
            if t.dtype == torch.bfloat16:
                w.add(name, t.contiguous().view(torch.int16).numpy().view(np.uint16), "BF16")
            else:
                w.add(name, t.contiguous().numpy())
    return folder


def load(folder: Path) -> StateDict:
    index = folder / INDEX_NAME
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [SINGLE_NAME]
    )
    out: StateDict = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118
                out[k] = st.get_tensor(k)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.itemsize]
    return t.contiguous().view(view) if t.is_floating_point() else t


def assert_same_bits(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for n, w in want.items():
        assert got[n].dtype == w.dtype, n
        assert torch.equal(bits(got[n]), bits(w)), n


def weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def bf16_models(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, StateDict, list[StateDict]]:
    root = tmp_path_factory.mktemp("pipe")
    base, fts = make(fresh_seed(), torch.bfloat16)
    save(base, root / "base", 5000)
    for i, ft in enumerate(fts):
        save(ft, root / f"ft{i}")
    side = {
        "config.json": '{"model_type": "llama", "hidden_size": 32}\n',
        "generation_config.json": "{}\n",
        "tokenizer_config.json": '{"model_max_length": 16}\n',
        "tokenizer.json": '{"version": "1.0"}\n',
        "special_tokens_map.json": "{}\n",
        "notes.txt": "not a side file\n",
        "training_args.bin": "weights-like, never copied\n",
        "optimizer.pt": "weights-like, never copied\n",
    }
    for name, text in side.items():
        (root / "base" / name).write_text(text)
    return root, base, fts


def request_for(root: Path, method: str = "iso_cts", **kw: Any) -> MergeRequest:
    return MergeRequest(
        base=str(root / "base"),
        models=tuple(str(root / f"ft{i}") for i in range(3)),
        method=method,
        threads=THREADS,
        **kw,
    )


# ----------------------------------------------------------------------------- outputs


def test_published_folder(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    root, base, fts = bf16_models
    req = request_for(root, "ties", alpha=0.7, params={"density": 0.3}, max_shard_bytes=3000)
    out = run(req, tmp_path / "out")
    assert out == tmp_path / "out"
    assert_same_bits(load(out), isofast.merge(base, fts, "ties", 0.7, threads=THREADS, density=0.3))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= names
    assert {"tokenizer.json", "special_tokens_map.json", "README.md"} <= names
    assert {"isofast_config.yml", INDEX_NAME} <= names
    assert not names & {"notes.txt", "training_args.bin", "optimizer.pt", SINGLE_NAME}
    assert (out / "config.json").read_text() == (root / "base" / "config.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "temporary folder left behind"
    # safetensors metadata
    shard = sorted(out.glob("model-*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["isofast_method"] == "ties"
    assert float(meta["isofast_alpha"]) == 0.7
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["isofast_method"] == "ties"
    # model card front matter
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == [req.base, *req.models]
    assert front["tags"] == ["merge", "isofast"]
    assert front["merge_method"] == "ties"
    assert front["merge_parameters"]["alpha"] == 0.7
    assert front["merge_parameters"]["density"] == 0.3


def test_written_config_reproduces_the_merge_byte_for_byte(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    root, _, _ = bf16_models
    req = request_for(
        root,
        "dare_ties",
        alpha=0.9,
        params={"drop_rate": 0.4, "density": 0.5},
        seed=1234,
        max_shard_bytes=4000,
    )
    first = run(req, tmp_path / "first")
    again = load_config(first / "isofast_config.yml")
    assert again.method == req.method
    assert again.alpha == req.alpha
    assert again.method_params == req.method_params
    assert again.seed == req.seed
    assert again.threads == req.threads
    assert again.max_shard_bytes == req.max_shard_bytes
    second = run(again, tmp_path / "second")
    assert weight_bytes(first) == weight_bytes(second)
    assert (first / INDEX_NAME).read_text() == (second / INDEX_NAME).read_text()
    # and through the command line, relative to another working directory
    assert (
        cli.main(["merge", str(first / "isofast_config.yml"), str(tmp_path / "third"), "-q"]) == 0
    )
    assert weight_bytes(first) == weight_bytes(tmp_path / "third")


@pytest.mark.parametrize("method", METHODS)
def test_alpha_zero_is_the_base_model(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path, method: str
) -> None:
    root, base, _ = bf16_models
    out = run(request_for(root, method, alpha=0.0), tmp_path / "out")
    assert_same_bits(load(out), base)


def test_out_dtype_and_float64_compute(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    root, base, fts = bf16_models
    req = request_for(root, "tsv_m", out_dtype="float32", compute_dtype="float64")
    got = load(run(req, tmp_path / "out"))
    want = isofast.merge(
        base, fts, "tsv_m", out_dtype="float32", compute_dtype="float64", threads=THREADS
    )
    assert_same_bits(got, want)
    assert got["model.norm.weight"].dtype == torch.float32
    assert got["model.position_ids"].dtype == torch.int64


def test_single_file_paths(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    """Models given as .safetensors files; side files come from the base file's folder."""
    _, base, fts = bf16_models
    flat = tmp_path / "flat"
    flat.mkdir()
    save(base, flat / "b")
    os.rename(flat / "b" / SINGLE_NAME, flat / "base.safetensors")
    (flat / "config.json").write_text("{}\n")
    paths = []
    for i, ft in enumerate(fts):
        save(ft, flat / f"f{i}")
        paths.append(str(flat / f"f{i}" / SINGLE_NAME))
    req = MergeRequest(str(flat / "base.safetensors"), tuple(paths), "iso_c", threads=THREADS)
    out = run(req, tmp_path / "out")
    assert_same_bits(load(out), isofast.merge(base, fts, "iso_c", threads=THREADS))
    assert (out / "config.json").exists()


def test_torch_bin_inputs(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    _, base, fts = bf16_models
    torch.save(base, tmp_path / "base.bin")
    for i, ft in enumerate(fts):
        (tmp_path / f"ft{i}").mkdir()
        torch.save(ft, tmp_path / f"ft{i}" / "pytorch_model.bin")
    req = MergeRequest(
        str(tmp_path / "base.bin"),
        tuple(str(tmp_path / f"ft{i}") for i in range(3)),
        "consensus",
        threads=THREADS,
    )
    got = load(run(req, tmp_path / "out"))
    assert_same_bits(got, isofast.merge(base, fts, "consensus", threads=THREADS))


def test_progress_reports_every_tensor_once(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    root, base, _ = bf16_models
    seen: list[tuple[str, int]] = []
    run(
        request_for(root, "weight_average"),
        tmp_path / "out",
        progress=lambda name, n: seen.append((name, n)),
    )
    assert sorted(n for n, _ in seen) == sorted(base)
    for name, nbytes in seen:
        assert nbytes == 4 * base[name].numel() * base[name].itemsize, name


def test_existing_output_needs_overwrite(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    root, base, _ = bf16_models
    out = tmp_path / "out"
    run(request_for(root, "task_arithmetic", alpha=0.0), out)
    with pytest.raises(FileExistsError):
        run(request_for(root, "iso_c"), out)
    assert_same_bits(load(out), base)
    run(request_for(root, "iso_c", alpha=0.0), out, overwrite=True)
    assert_same_bits(load(out), base)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_bad_request_fails_before_creating_anything(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    """A bad setting is refused when the request is made; a bad model when it is opened."""
    root, _, _ = bf16_models
    for make in (
        lambda: request_for(root, "nope"),
        lambda: request_for(root, "ties", params={"density": 2.0}),
        lambda: request_for(root, "ties", alpha=float("nan")),
        lambda: request_for(root, compute_dtype="float16"),
        lambda: MergeRequest(str(root / "base"), ()),
    ):
        with pytest.raises(MergeInputError):
            run(make(), tmp_path / "out")
    with pytest.raises(MergeInputError, match="missing"):
        run(MergeRequest(str(root / "base"), (str(root / "missing"),)), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_publishes_nothing(
    bf16_models: tuple[Path, StateDict, list[StateDict]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error after some tensors were written aborts: no output, no temporary folder."""
    root, _, _ = bf16_models
    real = core.merge_items
    calls = 0

    def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "merge_items", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(request_for(root, "iso_cts", max_shard_bytes=3000), tmp_path / "out")
    assert calls in (4, 5)  # the batch queued behind the failing one may still have run
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_the_cli_publishes_nothing(
    bf16_models: tuple[Path, StateDict, list[StateDict]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, _, _ = bf16_models

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    real = core.merge_items
    monkeypatch.setattr(core, "merge_items", interrupted)
    argv = ["merge", str(tmp_path / "out"), "--base", str(root / "base")]
    argv += ["--model", str(root / "ft0"), "--method", "ties", "-q"]
    assert cli.main(argv) == 130
    assert "no output folder was published; rerun with --resume" in capsys.readouterr().err
    kept = [p.name for p in tmp_path.iterdir()]
    assert len(kept) == 1 and kept[0].startswith(".out.isofast-tmp-"), kept
    monkeypatch.setattr(core, "merge_items", real)
    assert cli.main([*argv, "--resume"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ----------------------------------------------------------------------------- SIGKILL

_KILLED_SCRIPT = """
import pathlib, sys, time
from isofast.api import run
from isofast.request import MergeRequest

root, out, marker = sys.argv[1:4]
calls = 0

def progress(name, nbytes):
    global calls
    calls += 1
    if calls == 4:  # three tensors are in the shard files by now
        pathlib.Path(marker).write_text(name)
        time.sleep(600)

req = MergeRequest(root + "/base", tuple(f"{root}/ft{i}" for i in range(3)), "task_arithmetic",
                   max_shard_bytes=3000, threads=1)
run(req, out, progress=progress)
"""


def test_sigkill_while_writing_publishes_nothing(
    bf16_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    """Deterministic variant of the CLI test: the merge is held inside its progress callback
    after three tensors were written, then killed."""
    root, _, _ = bf16_models
    marker = tmp_path / "marker"
    out = tmp_path / "out"
    script = textwrap.dedent(_KILLED_SCRIPT)
    proc = subprocess.Popen([sys.executable, "-c", script, str(root), str(out), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists(), f"merge exited ({proc.poll()}) or hung before writing"
        tmps = sorted(tmp_path.glob(".out.isofast-tmp-*"))
        assert len(tmps) == 1
        assert any(p.stat().st_size > 0 for p in tmps[0].iterdir()), "nothing written yet"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    names = {p.name for p in tmps[0].iterdir()}
    assert INDEX_NAME not in names and SINGLE_NAME not in names, names
    assert all(n.endswith(".partial") for n in names - {"isofast-journal.jsonl"}), names
