"""`CheckpointReader`: one lazy, read-only view over any supported checkpoint layout.

Supported: a single `.safetensors` file; a folder with `model.safetensors`; a sharded
Hugging Face folder with `model.safetensors.index.json` (weight_map -> shard file); torch
`.pt`/`.bin`/`.pth` state dicts, single or sharded via `pytorch_model.bin.index.json`.
Everything about names, shapes and dtypes is read from headers at open time; tensor data
is only touched by `get`.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np

from isofast.io.errors import CheckpointError
from isofast.io.safetensors_format import SafetensorsFile, is_safetensors_file
from isofast.io.tensor_info import TensorInfo
from isofast.io.torch_format import TORCH_SUFFIXES, TorchFile

__all__ = ["CheckpointReader"]

# Looked for in this order inside a folder; safetensors wins over torch pickles.
_PREFERRED_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


class _TensorFile(Protocol):
    path: Path
    metadata: dict[str, str]

    def names(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo: ...
    def infos(self) -> Mapping[str, TensorInfo]: ...
    def get(self, name: str) -> np.ndarray[Any, np.dtype[Any]]: ...
    def prefetch(self, names: Iterable[str]) -> None: ...
    def close(self) -> None: ...


def _find_in_folder(folder: Path) -> Path:
    for name in _PREFERRED_NAMES:
        if (folder / name).is_file():
            return folder / name
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    groups = (
        ("safetensors index", [p for p in entries if p.name.endswith(".safetensors.index.json")]),
        ("safetensors file", [p for p in entries if p.suffix == ".safetensors"]),
        ("torch index", [p for p in entries if p.name.endswith(".index.json")]),
        ("torch checkpoint", [p for p in entries if p.suffix in TORCH_SUFFIXES]),
    )
    for what, found in groups:
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            listed = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
            raise CheckpointError(
                f"{folder}: several {what}s and no {_PREFERRED_NAMES[0]} or "
                f"{_PREFERRED_NAMES[1]} to say which is the model ({listed}); pass one file"
            )
    raise CheckpointError(
        f"{folder}: no checkpoint found (looked for {', '.join(_PREFERRED_NAMES)}, "
        "*.safetensors, *.index.json, *.pt/.pth/.bin/.ckpt)"
    )


def _open_file(path: Path, allow_pickle: bool) -> _TensorFile:
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return TorchFile(path, allow_pickle=allow_pickle)
    if is_safetensors_file(path):
        return SafetensorsFile(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from e
    if magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80":
        return TorchFile(path, allow_pickle=allow_pickle)
    raise CheckpointError(f"{path}: not a safetensors file or a torch checkpoint")


def _encodable(text: str) -> bool:
    """Whether `text` can be written out as UTF-8 (JSON's \\ud800 escapes decode to lone
    surrogates, which no file name or safetensors header may hold)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_index(index: Path) -> dict[str, str]:
    try:
        text = index.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read: {e.strerror or e}") from e
    try:
        doc = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, absurd nesting or numbers
        raise CheckpointError(f"{index}: not valid JSON: {e}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
    for name, shard in weight_map.items():
        if not _encodable(name):
            raise CheckpointError(f"{index}: tensor name {name!r} is not valid Unicode")
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: tensor {name!r} maps to {shard!r}, not a file name")
        parts = PurePosixPath(shard).parts
        if (
            PurePosixPath(shard).is_absolute()
            or ".." in parts
            or "\\" in shard
            or "\0" in shard
            or not _encodable(shard)
        ):
            raise CheckpointError(
                f"{index}: tensor {name!r} maps to {shard!r}, which is not a plain relative "
                "file name inside the checkpoint folder"
            )
    return weight_map


class CheckpointReader:
    """Read-only, lazy access to the tensors of one checkpoint.

    `path` is a checkpoint file (`.safetensors`, `.pt`/`.bin`/`.pth`, or an `*.index.json`)
    or a folder holding one. Torch pickles that need more than `weights_only` loading are
    refused unless `allow_pickle=True`.

    `get` returns read-only numpy views into memory-mapped files: BF16 as uint16 and F8 as
    uint8 (raw bits; `info(name).dtype` names the real type). Views stay valid after
    `close()`; the mapping is released when the last view is gone.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self.index_path: Path | None = None
        self._files: list[_TensorFile] = []
        self._owner: dict[str, _TensorFile] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------
    def _open(self) -> None:
        if not self.path.exists():
            raise FileNotFoundError(
                errno.ENOENT, "no such checkpoint file or folder", str(self.path)
            )
        target = _find_in_folder(self.path) if self.path.is_dir() else self.path
        if target.name.endswith(".index.json"):
            self._open_index(target)
        else:
            f = _open_file(target, self.allow_pickle)
            self._files.append(f)
            self._owner = {name: f for name in f.names()}

    def _open_index(self, index: Path) -> None:
        self.index_path = index
        weight_map = _read_index(index)
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)

        seen: dict[str, _TensorFile] = {}
        for shard in sorted(by_shard):
            wanted = by_shard[shard]
            shard_path = index.parent / shard
            try:
                is_file = shard_path.is_file()
            except OSError as e:  # e.g. a name too long for the file system
                raise CheckpointError(
                    f"{index}: shard {shard!r} (holding {wanted[0]!r}): cannot open: "
                    f"{e.strerror or e}"
                ) from None
            if not is_file:
                others = f" and {len(wanted) - 1} more" if len(wanted) > 1 else ""
                raise CheckpointError(
                    f"{index}: shard {shard!r} (holding {wanted[0]!r}{others}) is missing: "
                    f"{shard_path} does not exist"
                )
            f = _open_file(shard_path, self.allow_pickle)
            self._files.append(f)
            present = f.infos()
            for name in present:
                if name in seen:
                    raise CheckpointError(
                        f"{index}: tensor {name!r} appears in two shards, "
                        f"{seen[name].path.name} and {shard_path.name}"
                    )
                seen[name] = f
            for name in wanted:
                if name not in present:
                    raise CheckpointError(
                        f"{index}: weight_map puts tensor {name!r} in {shard!r}, but "
                        f"{shard_path} has no such tensor"
                    )
        # Storage order: shard by shard, each in data-offset order. Tensors present in a
        # shard but absent from weight_map are ignored, as Hugging Face loaders do.
        for f in self._files:
            for name in f.names():
                if name in weight_map:
                    self._owner[name] = f

    # -- queries (headers only) -------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        """The data files behind this checkpoint (shards in name order)."""
        return [f.path for f in self._files]

    @property
    def metadata(self) -> dict[str, str]:
        """The safetensors `__metadata__` of the first file ({} for torch files)."""
        return dict(self._files[0].metadata) if self._files else {}

    def names(self) -> list[str]:
        """All tensor names in storage order (file by file, by data offset)."""
        return list(self._owner)

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def _file_of(self, name: str) -> _TensorFile:
        try:
            return self._owner[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        """Name, shape, dtype, byte size and file of a tensor, from the header only."""
        return self._file_of(name).info(name)

    def infos(self) -> dict[str, TensorInfo]:
        """`info` of every tensor, in `names()` order."""
        return {name: f.info(name) for name, f in self._owner.items()}

    @property
    def total_nbytes(self) -> int:
        return sum(f.info(name).nbytes for name, f in self._owner.items())

    # -- data -------------------------------------------------------------------------
    def get(self, name: str) -> np.ndarray[Any, np.dtype[Any]]:
        """A read-only numpy view of a tensor (zero-copy for safetensors)."""
        return self._file_of(name).get(name)

    def source(self, name: str) -> tuple[int, int] | None:
        """(file descriptor, byte offset) of a safetensors tensor's data, for readers that
        read the file themselves; None for torch files. Valid until `close()`."""
        f = self._file_of(name)
        return f.source(name) if isinstance(f, SafetensorsFile) else None

    def prefetch(self, names: Iterable[str]) -> None:
        """Hint the OS to start reading these tensors (no-op for torch files)."""
        for f, group in self._by_file(names):
            f.prefetch(group)

    def release(self, names: Iterable[str]) -> None:
        """Unmap these safetensors tensors' pages (they stay cached); views stay valid."""
        for f, group in self._by_file(names):
            if isinstance(f, SafetensorsFile):
                f.release(group)

    def _by_file(self, names: Iterable[str]) -> list[tuple[_TensorFile, list[str]]]:
        by_file: dict[int, tuple[_TensorFile, list[str]]] = {}
        for name in names:
            f = self._file_of(name)
            by_file.setdefault(id(f), (f, []))[1].append(name)
        return list(by_file.values())

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        n_files = len(self._files)
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors, {n_files} files)"
