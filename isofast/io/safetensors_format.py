"""One safetensors file: header parsing and validation, memory-mapped zero-copy views.

Layout: an 8-byte little-endian header length N, N bytes of JSON (may be trailed by
spaces), then the data section. The header maps each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data section)
and may hold a "__metadata__" map of strings.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
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


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is {type(entry).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise CheckpointError(f"{where}: header entry lacks {', '.join(missing)}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: dtype {dtype!r} is not a string")
    if dtype in SUB_BYTE_DTYPES:
        raise CheckpointError(f"{where}: sub-byte dtype {dtype} is not supported")
    if dtype not in DTYPE_ITEMSIZE:
        known = ", ".join(sorted(DTYPE_ITEMSIZE))
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (known: {known})")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(
            f"{where}: data_offsets {offsets!r} is not a pair [begin, end] with 0 <= begin <= end"
        )
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}) span {end - begin} bytes but "
            f"{dtype}{list(shape)} needs {nbytes}"
        )
    return TensorInfo(
        name=name,
        shape=tuple(shape),
        dtype=dtype,
        nbytes=nbytes,
        file=path,
        offset=data_start + begin,
    )


class SafetensorsFile:
    """A validated, memory-mapped safetensors file.

    The header is read and checked at construction (dtypes known, offsets consistent with
    shapes, inside the file and not overlapping); tensor data is only touched by `get`,
    which returns read-only numpy views into the mapping.
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
        if not raw.startswith(b"{"):
            raise CheckpointError(f"{path}: header does not start with '{{'; not safetensors")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
        except _DuplicateKey as e:
            raise CheckpointError(f"{path}: header names tensor {e.key!r} twice") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: header is not valid UTF-8 JSON: {e}") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: header is not a JSON object")

        data_start = 8 + n
        data_size = size - data_start
        metadata: dict[str, str] = {}
        infos: list[TensorInfo] = []
        for name, entry in header.items():
            if name == METADATA_KEY:
                if not isinstance(entry, dict) or not all(
                    isinstance(v, str) for v in entry.values()
                ):
                    raise CheckpointError(f"{path}: {METADATA_KEY} is not a map of strings")
                metadata = dict(entry)
                continue
            infos.append(_parse_entry(path, name, entry, data_start))

        infos.sort(key=lambda t: (t.offset or 0, t.nbytes))
        prev: TensorInfo | None = None
        for info in infos:
            begin = (info.offset or 0) - data_start
            end = begin + info.nbytes
            if end > data_size:
                raise CheckpointError(
                    f"{path}: tensor {info.name!r}: data_offsets [{begin}, {end}) run past the "
                    f"end of the data section ({data_size} bytes; file truncated?)"
                )
            if info.nbytes == 0:
                continue
            if prev is not None and begin < (prev.offset or 0) - data_start + prev.nbytes:
                raise CheckpointError(
                    f"{path}: tensor {info.name!r}: data_offsets [{begin}, {end}) overlap "
                    f"tensor {prev.name!r}"
                )
            prev = info
        return {t.name: t for t in infos}, metadata, data_start

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
