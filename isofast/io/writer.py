"""`CheckpointWriter`: stream tensors into sharded safetensors files, published atomically.

Everything is written inside a hidden temporary sibling of `out_dir`
(`.{name}.isofast-tmp-<pid>-<random>`); only `finalize()` fsyncs it and renames it to
`out_dir`, so an interrupted write never leaves a folder that looks finished.

Each tensor's bytes go to the current shard file as it is added (isofast.io.appender: direct
I/O through a few small staging buffers where the file system allows it, and no copy at all
for data placed at the page phase the shard plan gives). Shard files and their layout:
isofast.io.shards. `plan_shards` lays the next shards out ahead, so other processes can write
them (`PlannedShardWriter`) and hand them back with `add_shard`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from isofast.io.errors import CheckpointError
from isofast.io.journal import (
    JOURNAL_NAME,
    Journal,
    ShardRecord,
    leftover_folders,
    read_journal,
    remove_folder,
    verified_records,
)
from isofast.io.safetensors_format import METADATA_KEY
from isofast.io.shards import (
    PlannedShard,
    ShardFile,
    lay_out_shards,
    next_reserve,
    partial_name,
    raw_bytes,
    shard_full,
    writing,
)
from isofast.io.side_files import SIDE_FILE_PATTERNS, copy_side_files, is_weight_file_name

__all__ = ["INDEX_NAME", "SINGLE_NAME", "CheckpointWriter", "clean_leftovers", "shard_name"]

log = logging.getLogger(__name__)

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PAGE = 4096


def shard_name(index: int, count: int) -> str:
    """Hugging Face shard name, 1-based: model-00001-of-00003.safetensors."""
    width = max(5, len(str(count)))
    return f"model-{index:0{width}d}-of-{count:0{width}d}.safetensors"


def _mkdir_unique(parent: Path, prefix: str) -> Path:
    """A new folder `prefix<random>` in `parent`, with the usual umask-derived mode.

    (tempfile.mkdtemp would make it 0700, and the rename would carry that mode over to the
    published checkpoint.)
    """
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "cannot create a unique temporary folder", str(parent))


class _OutputLock:
    """An exclusive lock on an output path, so two merges never write the same folder: a
    hidden lock file beside it, locked with flock (released by the kernel if the holder
    dies) and removed on release."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir.parent / f".{out_dir.name}.isofast-lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CheckpointError(
                    f"{out_dir}: another isofast merge is writing this output (lock "
                    f"{self.path}); wait for it to finish or choose another output folder"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have removed the file after we opened it: then our
            # lock is on a file nobody else will see; lock the current one instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


def clean_leftovers(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove what interrupted merges into `out_dir` left beside it (temporary folders kept
    for resuming, half-published old outputs); refuses while a merge is writing it."""
    out = Path(os.path.abspath(out_dir))
    lock = _OutputLock(out)
    try:
        found = leftover_folders(out)
        for folder in found:
            remove_folder(folder, "asked to clean")
        return found
    finally:
        lock.release()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Write a (possibly sharded) safetensors checkpoint folder, atomically.

    Usage::

        with CheckpointWriter(out_dir, max_shard_bytes=5 * 2**30) as w:
            for name, array, dtype in tensors:
                w.add(name, array, dtype)
            w.copy_side_files(base_dir)
            w.write_text("README.md", card)
        # clean exit -> finalize(); exception -> abort()

    Tensors land in shards in the order added; a shard is closed when the next tensor would
    push its data past `max_shard_bytes` (a bigger tensor gets a shard of its own). One
    shard gives a single `model.safetensors`; more give `model-0000i-of-0000N.safetensors`
    plus `model.safetensors.index.json` (metadata.total_size and weight_map). `metadata`
    (str -> str) goes into every shard's `__metadata__` (with "format": "pt", which
    transformers expects) and into the index's metadata.

    Not thread-safe: call it from one thread.
    """

    #: header bytes reserved in the first shard (8 + this is page-aligned).
    initial_header_reserve: int = 64 * 1024 - 8

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        max_shard_bytes: int = 5 * 2**30,
        metadata: Mapping[str, str] | None = None,
        *,
        overwrite: bool = False,
        fingerprint: str | None = None,
        resume: bool = False,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        meta = dict(metadata or {})
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"metadata must map str to str; got {k!r}: {v!r}")
        self.out_dir = Path(os.path.abspath(out_dir))
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self._shard_metadata = {"format": "pt", **meta}
        self._index_metadata: dict[str, Any] = dict(meta)
        self._reserve = self.initial_header_reserve
        self._current: ShardFile | None = None
        self._done: list[ShardRecord] = []
        self._names: set[str] = set()
        self._total = 0
        self._state = "open"  # open | broken | finalized | aborted
        self._resumed = False  # shards of an interrupted merge taken over: planned shards only
        self._check_target()
        with writing(self.out_dir.parent):
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _OutputLock(self.out_dir)
        try:
            with writing(self.out_dir.parent):
                self.tmp_dir = self._take_over_leftovers(fingerprint if resume else None)
                journal = Journal(self.tmp_dir, fingerprint, self._done) if fingerprint else None
                self._journal = journal
        except BaseException:
            self._lock.release()
            raise

    def _take_over_leftovers(self, fingerprint: str | None) -> Path:
        """The temporary folder to write into: that of an interrupted merge with the same
        `fingerprint` (its verified shards kept), else a new one. Other leftovers of merges
        into this output are removed (the lock says no live merge owns them)."""
        adopted: Path | None = None
        records: list[ShardRecord] = []
        for folder in leftover_folders(self.out_dir):
            found = read_journal(folder) if fingerprint and adopted is None else None
            if found is not None and found[0] == fingerprint and "-tmp-" in folder.name:
                adopted, records = folder, found[1]
                continue
            remove_folder(folder, "left by an interrupted merge")
        if adopted is None:
            if fingerprint is not None:
                log.info("%s: no interrupted merge of these settings to resume", self.out_dir)
            return _mkdir_unique(
                self.out_dir.parent, f".{self.out_dir.name}.isofast-tmp-{os.getpid()}-"
            )
        # Shards are written in any order (by several processes): each verified one is kept.
        good = verified_records(adopted, records)
        keep = {r.file for r in good} | {JOURNAL_NAME}  # the journal is rewritten with `good`
        for path in adopted.iterdir():
            if path.name not in keep:
                path.unlink() if path.is_file() else shutil.rmtree(path, ignore_errors=True)
        self._done = list(good)
        self._names = {e[0] for r in good for e in r.entries}
        self._total = sum(r.data_bytes for r in good)
        self._resumed = True
        log.info(
            "%s: resuming an interrupted merge: %d shards (%.1f MiB) already written",
            self.out_dir,
            len(good),
            self._total / 2**20,
        )
        return adopted

    @property
    def resumed_names(self) -> frozenset[str]:
        """Tensors already written by the interrupted merge this writer resumes."""
        return frozenset(e[0] for r in self._done for e in r.entries)

    # -- state ------------------------------------------------------------------------
    @property
    def finalized(self) -> bool:
        return self._state == "finalized"

    @property
    def total_bytes(self) -> int:
        """Sum of tensor data bytes added so far (index metadata.total_size)."""
        return self._total

    def _check_target(self) -> None:
        out = self.out_dir
        if not (out.exists() or out.is_symlink()):
            return
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            return
        if not self.overwrite:
            raise FileExistsError(
                errno.EEXIST,
                "output path exists and is not an empty folder (pass overwrite=True)",
                str(out),
            )

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"{self.out_dir}: writer is {self._state}; cannot write more")

    # -- tensors ----------------------------------------------------------------------
    def add(self, name: str, array: npt.ArrayLike, dtype_str: str | None = None) -> None:
        """Append one tensor. Its bytes may still be being written from `array`'s memory
        when this returns: keep it unchanged until `wait_written()` or the end of the writer.

        `dtype_str` is the safetensors dtype to record ("F32", "BF16", ...); by default it is
        inferred from the array. No conversion happens: BF16 and F8_* data must come as raw
        bits (uint16 / uint8, or the ml_dtypes types), everything else as its exact numpy
        dtype. Non-contiguous or big-endian arrays are copied once.
        """
        self._require_open()
        if self._resumed:
            raise RuntimeError(f"{self.out_dir}: a resumed output takes planned shards only")
        where = f"{self.out_dir}: tensor {name!r}"
        if not isinstance(name, str) or not name or name == METADATA_KEY:
            raise CheckpointError(f"{where}: not a valid tensor name")
        if name in self._names:
            raise CheckpointError(f"{where}: added twice")
        raw, dtype_str = raw_bytes(where, array, dtype_str)
        shape = tuple(int(d) for d in np.shape(array))

        if self._current is not None and shard_full(
            bool(self._current.entries), self._current.data_bytes, raw.nbytes, self.max_shard_bytes
        ):
            self._close_current()
        try:
            if self._current is None:
                self._open_shard()
            assert self._current is not None
            with writing(self._current.path):
                self._current.write(name, dtype_str, shape, raw.data)
        except BaseException:
            self._state = "broken"
            raise
        self._names.add(name)
        self._total += raw.nbytes

    def wait_written(self) -> None:
        """Block until the writer no longer reads the memory of tensors already added (direct
        I/O writes large tensors from the caller's memory, in the background)."""
        if self._current is None:
            return
        try:
            with writing(self._current.path):
                self._current.appender.drain()
        except BaseException:
            self._state = "broken"
            raise

    def plan_shards(
        self, tensors: Iterable[tuple[str, str, tuple[int, ...]]]
    ) -> list[PlannedShard]:
        """The shards of an output of these tensors (name, safetensors dtype, shape), in this
        order: where each lands, known before any data exists. Written by `PlannedShardWriter`
        (in this process or another) and handed back with `add_shard`, they are the files
        `add` would have written."""
        if self._current is not None or (self._done and not self._resumed):
            raise RuntimeError(f"{self.out_dir}: shards are planned before any tensor is added")
        return lay_out_shards(
            iter(tensors), self.max_shard_bytes, self._shard_metadata, self._reserve
        )

    def pending(self, planned: Sequence[PlannedShard]) -> list[PlannedShard]:
        """The planned shards still to write: all but those an interrupted merge finished
        (a finished shard that is not one of them is dropped, and written again)."""
        wanted = {(s.file, s.entries) for s in planned}
        kept = [r for r in self._done if (r.file, r.entries) in wanted]
        if len(kept) < len(self._done):
            log.warning("%s: finished shards that do not match this merge are redone", self.out_dir)
            for record in self._done:
                if record not in kept:
                    (self.tmp_dir / record.file).unlink(missing_ok=True)
            self._done = kept
            self._names = {e[0] for r in kept for e in r.entries}
            self._total = sum(r.data_bytes for r in kept)
        done = {r.file for r in kept}
        return [s for s in planned if s.file not in done]

    def add_shard(self, record: ShardRecord) -> None:
        """Take in a shard that another process wrote into `tmp_dir` from a planned shard
        (its journal line, as `PlannedShardWriter.close` returned it)."""
        self._require_open()
        names = [e[0] for e in record.entries]
        if self._names.intersection(names) or any(r.file == record.file for r in self._done):
            raise CheckpointError(f"{self.out_dir}: shard {record.file} added twice")
        self._finished(record)
        self._names.update(names)
        self._total += record.data_bytes

    def _finished(self, record: ShardRecord) -> None:
        """A shard file is whole: into the journal (for resume) and the shards to publish."""
        try:
            with writing(self.tmp_dir / record.file):
                if self._journal is not None:
                    self._journal.record(record)
        except BaseException:
            self._state = "broken"
            raise
        self._done.append(record)

    def _open_shard(self) -> None:
        path = self.tmp_dir / partial_name(len(self._done) + 1)
        with writing(path):
            self._current = ShardFile(path, self._reserve)

    def _close_current(self) -> None:
        shard, self._current = self._current, None
        if shard is None:
            return
        try:
            with writing(shard.path):
                shard.close(self._shard_metadata)
        except BaseException:
            self._state = "broken"
            raise
        # Next shards reserve twice the largest header seen (rounded to a page).
        self._reserve = next_reserve(self._reserve, shard.header_bytes)
        try:
            with writing(shard.path):
                record = shard.record()
        except BaseException:
            self._state = "broken"
            raise
        self._finished(record)

    # -- side files -------------------------------------------------------------------
    def copy_side_files(
        self, src_dir: str | os.PathLike[str], patterns: Iterable[str] = SIDE_FILE_PATTERNS
    ) -> list[str]:
        """Copy config/tokenizer/... files of `src_dir` into the output (see side_files)."""
        self._require_open()
        with writing(self.tmp_dir):
            return copy_side_files(src_dir, self.tmp_dir, patterns)

    def write_text(self, relative_name: str, text: str) -> None:
        """Write a UTF-8 text file (model card, merge config) into the output folder."""
        self._require_open()
        rel = PurePosixPath(relative_name)
        if (
            not relative_name
            or rel.is_absolute()
            or any(p in ("..", ".") for p in rel.parts)
            or "\\" in relative_name
        ):
            raise ValueError(f"{relative_name!r} is not a plain relative path")
        if is_weight_file_name(rel.name):
            raise ValueError(f"{relative_name!r} would clash with the checkpoint's weight files")
        dest = self.tmp_dir.joinpath(*rel.parts)
        with writing(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())

    # -- finishing --------------------------------------------------------------------
    def finalize(self) -> Path:
        """Close the last shard, name shards, write the index, publish `out_dir` atomically.

        Returns `out_dir`. On failure the temporary folder is kept for `abort()`.
        """
        self._require_open()
        try:
            with writing(self.tmp_dir):
                self._finish()
        except BaseException:
            self._state = "broken"
            raise
        self._state = "finalized"
        self._lock.release()
        return self.out_dir

    def _finish(self) -> None:
        self._close_current()
        if not self._done:  # no tensors: still a valid (empty) safetensors file
            self._open_shard()
            self._close_current()
        if self._journal is not None:
            self._journal.remove()
        self._done.sort(key=lambda r: r.file)  # shards written elsewhere come in any order
        count = len(self._done)
        if count == 1:
            os.rename(self.tmp_dir / self._done[0].file, self.tmp_dir / SINGLE_NAME)
        else:
            weight_map: dict[str, str] = {}
            for i, shard in enumerate(self._done, start=1):
                final = shard_name(i, count)
                os.rename(self.tmp_dir / shard.file, self.tmp_dir / final)
                weight_map.update((e[0], final) for e in shard.entries)
            index = {
                "metadata": {**self._index_metadata, "total_size": self._total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            with open(self.tmp_dir / INDEX_NAME, "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
        for dirpath, _, _ in os.walk(self.tmp_dir):
            _fsync_dir(Path(dirpath))
        self._publish()

    def _publish(self) -> None:
        out, parent = self.out_dir, self.out_dir.parent
        self._check_target()
        old: Path | None = None
        if out.exists() or out.is_symlink():
            if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
                out.rmdir()
            else:
                old = _mkdir_unique(parent, f".{out.name}.isofast-old-{os.getpid()}-")
                os.rename(out, old / "previous")
        try:
            os.rename(self.tmp_dir, out)
        except OSError as e:
            if old is not None:
                os.rename(old / "previous", out)
                old.rmdir()
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(
                    errno.EEXIST, "output path appeared while writing", str(out)
                ) from e
            raise
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written so far (idempotent; a no-op after finalize)."""
        if self._state in ("finalized", "aborted"):
            return
        if self._current is not None:
            self._current.discard()
            self._current = None
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._state = "aborted"
        self._lock.release()

    def _keep_for_resume(self) -> None:
        """Interrupted: publish nothing, but keep the finished shards and their journal so
        that a merge with `resume` can reuse them."""
        if self._current is not None:
            self._current.discard()
            with contextlib.suppress(OSError):
                self._current.path.unlink()
            self._current = None
        self._state = "aborted"
        self._lock.release()
        log.warning(
            "%s: interrupted; %d finished shards are kept in %s for --resume",
            self.out_dir,
            len(self._done),
            self.tmp_dir,
        )

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is KeyboardInterrupt and self._journal is not None:
            self._keep_for_resume()
        elif exc_type is not None:
            self.abort()
        elif self._state == "open":
            try:
                self.finalize()
            except BaseException:
                self.abort()
                raise
        elif self._state == "broken":
            # An earlier error was caught inside the with-block: never publish half a model.
            self.abort()
            raise RuntimeError(f"{self.out_dir}: an earlier write failed; output discarded")

    def __repr__(self) -> str:
        return (
            f"CheckpointWriter({str(self.out_dir)!r}, {len(self._names)} tensors, "
            f"{self._total} bytes, {self._state})"
        )
