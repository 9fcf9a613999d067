"""The `isofast` command line on checkpoints on disk (issue 3).

* Round trip: `isofast merge` on safetensors checkpoints gives bit for bit the tensors of
  `isofast.merge` on the same state dicts in memory, for every method, bf16 and fp32, single
  file and sharded inputs, single file and sharded outputs (same `threads` in both). The
  output is read back with the `safetensors` library.
* `isofast plan` rejects a typo'd model path, a missing tensor, a shape mismatch, an unknown
  method (and more) in well under a second with a message naming the problem, without
  reading any tensor data (the data accessors are patched to fail).
* A merge killed with SIGKILL midway never leaves a folder under the final name.
* mergekit configs for linear, task_arithmetic, ties, dare_ties and dare_linear load and merge.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

import isofast
from isofast import cli
from isofast.config import load_config
from isofast.io import INDEX_NAME, SINGLE_NAME, CheckpointReader, CheckpointWriter
from isofast.io.safetensors_format import SafetensorsFile
from isofast.io.torch_format import TorchFile

from conftest import fresh_seed

ROOT = Path(__file__).resolve().parent.parent
METHODS = (
    "weight_average",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "consensus",
    "tsv_m",
    "iso_c",
    "iso_cts",
)
THREADS = 2
ALPHA = 0.8
TASKS = 3

# Several keys of one shape (the in-memory merge batches them side by side, the disk merge
# takes them one at a time), tall / wide / square 2-D keys, an excluded 2-D key, 1-D, 4-D
# and integer tensors.
SPEC: dict[str, tuple[tuple[int, ...], str]] = {
    "embed.weight": ((40, 24), "float"),
    "layers.0.attn.q.weight": ((24, 24), "float"),
    "layers.0.attn.k.weight": ((24, 24), "float"),
    "layers.0.mlp.up.weight": ((48, 24), "float"),
    "layers.0.mlp.up.bias": ((48,), "float"),
    "layers.0.mlp.down.weight": ((24, 48), "float"),
    "layers.0.norm.weight": ((24,), "float"),
    "layers.1.attn.q.weight": ((24, 24), "float"),
    "layers.1.attn.k.weight": ((24, 24), "float"),
    "layers.1.mlp.up.weight": ((48, 24), "float"),
    "layers.1.mlp.up.bias": ((48,), "float"),
    "layers.1.mlp.down.weight": ((24, 48), "float"),
    "layers.1.norm.weight": ((24,), "float"),
    "patch.conv.weight": ((8, 3, 2, 2), "float"),
    "text_projection": ((24, 16), "float"),
    "position_ids": ((1, 12), "int64"),
}

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- helpers


def make_state_dicts(
    seed: int, dtype: torch.dtype, tasks: int = TASKS
) -> tuple[StateDict, list[StateDict]]:
    gen = torch.Generator().manual_seed(seed)
    base: StateDict = {}
    for name, (shape, kind) in SPEC.items():
        if kind == "int64":
            base[name] = torch.arange(int(np.prod(shape))).reshape(shape)
        else:
            base[name] = (0.5 * torch.randn(shape, generator=gen)).to(dtype)
    fts = []
    for _ in range(tasks):
        ft: StateDict = {}
        for name, t in base.items():
            if t.is_floating_point():
                noise = 0.05 * torch.randn(t.shape, generator=gen)
                ft[name] = (t.float() + noise).to(dtype)
            else:
                ft[name] = t + 1000  # a merge must copy the base's integer tensors
        fts.append(ft)
    return base, fts


def raw(t: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """What CheckpointWriter.add takes: bf16 as raw uint16 bits plus 'BF16'."""
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16), "BF16"
    return t.contiguous().numpy(), None


def save(state: Mapping[str, torch.Tensor], folder: Path, max_shard_bytes: int = 2**30) -> Path:
    with CheckpointWriter(folder, max_shard_bytes) as w:
        for name, t in state.items():
            arr, dtype = raw(t)
            w.add(name, arr, dtype)
    return folder


def read_output(folder: Path) -> StateDict:
    """Every tensor of a merged folder, read with the safetensors library (via the index)."""
    index = folder / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [SINGLE_NAME]
    out: StateDict = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            assert f.metadata().get("format") == "pt", f"{name}: no format=pt metadata"
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert key not in out, f"{key} in two shards"
                out[key] = f.get_tensor(key)
    return out


_INT_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def assert_bitwise_equal(
    got: Mapping[str, torch.Tensor], want: Mapping[str, Any], ctx: str
) -> None:
    assert list(got) == list(want) or set(got) == set(want), (
        f"names differ: {sorted(set(got) ^ set(want))} ({ctx})"
    )
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype} ({ctx})"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)} ({ctx})"
        view = _INT_VIEW.get(w.dtype)
        gb, wb = (g, w) if view is None else (g.view(view), w.contiguous().view(view))
        if not torch.equal(gb, wb):
            n = int((gb != wb).sum())
            raise AssertionError(f"{name}: {n} of {w.numel()} elements differ in bits ({ctx})")


def model_args(base: Path | str, models: Sequence[Path | str]) -> list[str]:
    args = ["--base", str(base)]
    for m in models:
        args += ["--model", str(m)]
    return args


def param_args(params: Mapping[str, Any]) -> list[str]:
    out = []
    for k, v in params.items():
        out += ["--param", f"{k}={v}"]
    return out


# ----------------------------------------------------------------------------- inputs on disk


@dataclass(frozen=True)
class Inputs:
    seed: int
    base_sd: StateDict
    fts_sd: list[StateDict]
    single: tuple[Path, list[Path]]  # base folder, fine-tune model.safetensors files
    sharded: tuple[Path, list[Path]]  # folders with an index and several shards


def _write_inputs(root: Path, dtype: torch.dtype) -> Inputs:
    seed = fresh_seed() % 2**63
    base, fts = make_state_dicts(seed, dtype)
    single_base = save(base, root / "single" / "base")
    single_fts = [save(ft, root / "single" / f"ft{i}") / SINGLE_NAME for i, ft in enumerate(fts)]
    # ~3 KB shards: every model is split over several files (and tensors over shards in an
    # order different from the name order).
    sharded_base = save(base, root / "sharded" / "base", 3000)
    sharded_fts = [save(ft, root / "sharded" / f"ft{i}", 3000) for i, ft in enumerate(fts)]
    assert (sharded_base / INDEX_NAME).exists()
    assert len(list(sharded_base.glob("*.safetensors"))) > 3
    return Inputs(seed, base, fts, (single_base, single_fts), (sharded_base, sharded_fts))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Inputs]:
    return {
        "float32": _write_inputs(tmp_path_factory.mktemp("fp32"), torch.float32),
        "bfloat16": _write_inputs(tmp_path_factory.mktemp("bf16"), torch.bfloat16),
    }


# ----------------------------------------------------------------------------- round trip

CASES: list[tuple[str, dict[str, Any]]] = [(m, {}) for m in METHODS] + [
    ("ties", {"trim": "tensor", "merge": "sum", "density": 0.5}),
    ("dare_ties", {"drop_rate": 0.3, "density": 0.6, "trim": "tensor"}),
    ("consensus", {"apply_to": "ties", "density": 0.4}),
    ("iso_cts", {"common_space_fraction": 0.5}),
]


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("method", "params"), CASES, ids=[m + ("-" + "-".join(p) if p else "") for m, p in CASES]
)
def test_cli_merge_is_bitwise_the_in_memory_merge(
    inputs: dict[str, Inputs],
    tmp_path: Path,
    method: str,
    params: dict[str, Any],
    dtype: str,
    layout: str,
) -> None:
    data = inputs[dtype]
    base, models = data.single if layout == "single" else data.sharded
    out = tmp_path / "merged"
    argv = [
        "merge",
        str(out),
        *model_args(base, models),
        "--method",
        method,
        "--alpha",
        str(ALPHA),
        "--threads",
        str(THREADS),
        "--seed",
        "11",
        "--quiet",
        *param_args(params),
    ]
    if layout == "sharded":
        argv += ["--out-shard-size", "4KB"]
    assert cli.main(argv) == 0
    want = isofast.merge(
        data.base_sd, data.fts_sd, method, ALPHA, seed=11, threads=THREADS, **params
    )
    ctx = f"{method} {params} {dtype} {layout} seed={data.seed}"
    got = read_output(out)
    assert_bitwise_equal(got, want, ctx)
    if layout == "sharded":
        index = json.loads((out / INDEX_NAME).read_text())
        shards = sorted(out.glob("model-*-of-*.safetensors"))
        assert len(shards) > 1, ctx
        assert set(index["weight_map"]) == set(SPEC)
        assert set(index["weight_map"].values()) == {p.name for p in shards}
        assert index["metadata"]["total_size"] == sum(t.numel() * t.itemsize for t in got.values())
        assert not (out / SINGLE_NAME).exists()
    else:
        assert sorted(p.name for p in out.glob("*.safetensors")) == [SINGLE_NAME], ctx
        assert not (out / INDEX_NAME).exists()


def test_cli_subprocess_round_trip(inputs: dict[str, Inputs], tmp_path: Path) -> None:
    """One real `python -m isofast.cli` run (sharded bf16 in, sharded out, iso_cts)."""
    data = inputs["bfloat16"]
    base, models = data.sharded
    out = tmp_path / "merged"
    cmd = [
        sys.executable,
        "-m",
        "isofast.cli",
        "merge",
        str(out),
        *model_args(base, models),
        "--method",
        "iso_cts",
        "--alpha",
        "1.0",
        "--threads",
        str(THREADS),
        "--out-shard-size",
        "6KB",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"merged {TASKS} models with iso_cts into {out}" in run.stdout
    want = isofast.merge(data.base_sd, data.fts_sd, "iso_cts", 1.0, threads=THREADS)
    assert_bitwise_equal(read_output(out), want, f"subprocess seed={data.seed}")
    assert (out / INDEX_NAME).exists()


def test_cli_config_and_flags_agree(inputs: dict[str, Inputs], tmp_path: Path) -> None:
    """`merge CONFIG OUT` and `merge OUT --flags` give the same bits; flags override the
    config; relative paths in a config are relative to its folder."""
    data = inputs["float32"]
    base, models = data.sharded
    cfg = tmp_path / "nested" / "merge.yml"
    cfg.parent.mkdir()
    cfg.write_text(
        yaml.safe_dump(
            {
                "base_model": os.path.relpath(base, cfg.parent),
                "models": [{"model": os.path.relpath(m, cfg.parent)} for m in models],
                "method": "iso_c",  # overridden below
                "alpha": 0.3,  # overridden below
                "parameters": {"density": 0.4},
                "threads": THREADS,
                "seed": 3,
            }
        )
    )
    out = tmp_path / "a"
    argv = ["merge", str(cfg), str(out), "--method", "ties", "--alpha", "0.9", "-q"]
    assert cli.main(argv) == 0
    want = isofast.merge(
        data.base_sd, data.fts_sd, "ties", 0.9, seed=3, threads=THREADS, density=0.4
    )
    assert_bitwise_equal(read_output(out), want, f"config seed={data.seed}")
    # the config written beside the output re-runs the same merge
    written = yaml.safe_load((out / "isofast_config.yml").read_text())
    assert written["method"] == "ties"
    assert written["alpha"] == 0.9
    assert cli.main(["merge", str(out / "isofast_config.yml"), str(tmp_path / "b"), "-q"]) == 0
    assert_bitwise_equal(read_output(tmp_path / "b"), read_output(out), "re-run")


def test_cli_refuses_to_overwrite(
    inputs: dict[str, Inputs], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = inputs["float32"]
    base, models = data.single
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["merge", str(out), *model_args(base, models), "--method", "task_arithmetic", "-q"]
    assert cli.main(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"], "a temporary folder was left"
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    want = isofast.merge(data.base_sd, data.fts_sd, "task_arithmetic", 1.0)
    assert_bitwise_equal(read_output(out), want, "overwrite")


def test_cli_methods_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["methods"]) == 0
    text = capsys.readouterr().out
    for m in METHODS:
        assert m in text


# ----------------------------------------------------------------------------- plan errors


@pytest.fixture
def no_data_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any access to tensor data fail loudly (headers stay readable)."""

    def refuse(self: Any, name: str) -> Any:
        raise AssertionError(f"tensor data of {name!r} was read")

    monkeypatch.setattr(SafetensorsFile, "get", refuse)
    monkeypatch.setattr(TorchFile, "get", refuse)
    monkeypatch.setattr(CheckpointReader, "get", refuse)


@pytest.fixture(scope="module")
def plan_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, ft0, ft1 and broken variants of ft1 (fp32, sharded and single)."""
    root = tmp_path_factory.mktemp("plan")
    base, fts = make_state_dicts(0, torch.float32, tasks=2)
    save(base, root / "base", 3000)
    save(fts[0], root / "ft0")
    save(fts[1], root / "ft1", 3000)
    missing = dict(fts[1])
    del missing["layers.1.mlp.down.weight"]
    save(missing, root / "ft_missing")
    wrong_shape = dict(fts[1])
    wrong_shape["layers.0.attn.k.weight"] = torch.zeros(24, 25)
    save(wrong_shape, root / "ft_shape", 3000)
    wrong_dtype = dict(fts[1])
    wrong_dtype["layers.0.norm.weight"] = wrong_dtype["layers.0.norm.weight"].to(torch.bfloat16)
    save(wrong_dtype, root / "ft_dtype")
    extra = dict(fts[1])
    extra["lm_head.weight"] = torch.zeros(4, 4)
    save(extra, root / "ft_extra")
    return root


def _config(root: Path, tmp: Path, models: list[str], **extra: Any) -> Path:
    cfg = tmp / "config.yml"
    data: dict[str, Any] = {"base_model": str(root / "base"), "models": models, **extra}
    cfg.write_text(yaml.safe_dump(data))
    return cfg


PLAN_ERRORS: list[tuple[str, list[str], dict[str, Any], list[str]]] = [
    # (case, fine-tunes, extra config keys, substrings the message must contain)
    ("typo_path", ["ft0", "ft1_typo"], {}, ["ft1_typo", "does not exist"]),
    ("missing_tensor", ["ft0", "ft_missing"], {}, ["ft_missing", "layers.1.mlp.down.weight"]),
    (
        "shape_mismatch",
        ["ft0", "ft_shape"],
        {},
        ["layers.0.attn.k.weight", "(24, 25)", "(24, 24)", "ft_shape"],
    ),
    ("unknown_method", ["ft0", "ft1"], {"method": "iso_ctss"}, ["iso_ctss", "iso_cts"]),
    ("dtype_mismatch", ["ft0", "ft_dtype"], {}, ["layers.0.norm.weight", "bfloat16", "float32"]),
    ("extra_tensor", ["ft0", "ft_extra"], {}, ["lm_head.weight", "ft_extra"]),
    (
        "unknown_param",
        ["ft0", "ft1"],
        {"method": "ties", "parameters": {"densty": 0.2}},
        ["densty", "density"],
    ),
    ("bad_alpha", ["ft0", "ft1"], {"alpha": "strong"}, ["alpha", "strong"]),
]


@pytest.mark.parametrize(
    ("models", "extra", "expect"),
    [c[1:] for c in PLAN_ERRORS],
    ids=[c[0] for c in PLAN_ERRORS],
)
@pytest.mark.parametrize("command", ["plan", "merge"])
@pytest.mark.usefixtures("no_data_reads")
def test_plan_rejects_bad_merges_from_headers(
    plan_models: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    models: list[str],
    extra: dict[str, Any],
    expect: list[str],
) -> None:
    cfg = _config(plan_models, tmp_path, [str(plan_models / m) for m in models], **extra)
    out = tmp_path / "out"
    argv = ["plan", str(cfg)] if command == "plan" else ["merge", str(cfg), str(out), "-q"]
    start = time.perf_counter()
    rc = cli.main(argv)
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2, err
    assert seconds < 1.0, f"took {seconds:.2f} s"
    assert err.startswith(f"isofast {command}: error: "), err
    assert err.count("\n") == 1, f"expected a one-line message, got {err!r}"
    for part in expect:
        assert part in err, f"{part!r} not in {err!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"], "output was created"


@pytest.mark.usefixtures("no_data_reads")
def test_plan_of_a_good_merge_reads_headers_only(
    plan_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(plan_models, tmp_path, [str(plan_models / "ft0"), str(plan_models / "ft1")])
    start = time.perf_counter()
    assert cli.main(["plan", str(cfg), "--method", "iso_cts"]) == 0
    assert time.perf_counter() - start < 1.0
    text = capsys.readouterr().out
    assert "peak memory" in text
    for name in SPEC:
        assert name[:48] in text
    assert "copy" in text and "matrix" in text  # position_ids is copied, 2-D keys are matrices


def test_plan_needs_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan"]) == 2
    assert "--base" in capsys.readouterr().err


def test_merge_reports_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["merge", str(tmp_path / "nope.yml"), str(tmp_path / "out")]) == 2
    assert "nope.yml" in capsys.readouterr().err


# ----------------------------------------------------------------------------- SIGKILL


def _tmp_folders(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.isofast-tmp-*"))


def test_sigkill_midway_leaves_no_output_under_the_final_name(tmp_path: Path) -> None:
    """Kill a real `isofast merge` once it is writing; nothing appears under the final name,
    and a later merge into the same name still works."""
    rng = np.random.default_rng(0)
    names = [f"layers.{i}.weight" for i in range(6)]
    base = {n: torch.from_numpy(rng.standard_normal((512, 512), dtype=np.float32)) for n in names}
    save(base, tmp_path / "base")
    for t in range(3):
        noise = {n: 0.01 * torch.randn(512, 512) for n in names}
        save({n: base[n] + noise[n] for n in names}, tmp_path / f"ft{t}")
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    out = out_parent / "merged"
    cmd = [
        sys.executable,
        "-m",
        "isofast.cli",
        "merge",
        str(out),
        *model_args(tmp_path / "base", [tmp_path / f"ft{t}" for t in range(3)]),
        "--method",
        "iso_cts",
        "--dtype",
        "float64",
        "--threads",
        "1",
        "--out-shard-size",
        "1500KB",
        "-q",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        written = False
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = _tmp_folders(out_parent, "merged")
            # midway: the hidden folder exists and holds tensor data already
            if tmps and any(p.stat().st_size > 2**19 for p in tmps[0].iterdir()):
                written = True
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the merge ended before it could be killed; make it bigger"
        assert written, "no temporary output folder with data appeared within 60 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a folder appeared under the final name"
    leftovers = _tmp_folders(out_parent, "merged")
    assert len(leftovers) == 1
    assert not (leftovers[0] / INDEX_NAME).exists()
    assert not (leftovers[0] / SINGLE_NAME).exists()
    assert [p.name for p in out_parent.iterdir() if not p.name.startswith(".")] == []
    # the stale hidden folder does not get in the way of the next merge
    again = ["merge", str(out), *model_args(tmp_path / "base", [tmp_path / "ft0"]), "-q"]
    assert cli.main([*again, "--method", "task_arithmetic"]) == 0
    assert (out / SINGLE_NAME).exists()


# ----------------------------------------------------------------------------- mergekit


MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")


def _mergekit_config(method: str) -> str:
    """A mergekit config as people write them: relative paths, per-model parameters,
    int8_mask, dtype; the GTA methods list the base model among the models, as mergekit's
    examples do."""
    per_model: dict[str, Any] = {"weight": 0.5}
    if method in ("ties", "dare_ties", "dare_linear"):
        per_model["density"] = 0.6
    fts = [{"model": f"./ft{i}", "parameters": per_model} for i in range(TASKS)]
    doc: dict[str, Any] = {
        "models": fts if method == "linear" else [{"model": "./base"}, *fts],
        "merge_method": method,
        "base_model": "./base",
        # mergekit's linear adds the base model to the inputs: it needs a weight too.
        "parameters": {"int8_mask": True}
        if method != "linear"
        else {"normalize": True, "weight": 0.5},
        "dtype": "bfloat16",
    }
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture(scope="module")
def mergekit_models(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, StateDict, list[StateDict]]:
    root = tmp_path_factory.mktemp("mergekit")
    base, fts = make_state_dicts(1, torch.bfloat16)
    save(base, root / "base")
    for i, ft in enumerate(fts):
        save(ft, root / f"ft{i}", 4000)
    return root, base, fts


def _mergekit_reference(method: str, base: StateDict, fts: list[StateDict]) -> StateDict | None:
    """What mergekit computes for `_mergekit_config` where no randomness or trimming is
    involved (linear, task_arithmetic), in float32 rounded to bf16; None otherwise."""
    if method not in ("linear", "task_arithmetic"):
        return None
    out: StateDict = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b
        elif method == "linear":  # sum_t w x_t / sum_t w over the models and the base
            weighted = torch.stack([0.5 * x[name].float() for x in (*fts, base)]).sum(0)
            out[name] = (weighted / (0.5 * (len(fts) + 1))).to(b.dtype)
        else:  # base + sum_t w delta_t (normalize defaults to false)
            deltas = torch.stack([ft[name].float() - b.float() for ft in fts])
            out[name] = (b.float() + 0.5 * deltas.sum(0)).to(b.dtype)
    return out


@pytest.mark.parametrize("method", MERGEKIT_METHODS)
def test_mergekit_configs_load_and_merge(
    mergekit_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path, method: str
) -> None:
    root, base, fts = mergekit_models
    cfg = root / f"{method}.yml"
    cfg.write_text(_mergekit_config(method))
    request = load_config(cfg)
    assert request.base == str((root / "base").resolve())
    models = [str((root / f"ft{i}").resolve()) for i in range(TASKS)]
    if method == "linear":  # the base is among the averaged inputs
        models.append(request.base)
    assert request.models == tuple(models)
    assert request.out_dtype == "bfloat16"
    out = tmp_path / "out"
    assert cli.main(["merge", str(cfg), str(out), "--threads", str(THREADS), "-q"]) == 0
    got = read_output(out)
    # bit for bit the in-memory merge of the request isofast derived from the config
    want = isofast.merge(
        base,
        [*fts, base] if method == "linear" else fts,
        request.method,
        request.alpha,
        out_dtype=request.out_dtype,
        seed=request.seed,
        threads=THREADS,
        **dict(request.params or {}),
    )
    assert_bitwise_equal(got, want, f"mergekit {method}")
    ref = _mergekit_reference(method, base, fts)
    if ref is not None:  # mergekit's math, up to one bf16 rounding step
        for name, r in ref.items():
            diff = (got[name].float() - r.float()).abs().max().item()
            assert diff <= 2.0**-7 * max(1.0, r.float().abs().max().item()), (name, diff)
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["tags"] == ["merge", "isofast"]


def _load_mergekit(tmp_path: Path, doc: dict[str, Any]) -> Any:
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"base_model": "b", **doc}))
    return load_config(cfg)


def test_mergekit_mapping_of_weights_and_normalize(tmp_path: Path) -> None:
    """mergekit's methods map onto isofast's `gta` with mergekit's rules and defaults
    (docs/MERGEKIT.md); per-model values stay per model."""
    own = {"weight": 0.5, "density": 0.3}
    models = [{"model": "a", "parameters": own}, {"model": "c", "parameters": own}]

    def params(doc: dict[str, Any]) -> tuple[str, float, dict[str, Any]]:
        r = _load_mergekit(tmp_path, doc)
        return r.method, r.alpha, dict(r.params or {})

    ties = {"sparsify": "magnitude", "elect": "sum", "weight": 0.5, "density": 0.3}
    assert params({"merge_method": "ties", "models": models}) == (
        "gta",
        1.0,
        {**ties, "normalize": True},
    )
    assert params(
        {"merge_method": "ties", "models": models, "parameters": {"normalize": False}}
    ) == ("gta", 1.0, ties)
    dare = {"sparsify": "random", "weight": 0.5, "density": 0.3, "rescale": True}
    assert params({"merge_method": "dare_linear", "models": models}) == ("gta", 1.0, dare)
    assert params({"merge_method": "task_arithmetic", "models": models}) == (
        "gta",
        1.0,
        {"weight": 0.5},
    )
    # parameters given once at the top level apply to every model; lambda scales
    top = {
        "merge_method": "task_arithmetic",
        "models": ["a", "c"],
        "parameters": {"weight": 0.25, "lambda": 2.0},
    }
    assert params(top)[2] == {"weight": 0.25, "lam": 2.0}
    differ = [
        {"model": "a", "parameters": {"weight": 0.5}},
        {"model": "c", "parameters": {"weight": [0.1, 0.7]}},
    ]
    assert params({"merge_method": "ties", "models": differ})[2]["weight"] == {
        "models": [0.5, [0.1, 0.7]]
    }
    # seed and dtype
    r = _load_mergekit(tmp_path, {"merge_method": "dare_linear", "models": ["a"], "seed": 9})
    assert (r.seed, r.out_dtype) == (9, None)


def test_mergekit_dare_ties_default_is_not_normalized(tmp_path: Path) -> None:
    """mergekit's registry: dare_ties has default_normalize=False and default_rescale=True."""
    own = {"weight": 0.5, "density": 0.6}
    r = _load_mergekit(
        tmp_path,
        {"merge_method": "dare_ties", "models": [{"model": m, "parameters": own} for m in "ac"]},
    )
    p = r.method_params
    assert (p.sparsify, p.elect, p.normalize, p.rescale) == ("random", "sum", False, True)
    assert (r.alpha, p.weight, p.density) == (1.0, 0.5, 0.6)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear"])
def test_mergekit_normalize_divides_by_the_sum_of_weights(tmp_path: Path, method: str) -> None:
    """normalize: true divides by the sum of the weights (tests/test_mergekit.py checks the
    result)."""
    own = {"weight": 0.5, "density": 1.0}
    r = _load_mergekit(
        tmp_path,
        {
            "merge_method": method,
            "models": [{"model": m, "parameters": own} for m in "acd"],
            "parameters": {"normalize": True},
        },
    )
    assert r.method_params.normalize is True and r.method_params.weight == 0.5


def test_mergekit_linear_without_base_model(
    mergekit_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    """mergekit linear configs usually have no base_model: the result is the (normalized)
    weighted mean of the listed models."""
    root, base, fts = mergekit_models
    models = [root / "base", *(root / f"ft{i}" for i in range(TASKS))]
    cfg = tmp_path / "linear.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
                "dtype": "bfloat16",
            }
        )
    )
    r = load_config(cfg)
    assert r.method == "gta" and r.base == str(models[0])
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 0
    got = read_output(tmp_path / "out")
    states = [base, *fts]
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(got[name], b), name
            continue
        mean = sum(s[name].float() for s in states) / len(states)
        diff = (got[name].float() - torch.as_tensor(mean)).abs().max().item()
        assert diff <= 2.0**-7 * max(1.0, torch.as_tensor(mean).abs().max().item()), name


def test_mergekit_unnormalized_linear_is_mergekits_sum_or_refused(
    mergekit_models: tuple[Path, StateDict, list[StateDict]], tmp_path: Path
) -> None:
    root, base, fts = mergekit_models
    cfg = tmp_path / "linear.yml"
    doc = {
        "merge_method": "linear",
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / f"ft{i}"), "parameters": {"weight": 0.5}} for i in range(3)
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    cfg.write_text(yaml.safe_dump(doc))
    rc = cli.main(["merge", str(cfg), str(tmp_path / "out"), "-q"])
    if rc == 2:  # refused with a message: fine
        return
    got = read_output(tmp_path / "out")
    for name, b in base.items():
        if b.is_floating_point():
            want = sum(0.5 * ft[name].float() for ft in fts)
            assert torch.allclose(got[name], torch.as_tensor(want), atol=1e-2), name


def test_mergekit_gradient_weights_are_taken(tmp_path: Path) -> None:
    own = {"weight": [0.1, 0.5], "density": 0.5}
    doc = {"merge_method": "ties", "models": [{"model": "a", "parameters": own}]}
    r = _load_mergekit(tmp_path, doc)
    assert r.params["weight"] == [0.1, 0.5] and r.method_params.per_tensor


def test_mergekit_out_dtype_is_the_output_dtype(tmp_path: Path) -> None:
    r = _load_mergekit(
        tmp_path,
        {
            "merge_method": "ties",
            "models": ["a"],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
    )
    assert r.out_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("doc", "expect"),
    [
        (
            {"merge_method": "ties", "models": ["a"], "slices": [{"sources": []}]},
            ["slices", "not supported"],
        ),
        (
            {"merge_method": "ties", "models": ["a"], "tokenizer_source": "union"},
            ["tokenizer_source", "not supported"],
        ),
        ({"merge_method": "nearswap", "models": ["a", "c"]}, ["nearswap", "not supported"]),
        ({"merge_method": "ties", "models": ["b"]}, ["no fine-tuned models"]),
    ],
    ids=["slices", "tokenizer_union", "unsupported_method", "only_base"],
)
def test_mergekit_configs_isofast_cannot_express_fail_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: dict[str, Any], expect: list[str]
) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"base_model": "b", **doc}))
    assert cli.main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err
    for part in expect:
        assert part in err, err


def test_device_key_cpu_runs_and_cuda_is_checked_first(
    inputs: dict[str, Inputs], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`device` is part of the config schema: cpu merges (and is written back into the config
    beside the output); a GPU request that cannot run fails before anything is read or
    created, saying why."""
    from isofast.cli import main

    base, models = inputs["float32"].single
    flags = ["--base", str(base), *[a for m in models for a in ("--model", str(m))]]
    out = tmp_path / "out"
    assert main(["merge", str(out), *flags, "--method", "iso_c", "--device", "cpu", "-q"]) == 0
    assert "device: cpu" in (out / "isofast_config.yml").read_text()
    refusals = [(["--device", "tpu"], "'cpu', 'cuda' or 'cuda:N'")]
    try:
        from isofast import _cuda  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        for method in ("iso_c", "iso_cts", "tsv_m", "ties"):
            refusals.append(
                (["--device", "cuda:0", "--method", method], "without its CUDA backend")
            )
    for extra, want in refusals:
        refused = tmp_path / "refused"
        assert main(["merge", str(refused), *flags, *extra, "-q"]) == 2
        assert want in capsys.readouterr().err
        assert not refused.exists()
        assert main(["plan", *flags, *extra]) == 2
        assert want in capsys.readouterr().err
