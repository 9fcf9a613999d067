"""One safetensors file: header parsing and validation, memory-mapped zero-copy views.

Layout: an 8-byte little-endian header length N, N bytes of JSON (may be trailed by
spaces), then the data section. The header maps each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data section)
and may hold a "__metadata__" map of strings. The data ranges, sorted, tile the data section
exactly: no overlap, no gap, no bytes after the last tensor.

The reader accepts no file the safetensors library refuses (tests/test_malformed.py and
tests/test_fuzz.py check this against the library); it is stricter in a few places: a
header must start with '{' (as the format says), keys may not repeat, sub-byte dtypes are
not supported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import reprlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from isofast.io.dtypes import DTYPE_ITEMSIZE, SUB_BYTE_DTYPES, numpy_dtype
from isofast.io.errors import CheckpointError
from isofast.io.tensor_info import TensorInfo

__all__ = [
    "MAX_HEADER_BYTES",
    "METADATA_KEY",
    "SafetensorsFile",
    "encode_header",
    "is_safetensors_file",
    "pack_header_length",
]

METADATA_KEY = "__metadata__"
# The safetensors library refuses headers above 100 MB; so do we (a garbage length field
# would otherwise make us read gigabytes of "header").
MAX_HEADER_BYTES = 100_000_000
_LEN = struct.Struct("<Q")


def is_safetensors_file(path: Path) -> bool:
    """Sniff the first bytes: a sane header length followed by '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = _LEN.unpack(head[:8])
    return 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{"


# The safetensors library (serde_json, usize fields) refuses what these mirror: numbers that
# do not fit a 64-bit size, JSON nested deeper than its recursion limit allows, NaN/Infinity
# literals, lone UTF-16 surrogates. A file it refuses must not be accepted here.
_U64_MAX = 2**64 - 1
_I64_MAX = 2**63 - 1
_MAX_DEPTH = 127  # deepest nesting of objects/arrays serde_json accepts in a header
_F64_MAX = float.fromhex("0x1.fffffffffffffp+1023")


class _JsonRefused(Exception):
    """Raised from the JSON hooks for what serde_json refuses and Python's json accepts."""


class _Object(dict[str, Any]):
    """A JSON object that remembers the keys it saw more than once (the last value wins)."""

    __slots__ = ("dups",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.dups: list[str] = []
        if len(self) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen and key not in self.dups:
                    self.dups.append(key)
                seen.add(key)


def _parse_int(text: str) -> int | float:
    if text == "-0":
        return -0.0  # serde_json reads "-0" as a float: not a size
    try:
        value = int(text)
    except ValueError:  # more digits than Python converts: far past f64 too
        raise _JsonRefused(f"number {text[:24]}... is out of range") from None
    if value > _U64_MAX or value < -(2**63):
        # serde_json falls back to f64 for integers past 64 bits; past f64 it refuses.
        try:
            float(value)
        except OverflowError:
            raise _JsonRefused(f"number {text[:24]}... is out of range") from None
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if abs(value) > _F64_MAX:
        raise _JsonRefused(f"number {text[:24]} is out of range")
    return value


def _parse_constant(text: str) -> float:
    raise _JsonRefused(f"{text} is not JSON")


def _decode_json(raw: bytes) -> Any:
    """Strict JSON: what Python's json and serde_json both accept (raises ValueError)."""
    return json.loads(
        raw.decode("utf-8"),
        object_pairs_hook=_Object,
        parse_int=_parse_int,
        parse_float=_parse_float,
        parse_constant=_parse_constant,
    )


def _check_string(s: str, where: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointError(
                f"{where}: string {_short(s)} holds a lone UTF-16 surrogate"
            ) from None


def _check_json(value: Any, depth: int, where: str) -> None:
    """Nesting depth and strings of a decoded JSON value (serde_json's limits)."""
    if isinstance(value, str):
        _check_string(value, where)
    elif isinstance(value, (dict, list)):
        if depth > _MAX_DEPTH:
            raise CheckpointError(f"{where}: JSON nested deeper than {_MAX_DEPTH} levels")
        if isinstance(value, _Object) and value.dups:
            raise CheckpointError(f"{where}: key {value.dups[0]!r} appears twice in one object")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check_string(key, where)
            _check_json(item, depth + 1, where)


def _is_size(x: object) -> bool:
    """A JSON number the format reads as a size (u64)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _U64_MAX


def _parse_entry(path: Path, name: str, entry: object) -> tuple[TensorInfo, int, int]:
    """A header entry as (info without offset, begin, end) relative to the data section."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is {type(entry).__name__}, not an object")
    if isinstance(entry, _Object) and entry.dups:
        raise CheckpointError(f"{where}: header entry has key {entry.dups[0]!r} twice")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise CheckpointError(f"{where}: header entry lacks {', '.join(missing)}")
    # Keys besides these are allowed (and ignored), but must be JSON the library reads.
    _check_json(entry, 2, where)
    dtype = entry["dtype"]
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: dtype {dtype!r} is not a string")
    if dtype in SUB_BYTE_DTYPES:
        raise CheckpointError(f"{where}: sub-byte dtype {dtype} is not supported")
    if dtype not in DTYPE_ITEMSIZE:
        known = ", ".join(sorted(DTYPE_ITEMSIZE))
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {known})")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise CheckpointError(
            f"{where}: shape {_short(shape)} is not a list of non-negative 64-bit ints"
        )
    # Sizes in Python ints (no overflow, nothing allocated), refused where the library's
    # checked 64-bit arithmetic overflows: element count left to right, then bits.
    numel = 1
    for d in shape:
        numel *= d
        if numel > _U64_MAX:
            raise CheckpointError(
                f"{where}: shape {_short(shape)} has more elements than a 64-bit count holds"
            )
    itemsize = DTYPE_ITEMSIZE[dtype]
    if numel * itemsize * 8 > _U64_MAX:
        raise CheckpointError(
            f"{where}: shape {_short(shape)} of {dtype} is too large (over 2**64 bits)"
        )
    # Stricter than the format: numpy and torch compute strides in signed 64 bits, so a shape
    # whose nonzero dimensions multiply past that (legal when another dimension is 0) can be
    # no array.
    if math.prod(d for d in shape if d) * itemsize > _I64_MAX:
        raise CheckpointError(
            f"{where}: shape {_short(shape)} of {dtype} cannot be an array (its nonzero "
            "dimensions span more than 2**63 bytes)"
        )
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_size(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(
            f"{where}: data_offsets {_short(offsets)} is not a pair [begin, end] with "
            "0 <= begin <= end"
        )
    begin, end = offsets
    nbytes = numel * itemsize
    if end - begin != nbytes:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}) span {end - begin} bytes but "
            f"{dtype}{list(shape)} needs {nbytes}"
        )
    info = TensorInfo(name=name, shape=tuple(shape), dtype=dtype, nbytes=nbytes, file=path)
    return info, begin, end


def _parse_metadata(path: Path, entry: object) -> dict[str, str]:
    if entry is None:  # the library reads null as "no metadata"
        return {}
    if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
        raise CheckpointError(f"{path}: {METADATA_KEY} is not a map of strings")
    if isinstance(entry, _Object) and entry.dups:
        raise CheckpointError(f"{path}: {METADATA_KEY} has key {entry.dups[0]!r} twice")
    _check_json(entry, 2, f"{path}: {METADATA_KEY}")
    return dict(entry)


# Values quoted in messages: a header may hold a shape of a million dims or a 1 MB string.
_SHORT = reprlib.Repr()
_SHORT.maxlist = _SHORT.maxdict = 8
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlong = 40


def _short(value: object) -> str:
    return _SHORT.repr(value)


class SafetensorsFile:
    """A validated, memory-mapped safetensors file.

    The header is read and checked at construction (dtypes known, offsets consistent with
    shapes, the data ranges tiling the data section exactly); tensor data is only touched by
    `get`, which returns read-only numpy views into the mapping. Every error is a
    `CheckpointError` that names the file and, where one is involved, the tensor.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - kept open until close()
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e.strerror or e}") from e
        try:
            size = os.fstat(f.fileno()).st_size
            self._infos, self.metadata, self.data_start = self._read_header(f, size)
            # Map once, from the same open file the header came from, so that header and
            # data cannot come from two different versions of the file. The file stays open
            # for `source` (the core reads from it directly) for the same reason.
            self._mm: mmap.mmap | None = (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
            )
        except BaseException:
            f.close()
            raise
        self._file: Any = f
        self.size = size

    def _read_header(self, f: Any, size: int) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
        path = self.path
        if size < 8:
            raise CheckpointError(
                f"{path}: file is {size} bytes, too short for the 8-byte header length "
                "(truncated, or not a safetensors file)"
            )
        (n,) = _LEN.unpack(f.read(8))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: header length field says {n} bytes (limit {MAX_HEADER_BYTES}); "
                "not a safetensors file, or corrupt"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: header length field says {n} bytes but only {size - 8} follow it "
                "(file truncated?)"
            )
        raw = f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{path}: header ends early (file truncated while reading?)")
        # The format: the header starts with '{' (it may be padded with trailing spaces).
        if not raw.startswith(b"{"):
            raise CheckpointError(f"{path}: header does not start with '{{'; not safetensors")
        try:
            header = _decode_json(raw)
        except (_JsonRefused, ValueError, RecursionError) as e:  # also UnicodeDecodeError
            raise CheckpointError(f"{path}: header is not valid UTF-8 JSON: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object")
        if isinstance(header, _Object) and header.dups:
            what = header.dups[0]
            if what == METADATA_KEY:
                raise CheckpointError(f"{path}: header has {METADATA_KEY} twice")
            raise CheckpointError(f"{path}: header names tensor {what!r} twice")

        data_start = 8 + n
        data_size = size - data_start
        metadata: dict[str, str] = {}
        spans: list[tuple[int, int, TensorInfo]] = []
        for name, entry in header.items():
            _check_string(name, f"{path}: tensor name")
            if name == METADATA_KEY:
                metadata = _parse_metadata(path, entry)
                continue
            info, begin, end = _parse_entry(path, name, entry)
            spans.append((begin, end, info))

        # The format: the data ranges, sorted, tile the data section exactly: no overlap, no
        # gap, nothing after the last one (the safetensors library checks all three).
        spans.sort(key=lambda span: (span[0], span[1]))
        cursor, prev = 0, None
        for begin, end, info in spans:
            where = f"{path}: tensor {info.name!r}: data_offsets [{begin}, {end})"
            if begin < cursor:
                raise CheckpointError(f"{where} overlap tensor {prev!r}, which ends at {cursor}")
            if end > data_size:
                raise CheckpointError(
                    f"{where} run past the end of the data section ({data_size} bytes; "
                    "file truncated?)"
                )
            if begin > cursor:
                after = "the start of the data" if prev is None else f"the end of tensor {prev!r}"
                raise CheckpointError(
                    f"{where} leave a gap of {begin - cursor} bytes after {after}; "
                    "tensor data must be contiguous"
                )
            cursor, prev = end, info.name
        if cursor != data_size:
            last = (
                "the header lists no data" if prev is None else f"tensor {prev!r} ends at {cursor}"
            )
            raise CheckpointError(
                f"{path}: {data_size - cursor} bytes follow the last tensor's data ({last}, "
                f"the data section holds {data_size} bytes); corrupt, or data appended"
            )
        infos = {
            info.name: dataclasses.replace(info, offset=data_start + begin)
            for begin, _, info in spans
        }
        return infos, metadata, data_start

    # -- queries (headers only) -------------------------------------------------------
    def names(self) -> list[str]:
        """Tensor names in data-offset order (the fastest order to read them in)."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    # -- data -------------------------------------------------------------------------
    def get(self, name: str) -> np.ndarray[Any, np.dtype[Any]]:
        """A read-only, zero-copy view of the tensor's bytes (BF16 as uint16, F8 as uint8)."""
        info = self.info(name)
        dtype = numpy_dtype(info.dtype)
        if info.nbytes == 0:
            empty = np.empty(info.shape, dtype=dtype)
            empty.flags.writeable = False
            return empty
        if self._mm is None:
            raise CheckpointError(f"{self.path}: file is closed; cannot read {name!r}")
        view = np.frombuffer(self._mm, dtype=dtype, count=info.numel, offset=info.offset or 0)
        return view.reshape(info.shape)

    def source(self, name: str) -> tuple[int, int]:
        """(file descriptor, byte offset) of the tensor's data, valid until `close()`."""
        info = self.info(name)
        if self._file.closed:
            raise CheckpointError(f"{self.path}: file is closed; cannot read {name!r}")
        return self._file.fileno(), info.offset or 0

    def prefetch(self, names: Iterable[str]) -> None:
        """Ask the kernel to start reading these tensors' pages (a hint; returns at once)."""
        self._advise(names, "MADV_WILLNEED")

    def release(self, names: Iterable[str]) -> None:
        """Unmap these tensors' pages from this process (they stay in the page cache, and a
        later read maps them again): a reader done with them keeps its RSS small."""
        self._advise(names, "MADV_DONTNEED")

    def _advise(self, names: Iterable[str], advice: str) -> None:
        mm = self._mm
        advise = getattr(mm, "madvise", None)
        flag = getattr(mmap, advice, None)
        if mm is None or advise is None or flag is None:
            return
        page = mmap.PAGESIZE
        for name in names:
            info = self.info(name)
            if info.nbytes == 0:
                continue
            start = (info.offset or 0) // page * page
            advise(flag, start, (info.offset or 0) + info.nbytes - start)

    def close(self) -> None:
        """Drop the mapping. Views handed out earlier stay valid (they keep it alive)."""
        self._file.close()
        mm, self._mm = self._mm, None
        if mm is not None:
            # Views still exported keep the mapping alive; it goes when the last one does.
            with contextlib.suppress(BufferError):
                mm.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_header(
    entries: Sequence[tuple[str, str, Sequence[int], int, int]],
    metadata: Mapping[str, str] | None,
) -> bytes:
    """JSON header bytes for (name, dtype, shape, begin, end) entries, unpadded."""
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def pack_header_length(n: int) -> bytes:
    return _LEN.pack(n)
