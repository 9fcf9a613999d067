"""Malformed checkpoints: isofast accepts none that the safetensors library refuses.

Each safetensors case below is a file the `safetensors` library refuses; isofast must refuse
it too, with a `CheckpointError` that names the file and (where one is involved) the tensor.
A few cases isofast refuses although the library takes them (it is deliberately stricter:
the format says the header starts with '{' and keys do not repeat). Valid edge cases (empty
header, zero-size and scalar tensors, padding) must read the same in both. The sharded
index reader and the torch reader get the same treatment for their own malformations, and
`isofast merge` refuses (and publishes nothing) where issue "Nothing lost, nothing crashes"
found it merging an overlapping file and one with bytes appended.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from isofast import cli
from isofast.io import DTYPE_ITEMSIZE, CheckpointError, CheckpointReader, SafetensorsFile

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402


def _entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _file(header: bytes | dict[str, Any], data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


E = b'"e":{"dtype":"U8","shape":[1],"data_offsets":[0,1]'  # an entry left open for extra keys


@dataclass(frozen=True)
class Case:
    blob: bytes
    match: str  # regex the isofast message must match
    tensor: str | None = None  # the tensor the message must name


# Files the safetensors library refuses.
REFUSED: dict[str, Case] = {
    "overlap": Case(
        _file({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12)),
        "overlap tensor 'a'",
        "b",
    ),
    "overlap-identical": Case(
        _file({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 0, 8)}, bytes(8)),
        "overlap",
        "b",
    ),
    "gap": Case(
        _file({"a": _entry("F32", [1], 0, 4), "b": _entry("F32", [1], 8, 12)}, bytes(12)),
        "gap of 4 bytes after the end of tensor 'a'",
        "b",
    ),
    "gap-at-start": Case(_file({"a": _entry("U8", [2], 2, 4)}, bytes(4)), "gap", "a"),
    "trailing-bytes": Case(
        _file({"a": _entry("F32", [1], 0, 4)}, bytes(4) + b"\0\0\0"),
        "3 bytes follow the last tensor's data",
    ),
    "trailing-bytes-no-tensors": Case(_file({}, b"x"), "1 bytes follow"),
    "zero-size-past-data": Case(
        _file({"a": _entry("U8", [1], 0, 1), "z": _entry("U8", [0], 5, 5)}, bytes(1)),
        "past the end",
        "z",
    ),
    "truncated-data": Case(_file({"a": _entry("F32", [2], 0, 8)}, bytes(4)), "truncated", "a"),
    "header-length-past-eof": Case(_file(b"{}", length=12), "only 2 follow"),
    "header-length-huge": Case(_file(b"{}", length=2**40), "header length"),
    "header-length-zero": Case(_file(b"", length=0), "does not start with"),
    "shorter-than-length-field": Case(b"\x02\0\0\0", "too short"),
    "bad-json": Case(_file(b"{abc}"), "not valid UTF-8 JSON"),
    "bad-utf8": Case(_file(b'{"\xff":1}'), "not valid UTF-8 JSON"),
    "json-array": Case(_file(b"[]"), "does not start with"),
    "nul-padding": Case(_file(b"{}\0\0"), "not valid UTF-8 JSON"),
    "entry-not-object": Case(_file({"a": None}), "is NoneType, not an object", "a"),
    "missing-keys": Case(_file({"a": {"dtype": "F32"}}), "lacks shape, data_offsets", "a"),
    "negative-shape": Case(_file({"a": _entry("F32", [-1], 0, 0)}), "shape", "a"),
    "shape-past-u64": Case(_file({"a": _entry("U8", [0, 2**64], 0, 0)}), "64-bit", "a"),
    "float-shape": Case(_file({"a": _entry("U8", [1.0], 0, 1)}, bytes(1)), "shape", "a"),
    "minus-zero-shape": Case(
        _file(b'{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'), "shape", "a"
    ),
    "count-overflow-before-zero": Case(
        _file({"a": _entry("U8", [2**32, 2**32, 0], 0, 0)}), "64-bit count", "a"
    ),
    "unknown-dtype": Case(_file({"a": _entry("Q7", [2], 0, 2)}, bytes(2)), "unknown dtype", "a"),
    "lowercase-dtype": Case(
        _file({"a": _entry("f32", [1], 0, 4)}, bytes(4)), "unknown dtype 'f32'", "a"
    ),
    "size-mismatch": Case(_file({"a": _entry("F32", [3], 0, 8)}, bytes(8)), "needs 12", "a"),
    "reversed-offsets": Case(_file({"a": _entry("F32", [1], 8, 4)}, bytes(8)), "0 <= begin", "a"),
    "float-offsets": Case(_file({"a": _entry("U8", [1], 0, 1.0)}, bytes(1)), "data_offsets", "a"),
    "three-offsets": Case(
        _file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, bytes(1)),
        "data_offsets",
        "a",
    ),
    "10^18-elements": Case(
        _file({"a": _entry("U8", [10**18], 0, 10**18)}, bytes(8)), "past the end", "a"
    ),
    "10^18-elements-small-range": Case(
        _file({"a": _entry("U8", [10**9, 10**9], 0, 4)}, bytes(4)), "needs 10{18}", "a"
    ),
    "bit-count-overflow": Case(
        _file({"a": _entry("F32", [10**9, 10**9], 0, 4)}, bytes(4)), "too large", "a"
    ),
    "duplicate-field": Case(
        _file(b'{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', bytes(1)),
        "key 'dtype' twice",
        "a",
    ),
    "metadata-twice": Case(
        _file(b'{"__metadata__":{"k":"a"},"__metadata__":{"k":"b"}}'), "__metadata__ twice"
    ),
    "metadata-int-value": Case(_file({"__metadata__": {"k": 1}}), "__metadata__"),
    "metadata-list": Case(_file({"__metadata__": []}), "__metadata__"),
    "nan-in-extra-key": Case(_file(b"{" + E + b',"x":NaN}}', bytes(1)), "NaN"),
    "number-past-f64": Case(
        _file(b"{" + E + b',"x":1' + b"0" * 400 + b"}}", bytes(1)), "out of range"
    ),
    "number-5000-digits": Case(
        _file(b"{" + E + b',"x":1' + b"0" * 5000 + b"}}", bytes(1)), "out of range"
    ),
    "float-past-f64": Case(_file(b"{" + E + b',"x":1e400}}', bytes(1)), "out of range"),
    "lone-surrogate-name": Case(
        _file(b'{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', bytes(1)),
        "surrogate",
    ),
    "lone-surrogate-extra": Case(_file(b"{" + E + b',"x":"\\udc00"}}', bytes(1)), "surrogate", "e"),
    "control-char": Case(
        _file(b'{"a\x01":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', bytes(1)), "JSON"
    ),
    "nested-too-deep": Case(
        _file(b"{" + E + b',"x":' + b"[" * 126 + b"]" * 126 + b"}}", bytes(1)),
        "deeper than 127",
        "e",
    ),
    "nested-past-python-recursion": Case(
        _file(b"{" + E + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}", bytes(1)), "JSON"
    ),
}

# Files the library takes but isofast refuses, on purpose.
STRICTER: dict[str, Case] = {
    "duplicate-tensor": Case(
        _file(
            b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            bytes(1),
        ),
        "names tensor 'a' twice",
    ),
    "duplicate-metadata-key": Case(
        _file(b'{"__metadata__":{"k":"a","k":"b"}}'), "__metadata__ has key 'k' twice"
    ),
    "leading-space": Case(_file(b" {}"), "does not start with '{'"),
    # numpy and torch cannot make arrays of these shapes (their strides overflow int64).
    "zero-then-huge-dims": Case(
        _file({"z": _entry("U8", [0, 2**64 - 1, 2**64 - 1], 0, 0)}), "cannot be an array", "z"
    ),
    "zero-then-dims-past-int64": Case(
        _file({"z": _entry("F32", [0, 2**62], 0, 0)}), "cannot be an array", "z"
    ),
    "sub-byte-dtype": Case(_file({"a": _entry("F4", [2], 0, 1)}, bytes(1)), "sub-byte", "a"),
}


def _valid_cases() -> dict[str, bytes]:
    cases = {
        "empty-header": _file({}),
        "empty-header-padded": _file(b"{}" + b" " * 6),
        "whitespace-padding": _file(b"{}\t\n\r "),
        "scalar": _file({"s": _entry("F32", [], 0, 4)}, b"\0\0\x80?"),
        "zero-size-everywhere": _file(
            {
                "z0": _entry("F32", [0, 3], 0, 0),
                "a": _entry("I16", [2], 0, 4),
                "z1": _entry("F16", [0], 4, 4),
                "b": _entry("U8", [1], 4, 5),
                "z2": _entry("BF16", [5, 0], 5, 5),
            },
            bytes(5),
        ),
        "zero-size-only": _file({"z": _entry("F64", [0], 0, 0)}),
        "zero-then-large-dims": _file({"z": _entry("F64", [0, 2**30, 2**29], 0, 0)}),
        "metadata-null": _file({"__metadata__": None}),
        "extra-keys": _file(
            b"{" + E + b',"x":[1,{"y":null}],"n":-0,"big":' + b"9" * 300 + b"}}", bytes(1)
        ),
        "nested-127-deep": _file(b"{" + E + b',"x":' + b"[" * 125 + b"]" * 125 + b"}}", bytes(1)),
        "non-ascii-and-nul-names": _file(
            {"é": _entry("U8", [1], 0, 1), "\0": _entry("U8", [1], 1, 2)}, bytes(2)
        ),
        "surrogate-pair": _file(b'{"\\ud83d\\ude00":' + E[4:] + b"}}", bytes(1)),
    }
    # Every dtype isofast knows, two elements each, tiled.
    header: dict[str, Any] = {}
    cursor = 0
    for dtype, itemsize in sorted(DTYPE_ITEMSIZE.items()):
        header[dtype.lower()] = _entry(dtype, [2], cursor, cursor + 2 * itemsize)
        cursor += 2 * itemsize
    cases["every-dtype"] = _file(header, bytes(cursor))
    return cases


VALID = _valid_cases()


def _write(tmp_path: Path, blob: bytes) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    return path


def _library_refuses(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
    except Exception as e:  # SafetensorError, or whatever the library raises
        return str(e) or type(e).__name__
    return None


def _isofast_error(path: Path, opener: Callable[[Path], Any]) -> CheckpointError:
    with pytest.raises(CheckpointError) as e:
        opener(path).close()
    return e.value


@pytest.mark.parametrize("name", REFUSED)
def test_isofast_refuses_what_the_library_refuses(tmp_path: Path, name: str) -> None:
    case = REFUSED[name]
    path = _write(tmp_path, case.blob)
    assert _library_refuses(path) is not None, f"{name}: the library accepts this file"
    for opener in (SafetensorsFile, CheckpointReader):
        err = _isofast_error(path, opener)
        msg = str(err)
        assert str(path) in msg, msg
        assert case.tensor is None or f"tensor {case.tensor!r}" in msg, msg
        assert re.search(case.match, msg), f"{name}: {msg}"


@pytest.mark.parametrize("name", STRICTER)
def test_isofast_is_stricter_than_the_library_here(tmp_path: Path, name: str) -> None:
    case = STRICTER[name]
    path = _write(tmp_path, case.blob)
    msg = str(_isofast_error(path, SafetensorsFile))
    assert str(path) in msg and re.search(case.match, msg), msg
    assert case.tensor is None or f"tensor {case.tensor!r}" in msg, msg


@pytest.mark.parametrize("name", VALID)
def test_valid_edge_cases_read_as_the_library_reads_them(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, VALID[name])
    assert _library_refuses(path) is None
    with safe_open(str(path), framework="numpy") as lib, SafetensorsFile(path) as sf:
        assert set(lib.keys()) == set(sf.names())
        for key in lib.keys():  # noqa: SIM118 - safe_open is not a mapping
            info = sf.info(key)
            assert lib.get_slice(key).get_shape() == list(info.shape)
            assert lib.get_slice(key).get_dtype() == info.dtype
            assert sf.get(key).shape == info.shape
            assert sf.get(key).nbytes == info.nbytes
        assert dict(lib.metadata() or {}) == sf.metadata


def test_huge_claimed_shapes_allocate_nothing(tmp_path: Path) -> None:
    """A header claiming 10^18 elements (or a 10^18-byte header) is refused from the header
    alone: nothing near that size is allocated or read."""
    paths = [
        _write(tmp_path, _file({"a": _entry("U8", [10**18], 0, 10**18)}, bytes(8))),
        tmp_path / "b.safetensors",
    ]
    paths[1].write_bytes(_file(b"{}", length=10**18))
    tracemalloc.start()
    try:
        for path in paths:
            with pytest.raises(CheckpointError):
                SafetensorsFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# -- CLI: the two files the issue found merged and published ---------------------------
@pytest.mark.parametrize("damage", ["overlap", "trailing"])
def test_merge_refuses_and_publishes_nothing(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.numpy import save_file

    arrays = {"w": np.ones((4, 4), np.float32), "b": np.zeros(4, np.float32)}
    base, ft = tmp_path / "base.safetensors", tmp_path / "ft.safetensors"
    save_file(arrays, str(base))
    save_file({k: v + 1 for k, v in arrays.items()}, str(ft))
    raw = ft.read_bytes()
    if damage == "trailing":
        ft.write_bytes(raw + b"\0" * 64)
    else:  # point 'w' at the bytes of 'b' plus its own: same length, overlapping ranges
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header["w"]["data_offsets"] = [0, 64]
        header["b"]["data_offsets"] = [48, 64]
        new = json.dumps(header).encode()
        ft.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :][:64])
    assert _library_refuses(ft) is not None
    out = tmp_path / "out"
    argv = ["merge", str(out), "--base", str(base), "--model", str(ft), "--method"]
    code = cli.main([*argv, "weight_average", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and str(ft) in err, err
    assert not out.exists()


# -- sharded index -----------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    from safetensors.numpy import save_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(folder / "s1.safetensors"))
    save_file({"b": np.ones(2, np.float32)}, str(folder / "s2.safetensors"))
    (folder / "sub").mkdir()
    return folder


INDEXES: dict[str, tuple[bytes, str]] = {
    "bad-json": (b"{not json", "not valid JSON"),
    "bad-utf8": (b'{"weight_map":{"a":"s1.safetensors\xff"}}', "not valid JSON"),
    "top-level-list": (b"[]", "no 'weight_map' object"),
    "no-weight-map": (b"{}", "no 'weight_map' object"),
    "weight-map-list": (b'{"weight_map":["s1.safetensors"]}', "no 'weight_map' object"),
    "shard-not-string": (b'{"weight_map":{"a":1}}', "maps to 1, not a file name"),
    "shard-empty": (b'{"weight_map":{"a":""}}', "not a file name"),
    "parent-dir": (b'{"weight_map":{"a":"../s1.safetensors"}}', "not a plain relative"),
    "parent-inside": (b'{"weight_map":{"a":"sub/../../x"}}', "not a plain relative"),
    "absolute": (b'{"weight_map":{"a":"/etc/passwd"}}', "not a plain relative"),
    "backslash": (b'{"weight_map":{"a":"..\\\\s1.safetensors"}}', "not a plain relative"),
    "nul-in-path": (b'{"weight_map":{"a":"s1\\u0000.safetensors"}}', "not a plain relative"),
    "surrogate-path": (b'{"weight_map":{"a":"\\ud800.safetensors"}}', "not a plain relative"),
    "surrogate-name": (b'{"weight_map":{"\\ud800":"s1.safetensors"}}', "not valid Unicode"),
    "name-too-long": (b'{"weight_map":{"a":"' + b"x" * 300 + b'"}}', "cannot open"),
    "shard-is-folder": (b'{"weight_map":{"a":"sub"}}', "missing"),
    "shard-is-index": (
        b'{"weight_map":{"a":"model.safetensors.index.json"}}',
        "not a safetensors file",
    ),
    "tensor-not-in-shard": (b'{"weight_map":{"a":"s2.safetensors"}}', "has no such tensor"),
    "deep-nesting": (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    "number-5000-digits": (b'{"x":1' + b"0" * 5000 + b"}", "not valid JSON"),
}


@pytest.mark.parametrize("name", INDEXES)
def test_malformed_index(sharded: Path, name: str) -> None:
    text, match = INDEXES[name]
    index = sharded / "model.safetensors.index.json"
    index.write_bytes(text)
    with pytest.raises(CheckpointError, match=match) as e:
        CheckpointReader(sharded)
    assert str(index) in str(e.value)


# -- torch -------------------------------------------------------------------------------
def test_malformed_torch_files(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2, 3)}, good)
    raw = good.read_bytes()
    blobs = {
        "truncated.pt": raw[: len(raw) // 2],
        "garbage.pt": b"PK\x03\x04" + bytes(100),
        "empty.pt": b"",
        "pickle-only.pt": b"\x80\x02}q\x00.",  # a legacy file that is just a pickled dict
        "zeroed-tail.pt": raw[:-200] + bytes(200),
    }
    for name, blob in blobs.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(CheckpointError) as e, CheckpointReader(path) as r:
            for n in r.names():
                r.get(n)
        assert str(path) in str(e.value)


def _quantized(torch: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


def test_torch_tensors_without_plain_data(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    cases = {
        "meta": ({"w": torch.empty(3, device="meta")}, "device meta"),
        "sparse": ({"w": torch.eye(3).to_sparse()}, "layout"),
        "quantized": ({"w": _quantized(torch)}, "quantized"),
        "surrogate": ({"\ud800": torch.ones(2)}, "not valid Unicode"),
    }
    for name, (sd, match) in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(sd, path)
        with warnings.catch_warnings(), pytest.raises(CheckpointError, match=match) as e:
            warnings.simplefilter("ignore", UserWarning)  # torch's note on sparse tensors
            CheckpointReader(path)
        assert str(path) in str(e.value) and "tensor '" in str(e.value)
    # A conjugate view is read as its values.
    path = tmp_path / "conj.pt"
    torch.save({"c": torch.tensor([1 + 2j], dtype=torch.complex64).conj()}, path)
    with CheckpointReader(path) as r:
        np.testing.assert_array_equal(r.get("c"), np.array([1 - 2j], np.complex64))


_BOMB_SCRIPT = r"""
import sys, warnings, zipfile
import torch
from isofast.io import CheckpointError, CheckpointReader
warnings.simplefilter("ignore")

def rezip(path, pickle_bytes):
    torch.save({"w": torch.ones(1)}, path)
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, body in members:
            z.writestr(name, pickle_bytes if name.endswith("data.pkl") else body)

# {key: 0}: key a tuple of 9 copies (memo GETs) of a tuple of 9 copies of ... 10 levels.
shared = b"\x80\x02}(X\x01\x00\x00\x00xq\x00" + b"h\x00" * 8 + b"t"
for level in range(1, 11):
    shared += b"q" + bytes([level]) + b"(" + (b"h" + bytes([level])) * 9 + b"t"
deep = b"\x80\x02}K\x01" + b"\x85" * 1_000_000  # {(((...(1,),)...),): 0}
for name, body in {"shared": shared, "deep": deep}.items():
    path = f"{sys.argv[1]}/{name}.pt"
    rezip(path, body + b"K\x00s.")
    try:
        CheckpointReader(path)
    except CheckpointError as e:
        assert path in str(e) and "its pickle" in str(e), e
        print(name, "refused")
    else:
        sys.exit(f"{name}: accepted")
"""


def test_torch_pickle_bombs_are_refused_before_unpickling(tmp_path: Path) -> None:
    """A pickle that shares one tuple many times (9**10 leaves from a few hundred bytes) or
    nests tuples a million deep: unpickling it as a dict key hashes it, taking hours or
    overflowing the C stack (SIGSEGV). The reader measures the pickle first. Run in a child
    process, so that a regression fails this test instead of killing pytest."""
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, "-c", _BOMB_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert proc.stdout.split() == ["shared", "refused", "deep", "refused"]
