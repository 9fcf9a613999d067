"""Checkpoint I/O: safetensors reader/writer, sharded folders, torch pickles, atomicity."""

from __future__ import annotations

import errno
import json
import os
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from isofast.io import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    SafetensorsFile,
    copy_side_files,
    shard_name,
)
from isofast.io.shards import PlannedShardWriter

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402

Arrays = dict[str, np.ndarray[Any, Any]]


def _sample(seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((16, 8)).astype(np.float32),
        "layers.0.attn.weight": rng.standard_normal((8, 8)).astype(np.float16),
        "layers.0.attn.bias": rng.standard_normal(3).astype(np.float64),
        "layers.0.mask": rng.random((2, 3)) > 0.5,
        "counts": rng.integers(-(2**40), 2**40, size=5, dtype=np.int64),
        "i32": rng.integers(-1000, 1000, size=(2, 2), dtype=np.int32),
        "i16": rng.integers(-1000, 1000, size=7, dtype=np.int16),
        "i8": rng.integers(-100, 100, size=5, dtype=np.int8),
        "u8": rng.integers(0, 255, size=9, dtype=np.uint8),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _write(out: Path, arrays: Arrays, **kw: Any) -> Path:
    with CheckpointWriter(out, **kw) as w:
        for name, a in arrays.items():
            w.add(name, a)
    return out


def _check_equal(reader: CheckpointReader, arrays: Arrays) -> None:
    assert set(reader.names()) == set(arrays)
    for name, want in arrays.items():
        got = reader.get(name)
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
        assert not got.flags.writeable


def _check_with_safetensors(files: list[Path], arrays: Arrays) -> None:
    seen: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="numpy") as so:
            for name in so.keys():  # noqa: SIM118 - safe_open is not a mapping
                np.testing.assert_array_equal(so.get_tensor(name), arrays[name])
                seen.add(name)
            assert so.metadata()["format"] == "pt"
    assert seen == set(arrays)


def _raw_safetensors(path: Path, header: dict[str, Any], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# -- round trips ----------------------------------------------------------------------
def test_single_file_round_trip(tmp_path: Path) -> None:
    arrays = _sample()
    out = _write(tmp_path / "merged", arrays, metadata={"merged_by": "isofast"})
    assert sorted(os.listdir(out)) == [SINGLE_NAME]
    with CheckpointReader(out) as r:
        _check_equal(r, arrays)
        assert r.files == [out / SINGLE_NAME]
        assert r.index_path is None
        assert r.metadata == {"format": "pt", "merged_by": "isofast"}
        assert r.total_nbytes == sum(a.nbytes for a in arrays.values())
        info = r.info("embed.weight")
        assert (info.name, info.shape, info.dtype, info.nbytes) == (
            "embed.weight",
            (16, 8),
            "F32",
            512,
        )
        assert info.file == out / SINGLE_NAME
        assert info.offset is not None and info.offset % 8 == 0
        view = r.get("embed.weight")
        assert not view.flags.owndata  # a view into the mapping, not a copy
    # a single file path reads the same; names come back in storage (insertion) order
    with CheckpointReader(out / SINGLE_NAME) as r:
        assert r.names() == list(arrays)
    _check_with_safetensors([out / SINGLE_NAME], arrays)


def test_views_outlive_close(tmp_path: Path) -> None:
    arrays = _sample()
    out = _write(tmp_path / "m", arrays)
    r = CheckpointReader(out)
    view = r.get("embed.weight")
    r.close()
    np.testing.assert_array_equal(view, arrays["embed.weight"])


def test_sharding_names_and_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays: Arrays = {f"w{i}": rng.standard_normal((10, 10)).astype(np.float32) for i in range(5)}
    arrays["big"] = rng.standard_normal((40, 10)).astype(np.float32)  # larger than a shard
    arrays["tail"] = np.arange(4, dtype=np.int32)
    out = _write(tmp_path / "sharded", arrays, max_shard_bytes=1000, metadata={"k": "v"})

    # 400-byte tensors, 1000-byte shards: [w0 w1] [w2 w3] [w4] [big] [tail]
    files = sorted(os.listdir(out))
    assert files == [*(shard_name(i, 5) for i in range(1, 6)), INDEX_NAME]
    assert shard_name(1, 5) == "model-00001-of-00005.safetensors"
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"] == {"k": "v", "total_size": sum(a.nbytes for a in arrays.values())}
    assert index["weight_map"] == {
        "w0": shard_name(1, 5),
        "w1": shard_name(1, 5),
        "w2": shard_name(2, 5),
        "w3": shard_name(2, 5),
        "w4": shard_name(3, 5),
        "big": shard_name(4, 5),
        "tail": shard_name(5, 5),
    }
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    with CheckpointReader(out) as r:
        assert r.index_path == out / INDEX_NAME
        assert r.names() == list(arrays)  # storage order
        _check_equal(r, arrays)
        assert r.info("big").file == out / shard_name(4, 5)
        r.prefetch(r.names())  # a hint; must not fail
    _check_with_safetensors([out / shard_name(i, 5) for i in range(1, 6)], arrays)
    # the index file itself is also an accepted path
    with CheckpointReader(out / INDEX_NAME) as r:
        _check_equal(r, arrays)


def test_bf16_bits_round_trip(tmp_path: Path) -> None:
    bits = np.array([[0x3F80, 0xC000], [0x7F80, 0x0001]], dtype=np.uint16)  # 1, -2, inf, tiny
    with CheckpointWriter(tmp_path / "bf") as w:
        w.add("x", bits, "BF16")
        w.add("u16", bits.copy())  # plain uint16 is U16, not BF16
        w.add("f8", np.arange(4, dtype=np.uint8), "F8_E4M3")
    with CheckpointReader(tmp_path / "bf") as r:
        info = r.info("x")
        assert (info.dtype, info.shape, info.nbytes) == ("BF16", (2, 2), 8)
        got = r.get("x")
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, bits)
        assert r.info("u16").dtype == "U16"
        assert r.info("f8").dtype == "F8_E4M3"
        assert r.get("f8").dtype == np.uint8
    torch = _torch_or_none()
    if torch is not None:
        from safetensors.torch import load_file

        t = load_file(str(tmp_path / "bf" / SINGLE_NAME))["x"]
        assert t.dtype == torch.bfloat16
        assert t.float().tolist() == [[1.0, -2.0], [float("inf"), t.float()[1, 1].item()]]
        assert t.view(torch.int16).numpy().view(np.uint16).tolist() == bits.tolist()


def test_header_larger_than_reservation_is_relaid_out(tmp_path: Path) -> None:
    arrays: Arrays = {f"tensor.number.{i:04d}": np.full(3, i, np.float32) for i in range(300)}
    arrays["odd"] = np.arange(3, dtype=np.uint8)

    class TinyReserve(CheckpointWriter):
        initial_header_reserve = 56

    out = tmp_path / "relayout"
    with TinyReserve(out) as w:
        for name, a in arrays.items():
            w.add(name, a)
    with CheckpointReader(out) as r:
        _check_equal(r, arrays)
        assert r.info("tensor.number.0000").offset % 8 == 0  # type: ignore[operator]
    _check_with_safetensors([out / SINGLE_NAME], arrays)


def test_writer_accepts_strided_and_big_endian(tmp_path: Path) -> None:
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    arrays: Arrays = {"t": base.T, "be": base.astype(">f4"), "slice": base[:, ::2]}
    _write(tmp_path / "m", arrays)
    with CheckpointReader(tmp_path / "m") as r:
        np.testing.assert_array_equal(r.get("t"), base.T)
        np.testing.assert_array_equal(r.get("be"), base)
        assert r.get("be").dtype == np.dtype("<f4")
        np.testing.assert_array_equal(r.get("slice"), base[:, ::2])


def test_empty_checkpoint(tmp_path: Path) -> None:
    out = _write(tmp_path / "empty", {})
    assert os.listdir(out) == [SINGLE_NAME]
    with CheckpointReader(out) as r:
        assert r.names() == []
    with safe_open(str(out / SINGLE_NAME), framework="numpy") as so:
        assert list(so.keys()) == []


def test_writer_rejects_bad_tensors(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "m") as w:
        w.add("a", np.zeros(2, np.float32))
        with pytest.raises(CheckpointError, match=r"'a'.*added twice"):
            w.add("a", np.zeros(2, np.float32))
        with pytest.raises(CheckpointError, match=r"float32.*BF16"):
            w.add("b", np.zeros(2, np.float32), "BF16")
        with pytest.raises(CheckpointError, match="unknown dtype 'F128'"):
            w.add("c", np.zeros(2, np.float32), "F128")
        with pytest.raises(CheckpointError, match="no safetensors dtype"):
            w.add("d", np.zeros(2, dtype="U3"))
        with pytest.raises(CheckpointError, match="not a valid tensor name"):
            w.add("__metadata__", np.zeros(2, np.float32))
    with CheckpointReader(tmp_path / "m") as r:
        assert r.names() == ["a"]


def test_no_copies_on_write_or_read(tmp_path: Path) -> None:
    big = np.ones((1024, 1024), np.float32)  # 4 MiB
    tracemalloc.start()
    try:
        with CheckpointWriter(tmp_path / "m") as w:
            w.add("big", big)
            w.add("big.T", big.T)  # non-contiguous: exactly one tensor's copy is allowed
        _, peak_write = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with CheckpointReader(tmp_path / "m") as r:
            total = float(r.get("big").sum()) + float(r.get("big.T").sum())
        _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 2 * big.size
    assert peak_write < big.nbytes + (1 << 20)
    assert peak_read < 1 << 20


def test_reads_files_written_by_safetensors_library(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    arrays = _sample()
    del arrays["empty"]
    f = tmp_path / "lib.safetensors"
    save_file(arrays, str(f), metadata={"format": "np"})
    with CheckpointReader(f) as r:
        _check_equal(r, arrays)
        assert r.metadata == {"format": "np"}
        for name in r:
            assert r.info(name).offset % max(1, r.get(name).itemsize) == 0  # type: ignore[operator]
    torch = _torch_or_none()
    if torch is not None:
        from safetensors.torch import save_file as save_torch

        t = torch.randn(3, 5, dtype=torch.bfloat16)
        save_torch({"t": t}, str(tmp_path / "bf.safetensors"))
        with CheckpointReader(tmp_path / "bf.safetensors") as r:
            assert r.info("t").dtype == "BF16"
            want = t.view(torch.int16).numpy().view(np.uint16)
            np.testing.assert_array_equal(r.get("t"), want)


# -- atomicity ------------------------------------------------------------------------
def test_output_appears_only_at_finalize(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    w = CheckpointWriter(out, max_shard_bytes=64)
    for i in range(4):
        w.add(f"w{i}", np.zeros(16, np.float32))
        assert not out.exists()
    w.write_text("README.md", "# merged\n")
    assert not out.exists()
    assert w.tmp_dir.parent == tmp_path and w.tmp_dir.name.startswith(".merged.isofast-tmp-")
    assert w.finalize() == out
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # temp folder renamed, nothing left
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode  # umask, not 0700
    assert (out / "README.md").read_text() == "# merged\n"
    with pytest.raises(RuntimeError, match="finalized"):
        w.add("late", np.zeros(1, np.float32))


def test_exception_in_with_block_aborts(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with pytest.raises(KeyError), CheckpointWriter(out) as w:
        w.add("w", np.zeros(4, np.float32))
        raise KeyError("boom")
    assert os.listdir(tmp_path) == []


def test_abort_cleans_up(tmp_path: Path) -> None:
    w = CheckpointWriter(tmp_path / "merged", max_shard_bytes=8)
    w.add("a", np.zeros(4, np.float32))
    w.add("b", np.zeros(4, np.float32))  # second shard: one closed, one open
    assert w.tmp_dir.exists()
    w.abort()
    w.abort()  # idempotent
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="aborted"):
        w.finalize()


def _disk_full(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_write_is_never_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import isofast.io.appender as appender_mod

    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="earlier write failed"), CheckpointWriter(out) as w:
        w.add("a", np.ones(2, np.float32))
        monkeypatch.setattr(appender_mod.DirectAppender, "append", _disk_full)
        monkeypatch.setattr(appender_mod.BufferedAppender, "append", _disk_full)
        with pytest.raises(CheckpointError, match=r"shard-00001.partial: cannot write: No space"):
            w.add("b", np.ones(2, np.float32))
        # the caller swallows the error and carries on
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("direct", ["1", "0"])
def test_failed_background_write_is_never_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str
) -> None:
    """A write that fails after add() returned (direct I/O writes in the background) still
    stops the publication, and the error reaches the caller."""
    import isofast.io.appender as appender_mod

    monkeypatch.setenv("ISOFAST_DIRECT_IO", direct)
    monkeypatch.setattr(appender_mod.os, "pwrite", _disk_full)
    out = tmp_path / "merged"
    full = pytest.raises(CheckpointError, match=r"No space.*disk is full")
    with full, CheckpointWriter(out) as w:
        w.add("a", np.ones(3 << 20, np.float32))  # more than one 8 MiB staging block
        w.add("b", np.ones(5, np.float32))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("direct", ["1", "0"])
def test_direct_and_buffered_files_are_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str
) -> None:
    """Both appenders give byte-identical files, for tensors that straddle staging blocks and
    end off any alignment; the file ends exactly at the last tensor."""
    rng = np.random.default_rng(5)
    tensors = {
        "big": rng.standard_normal((3 << 20) + 3).astype(np.float32),  # 12 MiB + 12 bytes
        "odd": rng.integers(0, 255, 4097, dtype=np.uint8),
        "tiny": np.arange(3, dtype=np.float64),
    }
    monkeypatch.setenv("ISOFAST_DIRECT_IO", direct)
    _write(tmp_path / "out", tensors)
    monkeypatch.setenv("ISOFAST_DIRECT_IO", "0" if direct == "1" else "1")
    _write(tmp_path / "other", tensors)
    a = (tmp_path / "out" / SINGLE_NAME).read_bytes()
    assert a == (tmp_path / "other" / SINGLE_NAME).read_bytes()
    from safetensors.numpy import load_file

    loaded = load_file(str(tmp_path / "out" / SINGLE_NAME))
    for name, t in tensors.items():
        np.testing.assert_array_equal(loaded[name], t)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        CheckpointWriter(out)
    assert os.listdir(tmp_path) == ["merged"]  # no temp folder left by the refusal

    _write(out, {"x": np.ones(3, np.float32)}, overwrite=True)
    assert sorted(os.listdir(out)) == [SINGLE_NAME]
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # old copy deleted

    empty = tmp_path / "empty"
    empty.mkdir()
    _write(empty, {"x": np.ones(3, np.float32)})  # an empty folder is fine
    assert os.listdir(empty) == [SINGLE_NAME]


def test_finalize_refuses_if_output_appeared(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    w = CheckpointWriter(out)
    w.add("x", np.ones(2, np.float32))
    out.mkdir()
    (out / "someone-else").write_text("hi")
    with pytest.raises(FileExistsError):
        w.finalize()
    w.abort()
    assert sorted(os.listdir(tmp_path)) == ["merged"]
    assert os.listdir(out) == ["someone-else"]


# -- side files -----------------------------------------------------------------------
def test_copy_side_files_and_write_text(tmp_path: Path) -> None:
    src = tmp_path / "base"
    src.mkdir()
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "README.md",
        "model.safetensors",
        "pytorch_model.bin",
        "model.safetensors.index.json",
    ):
        (src / name).write_text(f"from base: {name}")
    (tmp_path / "blob").write_text("linked tokenizer")
    (src / "tokenizer.model").symlink_to(tmp_path / "blob")

    out = tmp_path / "merged"
    with CheckpointWriter(out) as w:
        w.add("x", np.ones(2, np.float32))
        w.write_text("config.json", '{"edited": true}')
        w.write_text("isofast/merge.yaml", "method: iso_c\n")
        copied = w.copy_side_files(src)
        with pytest.raises(ValueError, match="plain relative"):
            w.write_text("../escape.txt", "x")
        with pytest.raises(ValueError, match="weight files"):
            w.write_text("model.safetensors", "x")
    assert copied == [
        "generation_config.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "vocab.json",
    ]
    assert (out / "config.json").read_text() == '{"edited": true}'  # not clobbered
    assert (out / "tokenizer.model").read_text() == "linked tokenizer"
    assert not (out / "tokenizer.model").is_symlink()
    assert (out / "isofast" / "merge.yaml").read_text() == "method: iso_c\n"
    assert not (out / "README.md").exists()
    with CheckpointReader(out) as r:
        assert r.names() == ["x"]

    dst = tmp_path / "plain"
    dst.mkdir()
    assert "config.json" in copy_side_files(src, dst)
    with pytest.raises(CheckpointError, match="not a folder"):
        copy_side_files(src / "config.json", dst)


# -- corrupt safetensors files --------------------------------------------------------
def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    out = _write(tmp_path / "m", {"first": np.ones(4, np.float32), "last": np.ones(8, np.float32)})
    f = out / SINGLE_NAME
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 5)
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(out)
    assert str(f) in str(e.value) and "'last'" in str(e.value) and "truncated" in str(e.value)

    with open(f, "r+b") as fh:
        fh.truncate(100)  # inside the header
    with pytest.raises(CheckpointError, match="truncated") as e:
        CheckpointReader(f)
    assert str(f) in str(e.value)

    with open(f, "r+b") as fh:
        fh.truncate(3)
    with pytest.raises(CheckpointError, match="too short") as e:
        CheckpointReader(f)
    assert str(f) in str(e.value)


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("header", "data", "match"),
    [
        pytest.param(
            {"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)},
            bytes(12),
            "'b'.*overlap.*'a'",
            id="overlap",
        ),
        pytest.param({"a": _entry("F32", [2], 0, 8)}, bytes(4), "'a'.*past the end", id="range"),
        pytest.param({"a": _entry("F32", [3], 0, 8)}, bytes(12), "'a'.*needs 12", id="shape"),
        pytest.param({"a": _entry("Q7", [2], 0, 2)}, bytes(2), "'a'.*unknown dtype 'Q7'", id="dt"),
        pytest.param({"a": _entry("F4", [2], 0, 1)}, bytes(1), "'a'.*sub-byte", id="f4"),
        pytest.param({"a": _entry("F32", [-1], 0, 0)}, b"", "'a'.*shape", id="neg-shape"),
        pytest.param({"a": _entry("F32", [1], 8, 4)}, bytes(8), "'a'.*data_offsets", id="order"),
        pytest.param({"a": {"dtype": "F32"}}, b"", "'a'.*lacks shape", id="missing"),
        pytest.param({"__metadata__": {"k": 1}}, b"", "__metadata__", id="metadata"),
    ],
)
def test_corrupt_headers(tmp_path: Path, header: dict[str, Any], data: bytes, match: str) -> None:
    f = _raw_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CheckpointError, match=match) as e:
        CheckpointReader(f)
    assert str(f) in str(e.value)


def test_garbage_headers(tmp_path: Path) -> None:
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        CheckpointReader(f)
    f.write_bytes(struct.pack("<Q", 5) + b"{abc}")
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        CheckpointReader(f)
    raw = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
    raw += b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(2))
    with pytest.raises(CheckpointError, match="names tensor 'a' twice"):
        CheckpointReader(f)


def test_reader_tolerates_padding_and_zero_size(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "np"},
        "z": _entry("F32", [0, 3], 0, 0),
        "a": _entry("I16", [2], 0, 4),
        "z2": _entry("F16", [0], 4, 4),
    }
    raw = json.dumps(header).encode() + b"   "
    f = tmp_path / "pad.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + np.array([7, -7], "<i2").tobytes())
    with SafetensorsFile(f) as sf:
        assert sf.metadata == {"format": "np"}
        np.testing.assert_array_equal(sf.get("a"), [7, -7])
        assert sf.get("z").shape == (0, 3)


# -- sharded folders ------------------------------------------------------------------
def _sharded(tmp_path: Path) -> Path:
    arrays = {f"w{i}": np.full(4, i, np.float32) for i in range(4)}
    return _write(tmp_path / "sh", arrays, max_shard_bytes=32)


def test_missing_shard(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    (out / shard_name(2, 2)).unlink()
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(out)
    msg = str(e.value)
    assert str(out / INDEX_NAME) in msg and shard_name(2, 2) in msg and "missing" in msg
    assert "'w2'" in msg


def test_index_names_tensor_not_in_shard(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    index = json.loads((out / INDEX_NAME).read_text())
    index["weight_map"]["ghost"] = shard_name(1, 2)
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'ghost'.*has no such tensor") as e:
        CheckpointReader(out)
    assert shard_name(1, 2) in str(e.value)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    from safetensors.numpy import save_file

    save_file(
        {"w0": np.zeros(4, np.float32), "w2": np.full(4, 2, np.float32)},
        str(out / shard_name(2, 2)),
    )
    with pytest.raises(CheckpointError, match="'w0' appears in two shards") as e:
        CheckpointReader(out)
    assert shard_name(1, 2) in str(e.value) and shard_name(2, 2) in str(e.value)


def test_index_path_traversal_and_bad_json(tmp_path: Path) -> None:
    out = _sharded(tmp_path)
    (out / INDEX_NAME).write_text(json.dumps({"weight_map": {"w0": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="not a plain relative"):
        CheckpointReader(out)
    (out / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointReader(out)
    (out / INDEX_NAME).write_text("{}")
    with pytest.raises(CheckpointError, match="weight_map"):
        CheckpointReader(out)


def test_folder_resolution(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CheckpointReader(tmp_path / "nope")
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        CheckpointReader(d)
    from safetensors.numpy import save_file

    save_file({"a": np.ones(2, np.float32)}, str(d / "adapter_model.safetensors"))
    with CheckpointReader(d) as r:  # a lone non-standard name is accepted
        assert r.names() == ["a"]
    save_file({"b": np.ones(2, np.float32)}, str(d / "other.safetensors"))
    with pytest.raises(CheckpointError, match="several safetensors files"):
        CheckpointReader(d)
    save_file({"c": np.ones(2, np.float32)}, str(d / SINGLE_NAME))
    with CheckpointReader(d) as r:  # model.safetensors wins
        assert r.names() == ["c"]
    with pytest.raises(KeyError, match="'zzz'"):
        r.info("zzz")


# -- torch pickles --------------------------------------------------------------------
def _torch_or_none() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


def test_torch_state_dict(tmp_path: Path, torch: Any) -> None:
    sd = {
        "w": torch.randn(3, 4),
        "h": torch.randn(2, 2, dtype=torch.bfloat16),
        "i": torch.arange(5),
        "t": torch.randn(4, 3).t(),  # non-contiguous
    }
    f = tmp_path / "model.pt"
    torch.save(sd, f)
    with CheckpointReader(f) as r:
        assert r.names() == ["w", "h", "i", "t"]
        assert r.info("h").dtype == "BF16" and r.info("h").nbytes == 8
        assert r.info("w").dtype == "F32" and r.info("w").offset is None
        assert r.info("i").dtype == "I64"
        np.testing.assert_array_equal(r.get("w"), sd["w"].numpy())
        np.testing.assert_array_equal(r.get("t"), sd["t"].numpy())
        h = r.get("h")
        assert h.dtype == np.uint16 and not h.flags.writeable
        np.testing.assert_array_equal(h, sd["h"].view(torch.int16).numpy().view(np.uint16))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    with CheckpointReader(tmp_path / "wrapped.pth") as r:
        assert r.names() == list(sd)


def test_torch_sharded_bin_folder(tmp_path: Path, torch: Any) -> None:
    d = tmp_path / "hf"
    d.mkdir()
    torch.save({"a": torch.ones(2)}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, d / "pytorch_model-00002-of-00002.bin")
    index = {
        "metadata": {"total_size": 20},
        "weight_map": {
            "a": "pytorch_model-00001-of-00002.bin",
            "b": "pytorch_model-00002-of-00002.bin",
        },
    }
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with CheckpointReader(d) as r:
        assert r.names() == ["a", "b"]
        np.testing.assert_array_equal(r.get("b"), np.zeros(3, np.float32))


def test_torch_pickled_module_refused(tmp_path: Path, torch: Any) -> None:
    f = tmp_path / "module.bin"
    torch.save(torch.nn.Linear(3, 2), f)
    with pytest.raises(CheckpointError, match="allow_pickle=True") as e:
        CheckpointReader(f)
    assert str(f) in str(e.value)
    with CheckpointReader(f, allow_pickle=True) as r:
        assert sorted(r.names()) == ["bias", "weight"]
        assert r.info("weight").shape == (2, 3)


def test_torch_garbage_file(tmp_path: Path, torch: Any) -> None:
    f = tmp_path / "junk.pt"
    f.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(CheckpointError, match=r"torch\.load failed") as e:
        CheckpointReader(f)
    assert str(f) in str(e.value)


def test_data_at_the_file_page_phase_is_written_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors placed in memory at the page phase their planned shard gives take the writer's
    zero-copy route (with direct I/O); the file is the same as the buffered writer's, across
    a shard break too."""
    from isofast.output_ring import OutputRing

    rng = np.random.default_rng(11)
    sizes = [5, (1 << 20) + 6, 3 << 19, 7, (1 << 21) + 2]  # bytes; a shard break before the last
    data = [rng.integers(0, 255, n, dtype=np.uint8) for n in sizes]
    files = []
    for direct in ("1", "0"):
        monkeypatch.setenv("ISOFAST_DIRECT_IO", direct)
        out = tmp_path / f"direct{direct}"
        ring = OutputRing(sum(sizes) + 16 * 4096)
        with CheckpointWriter(out, max_shard_bytes=3 << 20) as w:
            planned = w.plan_shards((f"t{i}", "U8", d.shape) for i, d in enumerate(data))
            for shard in planned:
                part = PlannedShardWriter(w.tmp_dir, shard)
                for name, phase in shard.page_phases().items():
                    d = data[int(name[1:])]
                    arr, _ = ring.empty(d.shape, "uint8", phase)
                    arr[:] = d
                    part.add(name, arr, "U8")
                w.add_shard(part.close())
        shards = sorted(p for p in out.iterdir() if p.suffix == ".safetensors")
        assert len(shards) == 2
        files.append([p.read_bytes() for p in shards])
        with CheckpointReader(out) as r:
            for i, d in enumerate(data):
                np.testing.assert_array_equal(r.get(f"t{i}"), d)
    assert files[0] == files[1]


def test_resumed_shards_are_kept_in_any_order_and_stale_ones_redone(tmp_path: Path) -> None:
    """A resumed writer keeps every finished shard that checks out, whatever order they were
    finished in (Ray tasks); a finished shard that is not one of the new plan's is deleted
    and written again, never published."""
    rng = np.random.default_rng(5)
    tensors = {f"t{i}": rng.standard_normal(50).astype(np.float32) for i in range(8)}
    entries = [(n, "F32", x.shape) for n, x in tensors.items()]
    out = tmp_path / "out"

    def write(w: CheckpointWriter, shard: Any) -> None:
        part = PlannedShardWriter(w.tmp_dir, shard)
        for name in shard.names:
            part.add(name, tensors[name], "F32")
        w.add_shard(part.close())

    with pytest.raises(KeyboardInterrupt), CheckpointWriter(out, 450, fingerprint="f") as w:
        planned = w.plan_shards(entries)
        write(w, planned[2])  # finished out of order: shards 3 and 1
        write(w, planned[0])
        raise KeyboardInterrupt
    with CheckpointWriter(out, 450, fingerprint="f", resume=True) as w:
        assert w.resumed_names == set(planned[0].names) | set(planned[2].names)
        todo = w.pending(w.plan_shards(entries))
        assert [s.file for s in todo] == [planned[1].file, *(s.file for s in planned[3:])]
        for shard in todo:
            write(w, shard)
    with CheckpointWriter(out.with_name("want"), 450) as w:
        for name, x in tensors.items():
            w.add(name, x)
    assert _files(out) == _files(out.with_name("want"))
    other = tmp_path / "other"
    with pytest.raises(KeyboardInterrupt), CheckpointWriter(other, 450, fingerprint="g") as w:
        w2 = w.plan_shards(entries)
        write(w, w2[0])
        raise KeyboardInterrupt
    with CheckpointWriter(other, 900, fingerprint="g", resume=True) as w:
        relaid = w.plan_shards(entries)  # another shard size: shard 1 is not the same
        assert [s.file for s in w.pending(relaid)] == [s.file for s in relaid]
        assert not (w.tmp_dir / w2[0].file).exists()
        for shard in relaid:
            write(w, shard)
    assert [p.name for p in other.iterdir() if p.suffix == ".partial"] == []
    with CheckpointWriter(tmp_path / "want900", 900) as w:
        for name, x in tensors.items():
            w.add(name, x)
    assert _files(other) == _files(tmp_path / "want900")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
