"""Model names of the Hugging Face Hub (`org/name`, `org/name@rev`) resolved from the local
cache (issue 13, item 4). Never touches the network: HF_HUB_OFFLINE=1 and HF_HUB_CACHE points
at a cache each test lays out itself (refs/, snapshots/<hash>/ with real safetensors files,
linked into blobs/ as the hub does)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

from isofast import cli, hub
from isofast.config import load_config
from isofast.errors import MergeInputError
from isofast.request import MergeRequest

SHAPES = {"model.embed_tokens.weight": (16, 8), "model.layers.0.mlp.weight": (8, 8)}


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _lay_out(cache: Path, repo: str, tensors: Mapping[str, np.ndarray], ref: str = "main") -> str:
    """One cached snapshot of `repo` as huggingface_hub stores it; returns its commit hash."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    staged = folder / "staged.safetensors"
    save_file(dict(tensors), str(staged))
    config = json.dumps({"model_type": "llama", "num_hidden_layers": 1}).encode()
    for name, data in (("model.safetensors", staged.read_bytes()), ("config.json", config)):
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    staged.unlink()
    (folder / "refs").mkdir()
    (folder / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_hub_name_form() -> None:
    for name in ("org/name", "meta-llama/Llama-3.1-8B", "org/name@main", "o/n@v1.0", "a/b@abc/d"):
        assert hub.is_hub_name(name), name
    for name in ("./base", "/abs/path", "name", "a/b/c", "../x/y", "org/name+lora/x", "a/.."):
        assert not hub.is_hub_name(name), name


def test_names_resolve_from_the_cache(cache: Path, tmp_path: Path) -> None:
    commit = _lay_out(cache, "org/base", _model(0))
    _lay_out(cache, "org/tuned", _model(1), ref="v1")
    snapshot = str(cache / "models--org--base" / "snapshots" / commit)
    assert hub.resolve("org/base") == snapshot
    assert hub.resolve("org/base@main") == snapshot
    assert hub.resolve(f"org/base@{commit}") == snapshot
    assert hub.resolve("org/tuned@v1").endswith(hashlib.sha1(b"org/tuned").hexdigest())
    # CLI flags and keyword arguments go through the same resolution
    request = MergeRequest(base="org/base", models=("org/tuned@v1",), method="task_arithmetic")
    assert request.base == snapshot
    assert Path(request.models[0], "model.safetensors").is_file()


def test_a_local_path_wins_over_a_hub_name(cache: Path, tmp_path: Path) -> None:
    _lay_out(cache, "org/base", _model(0))
    (tmp_path / "org" / "base").mkdir(parents=True)
    assert hub.local_model("org/base", tmp_path) == str(tmp_path / "org" / "base")


def test_missing_name_offline_says_what_was_tried(cache: Path, tmp_path: Path) -> None:
    _lay_out(cache, "org/base", _model(0))
    for name in ("org/absent", "org/base@nobranch"):
        with pytest.raises(MergeInputError) as info:
            hub.local_model(name, tmp_path)
        message = str(info.value)
        assert name in message and str(cache) in message, message
        assert "HF_HUB_OFFLINE" in message and "download" in message, message
        assert "\n" not in message


def test_without_huggingface_hub_the_error_names_the_extra(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(MergeInputError, match=r"org/base.*isofast\[hub\]"):
        hub.local_model("org/base", tmp_path)
    # local folders never need it
    (tmp_path / "local").mkdir()
    assert hub.local_model("local", tmp_path) == str(tmp_path / "local")


def _read(folder: Path) -> dict[str, Any]:
    return load_file(str(folder / "model.safetensors"))


def test_mergekit_config_with_hub_names_merges_and_reproduces(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, fts = _model(0), [_model(1), _model(2)]
    commit = _lay_out(cache, "org/base", base)
    _lay_out(cache, "org/ft0", fts[0])
    _lay_out(cache, "org/ft1", fts[1], ref="v2")
    cfg = tmp_path / "merge.yml"
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "models": [
            {"model": "org/base"},  # the base listed among the models, as mergekit's examples
            {"model": "org/ft0", "parameters": {"weight": 0.5}},
            {"model": "org/ft1@v2", "parameters": {"weight": 0.25}},
        ],
        "dtype": "float32",
    }
    cfg.write_text(yaml.safe_dump(config))
    request = load_config(cfg)
    assert request.base == str(cache / "models--org--base" / "snapshots" / commit)
    assert len(request.models) == 2
    out = tmp_path / "out"
    assert cli.main(["merge", str(cfg), str(out), "-q", "--threads", "1"]) == 0, capsys
    got = _read(out)
    for name, b in base.items():
        want = b + 0.5 * (fts[0][name] - b) + 0.25 * (fts[1][name] - b)
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-6)
    # the base's side files come from the snapshot (links into blobs/)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    # the written config names the snapshots and reproduces the merge bit for bit
    written = yaml.safe_load((out / "isofast_config.yml").read_text())
    assert written["base_model"] == request.base
    again = tmp_path / "again"
    assert cli.main(["merge", str(out / "isofast_config.yml"), str(again), "-q"]) == 0
    for name, x in _read(again).items():
        assert x.tobytes() == got[name].tobytes(), name


def test_cli_flags_take_hub_names(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _lay_out(cache, "org/base", _model(0))
    _lay_out(cache, "org/ft0", _model(1))
    out = tmp_path / "out"
    argv = ["merge", str(out), "--base", "org/base", "--model", "org/ft0", "-q"]
    assert cli.main([*argv, "--method", "task_arithmetic", "--threads", "1"]) == 0
    assert set(_read(out)) == set(SHAPES)
    rc = cli.main(["plan", "--base", "org/base", "--model", "org/missing"])
    err = capsys.readouterr().err
    assert rc == 2 and "org/missing" in err and str(cache) in err, err
