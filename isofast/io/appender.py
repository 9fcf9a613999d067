"""Appending tensor bytes to a shard file: direct I/O where the file system allows it.

A merged checkpoint is written once and never read back by the merge, so passing it through
the page cache only costs: the kernel copies every byte into freshly allocated cache pages
(on a VM each new page may also fault in the hypervisor), then writes them back. With
`O_DIRECT` the disk reads the bytes straight from a few reused, page-aligned staging
buffers, and a background thread keeps the disk busy while the caller fills the next one.
Data that lies in memory at the same offset within a page as it goes in the file (the
merge pipeline allocates its outputs so: `CheckpointWriter.page_phases`) is written from
where it is, without even that copy.

Where `O_DIRECT` is missing or refused (tmpfs, some network file systems, macOS) the
buffered appender writes through the page cache and starts write-back per call, so the
final fsync has little left to do.

Both appenders write `data` at consecutive offsets from `start`; the caller truncates the
file to its real length afterwards (the direct appender pads its last block).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "ALIGN",
    "Appender",
    "BufferedAppender",
    "DirectAppender",
    "open_appender",
    "pwrite_all",
]

ALIGN = 4096  # offset, length and address alignment that O_DIRECT asks of us
_STAGING_BLOCK = 8 << 20
_STAGING_DEPTH = 3
_DIRECT_ENV = "ISOFAST_DIRECT_IO"  # "0" turns direct I/O off (e.g. to compare both paths)
_ZERO_COPY_FROM = 256 << 10  # bytes: below this, staging a copy costs less than a syscall


def _address(data: memoryview) -> int:
    return int(np.frombuffer(data, np.uint8).ctypes.data)


class Appender(Protocol):
    def append(self, data: memoryview) -> None: ...

    def finish(self) -> None:
        """Make every appended byte reach the file (not necessarily the disk: fsync)."""

    def drain(self) -> None:
        """Wait until no write still reads the caller's memory (see DirectAppender)."""

    def discard(self) -> None:
        """Stop without finishing (errors ignored)."""


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class BufferedAppender:
    """Writes through the page cache and asks for write-back of each piece at once (Linux:
    DONTNEED on dirty pages queues them without waiting)."""

    def __init__(self, fd: int, start: int) -> None:
        self.fd = fd
        self.offset = start

    def append(self, data: memoryview) -> None:
        pwrite_all(self.fd, data, self.offset)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, self.offset, len(data), os.POSIX_FADV_DONTNEED)
        self.offset += len(data)

    def finish(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def discard(self) -> None:
        pass


class DirectAppender:
    """Copies appended bytes into a ring of aligned staging buffers; full buffers are written
    with `O_DIRECT` by one background thread while the caller fills the next.

    `direct_fd` is closed by `finish()` / `discard()`. If the file system refuses a direct
    write after all (EINVAL), that block and every later one go through `buffered_fd`.
    """

    def __init__(
        self,
        direct_fd: int,
        buffered_fd: int,
        start: int,
        block: int = _STAGING_BLOCK,
        depth: int = _STAGING_DEPTH,
    ) -> None:
        if start % ALIGN or block % ALIGN or depth < 2:
            raise ValueError("direct I/O needs aligned offsets, aligned blocks and depth >= 2")
        self.direct_fd = direct_fd
        self.buffered_fd = buffered_fd
        self.block = block
        self._buffers = [mmap.mmap(-1, block) for _ in range(depth)]  # page-aligned
        self._views = [memoryview(b) for b in self._buffers]
        self._pending: list[Future[None] | None] = [None] * depth
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isofast-write")
        self._current = 0
        self._fill = 0
        self._offset = start  # file offset of the current buffer's first byte
        self._use_direct = True
        self._in_place: list[Future[None]] = []  # writes still reading the caller's memory

    def append(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        position = self._offset + self._fill  # file offset of data[0]
        if len(data) >= _ZERO_COPY_FROM and (_address(data) - position) % ALIGN == 0:
            # The data sits in memory at the same page phase as in the file: copy only the
            # head up to the next page boundary, write the aligned middle straight from the
            # caller's memory, then stage the tail.
            head = -position % ALIGN
            self._copy_in(data[:head])
            if self._fill:
                self._submit(self._fill)
            middle = (len(data) - head) // ALIGN * ALIGN
            # Queued behind the staged blocks; the caller keeps the memory unchanged until
            # drain() (the merge pipeline hands its memory back to the ring only then).
            write = self._thread.submit(self._write_from, data[head : head + middle], self._offset)
            self._in_place.append(write)
            self._offset += middle
            data = data[head + middle :]
        self._copy_in(data)

    def _copy_in(self, data: memoryview) -> None:
        while data:
            n = min(len(data), self.block - self._fill)
            self._views[self._current][self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == self.block:
                self._submit(self.block)

    def drain(self) -> None:
        writes, self._in_place = self._in_place, []
        for write in writes:
            write.result()

    def finish(self) -> None:
        try:
            self.drain()
            if self._fill:
                padded = -(-self._fill // ALIGN) * ALIGN
                self._views[self._current][self._fill : padded] = bytes(padded - self._fill)
                self._submit(padded)
            for i, pending in enumerate(self._pending):
                if pending is not None:
                    self._pending[i] = None
                    pending.result()
        finally:
            self._close()

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._close()

    def _submit(self, length: int) -> None:
        index = self._current
        self._pending[index] = self._thread.submit(self._write, index, length, self._offset)
        self._offset += length
        self._current = (index + 1) % len(self._buffers)
        self._fill = 0
        waiting = self._pending[self._current]  # the buffer we fill next must be written
        if waiting is not None:
            self._pending[self._current] = None
            waiting.result()

    def _write(self, index: int, length: int, offset: int) -> None:
        self._write_from(self._views[index][:length], offset)

    def _write_from(self, data: memoryview, offset: int) -> None:
        """Write aligned `data` at aligned `offset`, directly while the file system lets us."""
        while data and self._use_direct:
            try:
                n = os.pwrite(self.direct_fd, data, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._use_direct = False  # accepted at open, refused on write
                log.info("direct I/O refused on write: writing through the page cache")
                break
            data, offset = data[n:], offset + n
            if n % ALIGN:  # a short, unaligned write: finish through the page cache
                self._use_direct = False
        pwrite_all(self.buffered_fd, data, offset)

    def _close(self) -> None:
        self._thread.shutdown(wait=True)
        with contextlib.suppress(OSError):
            os.close(self.direct_fd)
        for view in self._views:
            view.release()
        for buffer in self._buffers:
            # A failed write's traceback may still hold a slice: then the mapping goes with it.
            with contextlib.suppress(BufferError):
                buffer.close()


def _direct_io_enabled() -> bool:
    return bool(getattr(os, "O_DIRECT", 0)) and os.environ.get(_DIRECT_ENV, "1") != "0"


def open_appender(path: Path, buffered_fd: int, start: int) -> Appender:
    """The fastest appender `path`'s file system takes; `buffered_fd` is open on `path`."""
    if _direct_io_enabled() and start % ALIGN == 0:
        try:
            direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            log.info("%s: the file system refuses direct I/O; writing through the page cache", path)
        else:
            log.debug("%s: written with direct I/O", path)
            return DirectAppender(direct_fd, buffered_fd, start)
    return BufferedAppender(buffered_fd, start)
