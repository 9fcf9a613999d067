"""The journal of a merge's temporary folder: which shards are complete, so a merge killed
midway can be resumed without redoing them.

A journal line is appended (and fsynced) only after its shard file is complete and fsynced,
so a line always describes a shard that is whole on disk. Each line records the shard's size,
a CRC-32C of its header area and of its data, and its tensors. On resume the shards are read
back and checked against their lines; those that check out are kept (shards may finish in any
order) and every other shard is redone. The first line holds the merge's fingerprint (its
settings and the identity of its input files): only a merge with the same fingerprint
resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JOURNAL_NAME = "isofast-journal.jsonl"
_CHUNK = 16 << 20


@dataclass(frozen=True)
class ShardRecord:
    """A complete shard, as its journal line describes it."""

    file: str  # name inside the temporary folder
    size: int
    data_start: int
    header_crc: int
    data_crc: int
    entries: tuple[tuple[str, str, tuple[int, ...], int, int], ...]  # name, dtype, shape, offsets

    @property
    def data_bytes(self) -> int:
        return self.size - self.data_start

    def to_json(self) -> str:
        fields = {
            **self.__dict__,
            "entries": [[n, d, list(s), b, e] for n, d, s, b, e in self.entries],
        }
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ShardRecord:
        data: dict[str, Any] = json.loads(text)
        entries = tuple((n, d, tuple(s), b, e) for n, d, s, b, e in data.pop("entries"))
        return cls(entries=entries, **data)


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC-32C of a contiguous buffer, continuing from `crc` (hardware-accelerated in the
    core: a streamed merge checksums every byte it writes)."""
    from isofast._native import core  # on first use: reading a config never loads the core

    return core.crc32c(data, crc)


def crc_of_file(fd: int, begin: int, end: int) -> int:
    """CRC-32C of bytes [begin, end) of an open file."""
    crc, at = 0, begin
    while at < end:
        chunk = os.pread(fd, min(_CHUNK, end - at), at)
        if not chunk:
            break
        crc, at = crc32c(chunk, crc), at + len(chunk)
    return crc


class Journal:
    """The journal of one temporary folder: written anew with the fingerprint and the records
    of the shards kept (none for a new folder), then appended to as shards are finished."""

    def __init__(self, folder: Path, fingerprint: str, kept: Sequence[ShardRecord] = ()) -> None:
        self.path = folder / JOURNAL_NAME
        self.fingerprint = fingerprint
        lines = [json.dumps({"fingerprint": fingerprint}), *(r.to_json() for r in kept)]
        with open(self.path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())

    def record(self, shard: ShardRecord) -> None:
        self._append(shard.to_json())

    def _append(self, line: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """The output is about to be published: the journal is not part of it."""
        self.path.unlink(missing_ok=True)


def read_journal(folder: Path) -> tuple[str, list[ShardRecord]] | None:
    """The fingerprint and shard records of a temporary folder (None: no usable journal).
    A torn last line (killed while appending) ends the records."""
    try:
        lines = (folder / JOURNAL_NAME).read_text(encoding="utf-8").splitlines()
        fingerprint = str(json.loads(lines[0])["fingerprint"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    records = []
    for line in lines[1:]:
        try:
            records.append(ShardRecord.from_json(line))
        except (ValueError, KeyError, TypeError):
            break
    return fingerprint, records


def verified_records(folder: Path, records: list[ShardRecord]) -> list[ShardRecord]:
    """The records whose shard is whole on disk: present, of its size, of its checksums."""
    good = []
    for record in records:
        path = folder / record.file
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            ok = (
                os.fstat(fd).st_size == record.size
                and crc_of_file(fd, 0, record.data_start) == record.header_crc
                and crc_of_file(fd, record.data_start, record.size) == record.data_crc
            )
        finally:
            os.close(fd)
        if ok:
            good.append(record)
        else:
            log.warning("%s: does not match its journal line; it is written again", path)
    return good


def leftover_folders(out_dir: Path) -> list[Path]:
    """Temporary folders that merges into `out_dir` left behind (call with the output lock
    held: then no live merge owns any of them)."""
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    prefixes = (f".{out_dir.name}.isofast-tmp-", f".{out_dir.name}.isofast-old-")
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefixes) and p.is_dir())


def remove_folder(path: Path, why: str) -> None:
    log.warning("removing %s (%s)", path, why)
    shutil.rmtree(path, ignore_errors=True)
