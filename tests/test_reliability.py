"""Nothing lost, nothing crashes (issue 17): I/O faults, the output lock, the memory guard and
reproducibility across thread counts, runs and paths.

Faults are injected where the writer or the reader calls the operating system (a full disk,
an I/O error, a folder that cannot be created); each must end in one clear error naming the
file, no published output and no temporary folder or lock left behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import isofast
import isofast.io.appender as appender_mod
from isofast import cli, memory_guard
from isofast._native import core
from isofast.io import INDEX_NAME, CheckpointError, CheckpointReader, CheckpointWriter

from conftest import fresh_seed

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


# ----------------------------------------------------------------------------- resume

_KILL_AT_WRITE = """
import os, signal, sys
import isofast, isofast.io.appender as appender

root, out, method, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
real, calls = os.pwrite, 0

def pwrite(fd, data, offset):
    global calls
    calls += 1
    if calls == kill_at:  # die in the middle of the merge's writes, as a crash would
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd, data, offset)

appender.os.pwrite = pwrite
models = [f"{root}/ft{i}" for i in range(int(sys.argv[5]))]
isofast.merge(f"{root}/base", models, method, out=out, max_shard_bytes=3000, threads=1)
"""


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", ["ties", "iso_cts"])
def test_resume_after_a_kill_at_random_points_gives_the_same_bytes(
    on_disk: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
) -> None:
    """Ten kills per method (twenty in all) at random writes; `resume=True` then publishes
    exactly the files of an uninterrupted merge."""
    models = [on_disk / f"ft{i}" for i in range(TASKS)]
    real, calls = os.pwrite, 0

    def counting(fd: int, data: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        return real(fd, data, offset)

    monkeypatch.setattr(appender_mod.os, "pwrite", counting)
    want = isofast.merge(
        on_disk / "base", models, method, out=tmp_path / "want", max_shard_bytes=3000, threads=1
    )
    monkeypatch.undo()
    writes = calls
    caplog.set_level(logging.INFO, logger="isofast")
    rng = np.random.default_rng(fresh_seed())
    env = {k: v for k, v in os.environ.items() if k != "ISOFAST_TEST_SEED"}
    for k in sorted(rng.choice(np.arange(1, writes + 1), size=10, replace=False)):
        out = tmp_path / f"out{k}"
        argv = [sys.executable, "-c", _KILL_AT_WRITE, str(on_disk), str(out), method, str(k)]
        child = subprocess.run([*argv, str(TASKS)], env=env, capture_output=True, timeout=120)
        assert child.returncode == -signal.SIGKILL, (k, child.stderr.decode())
        assert not out.exists()
        got = isofast.merge(
            on_disk / "base", models, method, out=out, max_shard_bytes=3000, threads=1, resume=True
        )
        assert folder_bytes(got) == folder_bytes(want), f"killed at write {k} of {writes}"
        assert leftovers(tmp_path, out) == [out.name]
    reused = [r.getMessage() for r in caplog.records if "already written" in r.getMessage()]
    assert any(" 0 shards" not in m for m in reused), "no kill left a shard to reuse"


def test_resume_refuses_shards_of_other_settings_or_changed_files(
    on_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted merge's shards are reused only by the same settings over the same
    files; a corrupted shard is written again."""
    models = [on_disk / f"ft{i}" for i in range(TASKS)]
    out = tmp_path / "out"
    real = core.merge_items
    calls = 0

    def interrupt_late(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    def interrupted_merge(alpha: float) -> Path:
        nonlocal calls
        calls = 0
        monkeypatch.setattr(core, "merge_items", interrupt_late)
        with pytest.raises(KeyboardInterrupt):
            isofast.merge(
                on_disk / "base",
                models,
                "iso_c",
                alpha,
                out=out,
                max_shard_bytes=3000,
                overwrite=True,
            )
        monkeypatch.setattr(core, "merge_items", real)
        (kept,) = [name for name in leftovers(tmp_path, out) if name.startswith(".")]
        return tmp_path / kept

    def resumed(alpha: float) -> dict[str, bytes]:
        return read(isofast.merge(on_disk / "base", models, "iso_c", alpha, out=out,
                                  max_shard_bytes=3000, resume=True, overwrite=True))  # fmt: skip

    want = read(isofast.merge(on_disk / "base", models, "iso_c", 0.5, out=tmp_path / "want"))
    interrupted_merge(1.0)
    assert resumed(0.5) == want  # other alpha: the kept shards are not reused
    kept = interrupted_merge(0.5)
    first = sorted(kept.glob("shard-*.partial"))[0]
    blob = bytearray(first.read_bytes())
    blob[-1] ^= 0xFF  # flip a bit of its data
    first.write_bytes(bytes(blob))
    assert resumed(0.5) == want


def test_clean_removes_what_interrupted_merges_left(
    on_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(core, "merge_items", interrupted)
    out = tmp_path / "out"
    assert cli.main(merge_argv(on_disk, out)) == 130
    assert len(leftovers(tmp_path, out)) == 1
    assert cli.main(["clean", str(out), "-q"]) == 0
    assert leftovers(tmp_path, out) == []


def test_crc32c_matches_the_bitwise_definition() -> None:
    """The journal's checksum: CRC-32C, hardware streams and table path alike, and it
    continues across split buffers."""

    def by_bits(data: bytes) -> int:
        crc = 0xFFFFFFFF
        for byte in data:
            crc ^= byte
            for _ in range(8):
                crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        return crc ^ 0xFFFFFFFF

    assert core.crc32c(b"123456789") == 0xE3069283  # the standard check value
    blob = np.random.default_rng(fresh_seed()).bytes(3 * 8192 * 2 + 77)
    for size in (0, 1, 7, 8, 9, 3 * 8192 - 1, 3 * 8192, len(blob)):
        assert core.crc32c(blob[:size]) == by_bits(blob[:size]), size
        cut = size // 3
        assert core.crc32c(blob[cut:size], core.crc32c(blob[:cut])) == by_bits(blob[:size])


def test_resume_needs_a_folder_and_checkpoints(on_disk: Path) -> None:
    base, fts = make_models(1)
    with pytest.raises(isofast.MergeInputError, match="resume"):
        isofast.merge(on_disk / "base", [on_disk / "ft0"], "iso_c", resume=True)
    with pytest.raises(isofast.MergeInputError, match="resume"):
        isofast.merge(base, fts, "iso_c", out=on_disk / "o", resume=True)
