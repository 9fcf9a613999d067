"""Shard files of a checkpoint being written, and the plan of which tensors go to which.

A shard file is `[8-byte header length][reserved header area][data]`: data is appended as it
comes and the JSON header (which the format lets trail with spaces) is written into the
reserved area when the shard closes; a header that outgrew the area makes the file be
rewritten once with the header in front. Where each tensor lands follows from the tensors'
sizes alone, so `CheckpointWriter.plan_shards` can lay the shards out before any data exists,
and another process (a Ray worker) can write shard k from its `PlannedShard`: byte for byte
the file the writer itself would have written.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from isofast.io.appender import Appender, open_appender, pwrite_all
from isofast.io.dtypes import DTYPE_ITEMSIZE, dtype_str_for_numpy, is_compatible
from isofast.io.errors import CheckpointError
from isofast.io.journal import ShardRecord, crc32c, crc_of_file
from isofast.io.safetensors_format import encode_header, pack_header_length

PAGE = 4096
_COPY_CHUNK = 64 << 20

EntryTuple = tuple[str, str, tuple[int, ...], int, int]  # name, dtype, shape, begin, end


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write the output elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write the output elsewhere",
    errno.EROFS: "the file system is read-only: write the output elsewhere",
    errno.EACCES: "no permission to write there: write the output elsewhere",
    errno.EPERM: "no permission to write there: write the output elsewhere",
    errno.EIO: "the device reported an I/O error",
}


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` into a CheckpointError that names it and says what
    to do; nothing is published after it (the writer discards its temporary folder)."""
    try:
        yield
    except (CheckpointError, FileExistsError):  # FileExistsError: the output appeared
        raise
    except OSError as e:
        reason = e.strerror or str(e)
        hint = _HINTS.get(e.errno or 0)
        raise CheckpointError(
            f"{e.filename or path}: cannot write: {reason}" + (f" ({hint})" if hint else "")
        ) from e


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, count: int) -> None:
    """Copy bytes between files, in the kernel when it can (copy_file_range)."""
    copy_file_range = getattr(os, "copy_file_range", None)
    while count > 0 and copy_file_range is not None:
        try:
            n = copy_file_range(src, dst, min(count, _COPY_CHUNK), src_off, dst_off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break
        if n == 0:
            break
        src_off, dst_off, count = src_off + n, dst_off + n, count - n
    while count > 0:
        chunk = os.pread(src, min(count, _COPY_CHUNK), src_off)
        if not chunk:
            raise OSError(errno.EIO, "unexpected end of file while copying shard data")
        pwrite_all(dst, memoryview(chunk), dst_off)
        src_off, dst_off, count = src_off + len(chunk), dst_off + len(chunk), count - len(chunk)


@dataclass
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class ShardFile:
    """One shard file being written: [8-byte length][reserved header][data...]."""

    def __init__(self, path: Path, reserve: int) -> None:
        self.path = path
        self.reserve = reserve  # header bytes reserved; 8 + reserve is page-aligned
        self.data_start = 8 + reserve
        self.entries: list[Entry] = []
        self.data_bytes = 0
        self.header_bytes = 0
        self.data_crc = 0
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            self.appender: Appender = open_appender(path, self.fd, self.data_start)
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, name: str, dtype: str, shape: tuple[int, ...], data: memoryview) -> None:
        begin = self.data_bytes
        self.appender.append(data)
        self.data_bytes += len(data)
        self.entries.append(Entry(name, dtype, shape, begin, self.data_bytes))
        self.data_crc = crc32c(data, self.data_crc)  # for the journal (resume)

    def close(self, metadata: Mapping[str, str]) -> None:
        """Write the header, fsync, close. Rewrites the file if the header does not fit."""
        try:
            self.appender.finish()
            # The direct appender pads its last block: cut the file back to the data's end.
            os.ftruncate(self.fd, self.data_start + self.data_bytes)
        except BaseException:
            os.close(self.fd)
            raise
        header = encode_header(
            [(e.name, e.dtype, e.shape, e.begin, e.end) for e in self.entries], metadata
        )
        self.header_bytes = len(header)
        if len(header) <= self.reserve:
            padded = header + b" " * (self.reserve - len(header))
            pwrite_all(self.fd, memoryview(pack_header_length(self.reserve) + padded), 0)
            os.fsync(self.fd)
            os.close(self.fd)
            return
        # Header outgrew the reservation: rewrite with the header in front, padded so the
        # data section starts 8-byte aligned.
        size = round_up(8 + len(header), 8) - 8
        relayout = self.path.with_name(self.path.name + ".relayout")
        try:
            out = os.open(relayout, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                prefix = pack_header_length(size) + header + b" " * (size - len(header))
                pwrite_all(out, memoryview(prefix), 0)
                _copy_range(self.fd, self.data_start, out, 8 + size, self.data_bytes)
                os.fsync(out)
            finally:
                os.close(out)
        finally:
            os.close(self.fd)
        os.replace(relayout, self.path)
        self.data_start = 8 + size

    def record(self) -> ShardRecord:
        """The journal line of this closed shard."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            header_crc = crc_of_file(fd, 0, self.data_start)
        finally:
            os.close(fd)
        return ShardRecord(
            file=self.path.name,
            size=self.data_start + self.data_bytes,
            data_start=self.data_start,
            header_crc=header_crc,
            data_crc=self.data_crc,
            entries=tuple((e.name, e.dtype, e.shape, e.begin, e.end) for e in self.entries),
        )

    def discard(self) -> None:
        self.appender.discard()
        with contextlib.suppress(OSError):
            os.close(self.fd)


def partial_name(index: int) -> str:
    """A shard's file name in the temporary folder (1-based index in the output's order)."""
    return f"shard-{index:05d}.partial"


def shard_index(file: str) -> int:
    return int(file.removeprefix("shard-").removesuffix(".partial"))


def next_reserve(reserve: int, header_bytes: int) -> int:
    """Header bytes later shards reserve: twice the largest header seen, to a page."""
    return max(reserve, round_up(8 + 2 * header_bytes, PAGE) - 8)


def shard_full(has_entries: bool, data_bytes: int, size: int, max_shard_bytes: int) -> bool:
    """Whether a tensor of `size` bytes starts a new shard (a shard holds at least one)."""
    return has_entries and data_bytes + size > max_shard_bytes


def raw_bytes(where: str, array: npt.ArrayLike, dtype_str: str | None) -> tuple[Any, str]:
    """The little-endian bytes of `array` (a flat uint8 array) and its safetensors dtype.
    No conversion happens: BF16 and F8_* data come as raw bits (uint16 / uint8, or the
    ml_dtypes types), everything else as its exact numpy dtype."""
    arr = np.asarray(array)
    if dtype_str is None:
        dtype_str = dtype_str_for_numpy(arr.dtype)
        if dtype_str is None:
            raise CheckpointError(
                f"{where}: no safetensors dtype for numpy {arr.dtype}; pass dtype_str"
            )
    elif dtype_str not in DTYPE_ITEMSIZE:
        known = ", ".join(sorted(DTYPE_ITEMSIZE))
        raise CheckpointError(f"{where}: unknown dtype {dtype_str!r} (known: {known})")
    if not is_compatible(arr.dtype, dtype_str):
        raise CheckpointError(
            f"{where}: numpy {arr.dtype} data cannot be written as {dtype_str} without a "
            "conversion; convert it first"
        )
    little = arr.dtype.newbyteorder("<")
    if arr.dtype != little:
        arr = arr.astype(little)
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8), dtype_str


@dataclass(frozen=True)
class PlannedShard:
    """One shard of an output, laid out before it is written: what another process needs to
    write it (plain data: it pickles)."""

    file: str  # name in the temporary folder
    entries: tuple[EntryTuple, ...]
    reserve: int  # header bytes reserved at its start
    metadata: Mapping[str, str]  # every shard's __metadata__

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e[0] for e in self.entries)

    @property
    def data_bytes(self) -> int:
        return self.entries[-1][4] if self.entries else 0

    def page_phases(self) -> dict[str, int]:
        """Where in a page (file offset % 4096) each tensor starts while it is written: data
        handed over at the same phase in memory goes to disk without a copy (direct I/O)."""
        return {e[0]: (8 + self.reserve + e[3]) % PAGE for e in self.entries}


def lay_out_shards(
    tensors: Iterator[tuple[str, str, tuple[int, ...]]],
    max_shard_bytes: int,
    metadata: Mapping[str, str],
    reserve: int,
) -> list[PlannedShard]:
    """The shards `tensors` (name, safetensors dtype, shape), added in this order, fill: the
    decisions the writer takes one tensor at a time, taken ahead."""
    shards: list[PlannedShard] = []
    entries: list[EntryTuple] = []
    data = 0

    def close() -> None:
        nonlocal reserve
        header = encode_header(entries, metadata)
        index = len(shards) + 1
        shards.append(PlannedShard(partial_name(index), tuple(entries), reserve, metadata))
        reserve = next_reserve(reserve, len(header))

    for name, dtype, shape in tensors:
        size = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
        if shard_full(bool(entries), data, size, max_shard_bytes):
            close()
            entries, data = [], 0
        entries.append((name, dtype, tuple(shape), data, data + size))
        data += size
    if entries:
        close()
    return shards


class PlannedShardWriter:
    """Writes one `PlannedShard` into `folder` (the output's temporary folder), from any
    process; tensors come in the planned order, with the planned dtype and shape. A file
    left by an earlier attempt (a killed worker) is replaced."""

    def __init__(self, folder: str | os.PathLike[str], planned: PlannedShard) -> None:
        self.planned = planned
        path = Path(folder) / planned.file
        with writing(path):
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".relayout").unlink(missing_ok=True)
            self.shard = ShardFile(path, planned.reserve)
        self.count = 0

    def add(self, name: str, array: npt.ArrayLike, dtype_str: str) -> None:
        where = f"{self.shard.path}: tensor {name!r}"
        planned = (
            self.planned.entries[self.count] if self.count < len(self.planned.entries) else None
        )
        raw, dtype_str = raw_bytes(where, array, dtype_str)
        shape = tuple(int(d) for d in np.shape(array))
        if planned is None or planned[:3] != (name, dtype_str, shape):
            raise CheckpointError(f"{where}: not the next tensor of the planned shard ({planned})")
        with writing(self.shard.path):
            self.shard.write(name, dtype_str, shape, raw.data)
        self.count += 1

    def wait_written(self) -> None:
        with writing(self.shard.path):
            self.shard.appender.drain()

    def close(self) -> ShardRecord:
        """Finish the file (fsynced) and return its journal line."""
        if self.count != len(self.planned.entries):
            raise CheckpointError(
                f"{self.shard.path}: {self.count} of {len(self.planned.entries)} planned "
                "tensors written"
            )
        with writing(self.shard.path):
            self.shard.close(self.planned.metadata)
            return self.shard.record()

    def discard(self) -> None:
        self.shard.discard()
        with contextlib.suppress(OSError):
            self.shard.path.unlink()
