"""Nothing lost, nothing crashes (issue 17): I/O faults, the output lock, the memory guard and
reproducibility across thread counts, runs and paths.

Faults are injected where the writer or the reader calls the operating system (a full disk,
an I/O error, a folder that cannot be created); each must end in one clear error naming the
file, no published output and no temporary folder or lock left behind.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import isofast
import isofast.io.appender as appender_mod
from isofast import cli, memory_guard
from isofast._native import core
from isofast.io import INDEX_NAME, CheckpointError, CheckpointReader, CheckpointWriter

SHAPES = {
    "layers.0.attn.weight": (48, 32),
    "layers.0.attn.bias": (48,),
    "layers.0.mlp.weight": (64, 32),
    "layers.1.attn.weight": (48, 32),
    "layers.1.mlp.weight": (32, 64),
    "layers.1.norm.weight": (32,),
    "head.weight": (32, 32),
    "position_ids": (1, 8),
}
TASKS = 3


def make_models(seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    base = {
        n: np.arange(8).reshape(s) if n == "position_ids" else rng.standard_normal(s).astype("f4")
        for n, s in SHAPES.items()
    }
    fts = [
        {
            n: x + 0.05 * rng.standard_normal(x.shape).astype("f4") if x.dtype.kind == "f" else x
            for n, x in base.items()
        }
        for _ in range(TASKS)
    ]
    return base, fts


@pytest.fixture
def on_disk(tmp_path: Path) -> Path:
    base, fts = make_models(3)
    root = tmp_path / "models"
    for name, model in [("base", base)] + [(f"ft{i}", ft) for i, ft in enumerate(fts)]:
        with CheckpointWriter(root / name, max_shard_bytes=4000) as w:
            for key, x in model.items():
                w.add(key, x)
    return root


def merge_argv(root: Path, out: Path, method: str = "iso_cts") -> list[str]:
    argv = ["merge", str(out), "--base", str(root / "base"), "--method", method, "-q"]
    for i in range(TASKS):
        argv += ["--model", str(root / f"ft{i}")]
    return [*argv, "--out-shard-size", "3000"]


def read(folder: Path) -> dict[str, bytes]:
    with CheckpointReader(folder) as r:
        return {n: np.array(r.get(n)).tobytes() for n in r.names()}


def leftovers(folder: Path, out: Path) -> list[str]:
    """Entries of `folder` that a failed merge into `out` must not leave."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{out.name}") or p == out)


# ----------------------------------------------------------------------------- I/O faults


@pytest.mark.parametrize(
    ("code", "hint"), [(errno.ENOSPC, "disk is full"), (errno.EIO, "I/O error")]
)
@pytest.mark.parametrize("direct", ["1", "0"])
def test_a_failing_disk_is_named_and_nothing_is_published(
    on_disk: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
    hint: str,
    direct: str,
) -> None:
    monkeypatch.setenv("ISOFAST_DIRECT_IO", direct)
    real_pwrite = os.pwrite
    calls = 0

    def failing(fd: int, data: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 3:  # a few writes succeed, then the disk fails
            raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(appender_mod.os, "pwrite", failing)
    out = tmp_path / "out"
    assert cli.main(merge_argv(on_disk, out)) == 2
    err = capsys.readouterr().err
    assert ".partial: cannot write" in err and hint in err, err
    assert "Traceback" not in err
    assert leftovers(tmp_path, out) == []


def test_an_output_folder_that_cannot_be_made_is_named(
    on_disk: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A read-only destination (root ignores permission bits, so the refusal is injected)."""
    real_mkdir = Path.mkdir

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        if ".isofast-tmp-" in self.name:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "out"
    assert cli.main(merge_argv(on_disk, out)) == 2
    err = capsys.readouterr().err
    assert ".out.isofast-tmp-" in err and "read-only" in err, err
    assert leftovers(tmp_path, out) == []


def test_an_input_cut_short_during_the_merge_is_named(
    on_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = json.loads((on_disk / "ft1" / INDEX_NAME).read_text())
    victim = on_disk / "ft1" / index["weight_map"]["head.weight"]  # merged late
    real = core.merge_items
    calls = 0

    def truncate_then_merge(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            os.truncate(victim, victim.stat().st_size // 2)
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "merge_items", truncate_then_merge)
    out = tmp_path / "out"
    with pytest.raises((CheckpointError, ValueError), match=str(victim.name)):
        isofast.merge(
            on_disk / "base",
            [on_disk / f"ft{i}" for i in range(TASKS)],
            "task_arithmetic",
            out=out,
        )
    assert leftovers(tmp_path, out) == []


def test_an_input_deleted_during_the_merge_is_still_read_whole(
    on_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs stay open for the whole merge: a file unlinked midway is still read in full
    (POSIX keeps its data until the last descriptor closes), so the output is unchanged."""
    models = [on_disk / f"ft{i}" for i in range(TASKS)]
    want = isofast.merge(on_disk / "base", models, "ties", out=tmp_path / "want")
    real = core.merge_items
    calls = 0

    def delete_then_merge(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            for shard in (on_disk / "ft2").glob("*.safetensors"):
                shard.unlink()
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "merge_items", delete_then_merge)
    got = isofast.merge(on_disk / "base", models, "ties", out=tmp_path / "got")
    assert read(got) == read(want)


def test_two_merges_never_write_one_output(
    on_disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with CheckpointWriter(out) as other:  # another merge holds the output
        assert cli.main(merge_argv(on_disk, out)) == 2
        assert "another isofast merge is writing" in capsys.readouterr().err
        other.add("x", np.ones(2, np.float32))
    assert list(read(out)) == ["x"]
    assert leftovers(tmp_path, out) == ["out"]  # the lock file is gone
    assert cli.main([*merge_argv(on_disk, out), "--overwrite"]) == 0


# ----------------------------------------------------------------------------- memory guard


def test_a_merge_that_cannot_fit_is_refused_before_reading(
    on_disk: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(memory_guard, "available_bytes", lambda: 2**20)
    real = core.merge_items

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("data was read")

    monkeypatch.setattr(core, "merge_items", must_not_run)
    out = tmp_path / "out"
    assert cli.main(merge_argv(on_disk, out)) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "1.0 MiB is available" in err and "--force" in err, err
    assert leftovers(tmp_path, out) == []
    with pytest.raises(isofast.InsufficientMemory):
        isofast.merge(on_disk / "base", [on_disk / "ft0"], "iso_c")
    monkeypatch.setattr(core, "merge_items", real)
    assert cli.main([*merge_argv(on_disk, out), "--force"]) == 0


# ----------------------------------------------------------------------------- reproducibility


@pytest.mark.parametrize("method", list(isofast.methods()))
def test_same_bits_for_every_thread_count_run_and_path(
    on_disk: Path, tmp_path: Path, method: str
) -> None:
    base, fts = make_models(3)
    counts = sorted({1, 2, os.cpu_count() or 1})
    in_memory = [isofast.merge(base, fts, method, threads=t, seed=5) for t in counts]
    in_memory.append(isofast.merge(base, fts, method, threads=counts[-1], seed=5))  # again
    want = {n: np.ascontiguousarray(x).tobytes() for n, x in in_memory[0].items()}
    for other in in_memory[1:]:
        assert {n: np.ascontiguousarray(x).tobytes() for n, x in other.items()} == want
    models = [on_disk / f"ft{i}" for i in range(TASKS)]
    for t in counts:
        out = isofast.merge(
            on_disk / "base", models, method, threads=t, seed=5, out=tmp_path / f"t{t}"
        )
        assert read(out) == want, t


def test_nan_in_a_checkpoint_names_the_model_and_file(tmp_path: Path) -> None:
    base, fts = make_models(4)
    fts[1]["layers.1.mlp.weight"][3, 5] = np.nan
    paths = []
    for name, model in [("base", base), ("ft0", fts[0]), ("ft1", fts[1])]:
        with CheckpointWriter(tmp_path / name) as w:
            for key, x in model.items():
                w.add(key, x)
        paths.append(tmp_path / name)
    for method in ("task_arithmetic", "ties", "iso_c"):
        with pytest.raises(isofast.MergeInputError) as caught:
            isofast.merge(paths[0], paths[1:], method, out=tmp_path / "out")
        message = str(caught.value)
        assert "tensor 'layers.1.mlp.weight' of fine-tuned model 1" in message, message
        assert f"({tmp_path / 'ft1'}, file {tmp_path / 'ft1' / 'model.safetensors'})" in message
        assert "NaN" in message
