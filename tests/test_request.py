"""One request, one plan, one entry point (issue 15).

* `MergeRequest` normalises what it is given (a single `exclude` string, relative paths,
  dtype spellings) and refuses bad settings before any file is opened.
* The config written beside a merge reproduces it bit for bit from any working directory,
  `allow_pickle` included.
* `isofast.merge` takes folders as well as state dicts, into memory or into a folder.
* A merge opens each checkpoint's headers once; the package's imports have no cycle and
  parsing a config does not load the compiled core; the settings are listed once.
* Importing from the source checkout fails with a message that says what to do.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import isofast
from isofast import cli
from isofast.config import load_config
from isofast.errors import MergeInputError
from isofast.io import CheckpointReader, CheckpointWriter
from isofast.io.safetensors_format import SafetensorsFile
from isofast.request import CONFIG_KEYS, RUN_ONLY_KEYS, SETTINGS, MergeRequest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "isofast"
StateDict = dict[str, torch.Tensor]

SHAPES = {
    "blocks.0.attn.weight": (24, 16),
    "blocks.0.mlp.weight": (32, 16),
    "blocks.0.norm.weight": (16,),
    "text_projection": (16, 12),
    "position_ids": (1, 6),
}


def make_models(rng: np.random.Generator, tasks: int = 3) -> tuple[StateDict, list[StateDict]]:
    base: StateDict = {}
    for name, shape in SHAPES.items():
        if name == "position_ids":
            base[name] = torch.arange(6).reshape(shape)
        else:
            base[name] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    fts = [
        {n: x + 0.05 * torch.randn_like(x) if x.is_floating_point() else x for n, x in base.items()}
        for _ in range(tasks)
    ]
    return base, fts


def save(folder: Path, model: StateDict, shard_bytes: int = 2000) -> Path:
    with CheckpointWriter(folder, shard_bytes) as w:
        for name, x in model.items():
            w.add(name, x.numpy())
    return folder


@pytest.fixture
def on_disk(tmp_path: Path) -> tuple[Path, StateDict, list[StateDict]]:
    torch.manual_seed(5)
    base, fts = make_models(np.random.default_rng(5))
    save(tmp_path / "models" / "base", base)
    for i, ft in enumerate(fts):
        save(tmp_path / "models" / f"ft{i}", ft)
    return tmp_path / "models", base, fts


def read(folder: Path) -> dict[str, np.ndarray]:
    with CheckpointReader(folder) as r:
        return {n: np.array(r.get(n)) for n in r.names()}


def assert_same_bits(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name


# ----------------------------------------------------------------------------- request


def test_a_single_exclude_string_is_one_pattern(tmp_path: Path) -> None:
    """Regression: `exclude: text_projection` used to become one pattern per letter, which
    took almost every matrix out of the matrix methods."""
    assert MergeRequest("b", ("m",), exclude="text_projection").exclude == ("text_projection",)
    base, fts = make_models(np.random.default_rng(0))
    as_string = isofast.merge(base, fts, "iso_c", exclude="text_projection")
    as_tuple = isofast.merge(base, fts, "iso_c", exclude=("text_projection",))
    assert_same_bits(as_string, as_tuple)
    # ... and the plan gives the 2-D keys the matrix treatment
    plan = isofast.plan(base, fts, "iso_c", exclude="text_projection")
    treatments = {t.name: t.treatment for t in plan.tensors}
    assert treatments["blocks.0.attn.weight"] == "matrix"
    assert treatments["text_projection"] == "mean"
    cfg = tmp_path / "c.yml"
    cfg.write_text("base_model: b\nmodels: [m]\nexclude: text_projection\n")
    assert load_config(cfg).exclude == ("text_projection",)


def test_excluding_every_matrix_warns() -> None:
    base, fts = make_models(np.random.default_rng(2))
    with pytest.warns(isofast.MergeWarning, match="none is merged as a matrix"):
        isofast.merge(base, fts, "iso_c", exclude=("weight", "text_projection"))


def test_request_normalises_and_refuses_bad_settings(tmp_path: Path) -> None:
    r = MergeRequest(
        "rel/base", ["rel/ft"], out_dtype="bf16", device="cuda", max_shard_bytes="1MiB"
    )
    assert r.base == str(Path.cwd() / "rel/base") and r.models == (str(Path.cwd() / "rel/ft"),)
    assert (r.out_dtype, r.device, r.max_shard_bytes) == ("bfloat16", "cuda:0", 2**20)
    bad: list[dict[str, Any]] = [
        {"method": "nope"},
        {"alpha": "x"},
        {"alpha": float("inf")},
        {"params": {"density": 0.5}},  # not a parameter of iso_cts
        {"compute_dtype": "float16"},
        {"out_dtype": "int8"},
        {"exclude": [1]},
        {"threads": 0},
        {"seed": 1.5},
        {"device": "tpu"},
        {"max_shard_bytes": "lots"},
        {"allow_pickle": "yes"},
    ]
    for settings in bad:
        with pytest.raises(MergeInputError):
            MergeRequest("b", ("m",), **settings)
    with pytest.raises(MergeInputError, match="need at least one"):
        MergeRequest("b", ())


def test_the_settings_are_listed_once() -> None:
    """The config keys, the command-line flags and the written config all come from SETTINGS,
    which names every field of MergeRequest exactly once."""
    fields = [f.name for f in dataclasses.fields(MergeRequest)]
    assert sorted(s.field for s in SETTINGS) == sorted(fields)
    # How a merge runs (the executor) is not written: the output is the same either way.
    written = set(MergeRequest("b", ("m",)).to_config())
    assert set(CONFIG_KEYS) - set(RUN_ONLY_KEYS) == written
    parser = cli.build_parser()
    merge = next(a for a in parser._actions if a.dest == "command").choices["merge"]  # type: ignore[union-attr]
    flags = {o for a in merge._actions for o in a.option_strings}
    assert {s.flag for s in SETTINGS} <= flags


# ----------------------------------------------------------------------------- written config


def test_written_config_reproduces_the_merge_from_another_folder(
    on_disk: tuple[Path, StateDict, list[StateDict]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: the written config kept relative paths as typed (so a re-run resolved them
    against the output folder) and left out allow_pickle."""
    root, _, _ = on_disk
    monkeypatch.chdir(root)
    argv = ["merge", str(tmp_path / "first"), "--base", "base", "--model", "ft0"]
    argv += ["--model", "ft1", "--method", "dare_ties", "--seed", "7", "--allow-pickle", "-q"]
    assert cli.main(argv) == 0
    written = yaml.safe_load((tmp_path / "first" / "isofast_config.yml").read_text())
    assert written["base_model"] == str(root / "base")
    assert written["allow_pickle"] is True
    assert written["parameters"]["drop_rate"] == 0.5  # defaults spelled out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = tmp_path / "first" / "isofast_config.yml"
    assert cli.main(["merge", str(config), "second", "-q"]) == 0
    assert_same_bits(read(elsewhere / "second"), read(tmp_path / "first"))
    assert load_config(config).allow_pickle is True


# ----------------------------------------------------------------------------- entry point


def test_merge_takes_folders_into_memory_and_into_folders(
    on_disk: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    root, base, fts = on_disk
    want = isofast.merge(base, fts, "iso_cts", 0.9, threads=2)
    folders = [root / f"ft{i}" for i in range(3)]
    got = isofast.merge(root / "base", folders, "iso_cts", 0.9, threads=2)
    assert all(isinstance(x, torch.Tensor) for x in got.values())
    assert_same_bits(
        {n: x.numpy() for n, x in got.items()}, {n: x.numpy() for n, x in want.items()}
    )
    out = isofast.merge(str(root / "base"), folders, "iso_cts", 0.9, threads=2, out=tmp_path / "o")
    assert out == tmp_path / "o"
    assert_same_bits(read(out), {n: x.numpy() for n, x in want.items()})
    # state dicts in memory into a folder: same bits; no config (it could not reproduce them)
    out = isofast.merge(base, fts, "iso_cts", 0.9, threads=2, out=tmp_path / "m")
    assert_same_bits(read(out), {n: x.numpy() for n, x in want.items()})
    assert not (out / "isofast_config.yml").exists()
    assert "(in memory)" in (out / "README.md").read_text()


def test_a_single_model_instead_of_a_list_is_refused() -> None:
    base, fts = make_models(np.random.default_rng(1))
    with pytest.raises(MergeInputError, match="list"):
        isofast.merge(base, fts[0], "iso_c")  # type: ignore[arg-type]


def test_headers_are_opened_once_per_merge(
    on_disk: tuple[Path, StateDict, list[StateDict]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`isofast merge` (plan, then merge) parses every safetensors header exactly once."""
    root, _, _ = on_disk
    opened: list[str] = []
    real_init = SafetensorsFile.__init__

    def counting(self: SafetensorsFile, path: Any, *args: Any, **kwargs: Any) -> None:
        opened.append(str(path))
        real_init(self, path, *args, **kwargs)

    monkeypatch.setattr(SafetensorsFile, "__init__", counting)
    argv = ["merge", str(tmp_path / "out"), "--base", str(root / "base"), "-q"]
    for i in range(3):
        argv += ["--model", str(root / f"ft{i}")]
    assert cli.main([*argv, "--method", "ties"]) == 0  # global TIES: three passes over data
    shard_files = sorted(str(p) for p in root.glob("*/*.safetensors"))
    assert len(shard_files) > 4, "the fixture should be sharded"
    assert sorted(opened) == shard_files


# ----------------------------------------------------------------------------- structure


def _imports_of(path: Path) -> set[str]:
    """isofast modules imported at module level (not inside functions or TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "isofast":
                found |= {f"isofast.{a.name}" for a in node.names}
            elif node.module.startswith("isofast."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("isofast.")}
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle() -> None:
    graph = {_module_name(p): _imports_of(p) for p in PACKAGE.rglob("*.py")}
    known = set(graph)
    # A package's import of its own submodules (isofast.io re-exporting) is not a cycle.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if d in known and not d.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep] if dep in path else [node, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_reading_a_config_does_not_load_the_core(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text("base_model: b\nmodels: [m]\nmethod: ties\nparameters: {density: 0.3}\n")
    code = (
        "import sys; from isofast.config import load_config; "
        f"r = load_config({str(cfg)!r}); "
        "assert r.method == 'ties'; "
        "loaded = [m for m in ('isofast._core', 'isofast.pipeline', 'torch') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr


def test_importing_from_the_checkout_says_what_to_do() -> None:
    """In the repository root Python finds the source folder first; it has no compiled core
    unless built in place. The error says so, instead of a bare ImportError."""
    if list(PACKAGE.glob("_core*.so")) or list(PACKAGE.glob("_core*.pyd")):
        pytest.skip("the core is built in place in this checkout")
    if Path(isofast.__file__).resolve().parent == PACKAGE:
        pytest.skip("an editable install: the checkout is the installed package")
    code = "import isofast; isofast.merge"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # conftest sets it
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert result.returncode != 0
    assert "source checkout" in result.stderr and "another folder" in result.stderr


# ----------------------------------------------------------------------------- logging


def test_library_messages_go_to_the_isofast_logger(
    on_disk: tuple[Path, StateDict, list[StateDict]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, _, _ = on_disk
    with caplog.at_level(logging.INFO, logger="isofast"):
        isofast.merge(root / "base", [root / "ft0", root / "ft1"], "iso_cts", out=tmp_path / "o")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("isofast")]
    assert any(m.startswith("plan: iso_cts") for m in messages), messages
    assert any(m.startswith("core routes: iso_cts") for m in messages), messages


def test_cli_verbosity(
    on_disk: tuple[Path, StateDict, list[StateDict]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, _, _ = on_disk
    models = ["--base", str(root / "base"), "--model", str(root / "ft0"), "--method", "iso_c"]
    assert cli.main(["merge", str(tmp_path / "a"), *models, "-v"]) == 0
    err = capsys.readouterr().err
    assert "isofast: plan: iso_c" in err and "isofast: core routes" in err
    assert cli.main(["merge", str(tmp_path / "b"), *models, "-q"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""


_BOMB = b"".join(
    b"%s: &%s [%s]\n" % (name, name, b",".join([b"*" + prev if prev else b"x"] * 9))
    for prev, name in zip(
        [b"", *[bytes([c]) for c in b"abcdefgh"]], [bytes([c]) for c in b"abcdefghi"], strict=True
    )
)  # nine levels of nine references: tiny in memory, 9^9 entries if ever spelled out


@pytest.mark.parametrize(
    "text",
    [
        b"base_model: b\nmodels: [m]\nmethod: ties\nparameters:\n  d\xefnsity: 0.5\n",  # not UTF-8
        b"2001-13-45",
        b"!!int ",
        b"{" * 2000,
        b"merge_method: linear\nmodels: ./ft0\n",  # a string is not a list of models
        b"merge_method: ties\nbase_model: ./base\nmodels: [a]\nparameters: [false, -7e16]\n",
        b"merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1"
        + b"0" * 400
        + b"}}]\n",
        b"base_model: b\nmodels: [m]\nparameters: {rank: x, 1: null}\n",
        b"base_model: b\nmodels: [m]\n1: 2\n",
        b"base_model: b\nmodels: [m]\nout_shard_size: " + b"9" * 400 + b"GB\n",
        b"base_model: b\nmodels: [m]\nalpha: 1" + b"0" * 400 + b"\n",
        _BOMB + b"merge_method: linear\nmodels: [*i]\n",
        _BOMB + b"base_model: b\nmodels: [m]\nexclude: [*i]\n",
    ],
    ids=lambda text: text[:24].decode("utf-8", "replace"),
)
def test_malformed_configs_are_refused_quickly(tmp_path: Path, text: bytes) -> None:
    """Regressions from fuzzing: each once escaped as a foreign exception or hung."""
    cfg = tmp_path / "config.yml"
    cfg.write_bytes(text)
    with pytest.raises(MergeInputError, match=r"config\.yml"):
        load_config(cfg)


def test_a_device_that_cannot_run_fails_at_once() -> None:
    """device="cuda" on a machine or build without the GPU backend: BackendUnavailable with
    the reason, for state dicts as for checkpoints, before any work."""
    try:
        from isofast import _cuda  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("this build has the CUDA backend")
    base, fts = make_models(np.random.default_rng(3))
    for method in ("iso_c", "iso_cts", "tsv_m"):
        with pytest.raises(isofast.BackendUnavailable, match="CUDA backend"):
            isofast.merge(base, fts, method, device="cuda")
    # Elementwise methods accept a CUDA device too (they run on the CPU), but the device is
    # still checked first.
    with pytest.raises(isofast.BackendUnavailable, match="CUDA backend"):
        isofast.plan(base, fts, "ties", device="cuda:1")
