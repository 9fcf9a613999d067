"""One torch `.pt`/`.bin`/`.pth` state dict, memory-mapped through `torch.load`.

torch is imported only when such a file is opened. Files are loaded with
`weights_only=True` (no arbitrary code runs); a file that needs the full pickle machinery
is refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import reprlib  # a key may be a tuple nesting shared tuples: its full repr explodes
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from isofast.io.dtypes import DType, by_name, name_of
from isofast.io.errors import CheckpointError
from isofast.io.tensor_info import TensorInfo

__all__ = ["TORCH_SUFFIXES", "TorchFile"]

TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})

# Keys under which training scripts commonly nest the real state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")

# Signed integer of each size: what torch views bits as when numpy lacks the real type.
_SAME_SIZE_INT = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def _dtype_of(t: Any) -> DType | None:
    try:
        return by_name(str(t.dtype).removeprefix("torch."))
    except KeyError:
        return None


def _import_torch(path: Path) -> Any:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading a torch checkpoint needs PyTorch, which is not installed "
            "(pip install torch, or convert the checkpoint to safetensors)"
        ) from e
    return torch


# A pickle can share one object many times (its memo), so a few KB can stand for a tuple of
# 9**9 leaves, and a 1 MB pickle for a tuple nested a million deep. Unpickling such a dict key
# hashes it: exponential time, or a C stack overflow (SIGSEGV) that no `except` catches. A
# state dict unfolds to a few dozen objects per tensor, nested a few levels deep.
_MAX_PICKLE_OBJECTS = 1 << 26
_MAX_PICKLE_DEPTH = 256
_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_PUT, _GET, _MARK, _MEMOIZE, _STOP, _DUP, _POP_MARK, _LEAF, _OTHER = range(9)
# Opcode -> what it does to the stack: its kind above, and (objects it takes above the mark,
# whether it takes a mark, objects it pushes, whether it grows the first object it takes).
_KIND: dict[str, int] = {}
_EFFECT: dict[str, tuple[int, bool, int, bool]] = {}
_NAMED = {"PUT": _PUT, "BINPUT": _PUT, "LONG_BINPUT": _PUT, "GET": _GET, "BINGET": _GET}
_NAMED |= {"LONG_BINGET": _GET, "MARK": _MARK, "MEMOIZE": _MEMOIZE, "STOP": _STOP}
_NAMED |= {"DUP": _DUP, "POP_MARK": _POP_MARK}
for _op in pickletools.opcodes:
    _marked = pickletools.markobject in _op.stack_before
    _fixed = _op.stack_before.index(pickletools.markobject) if _marked else len(_op.stack_before)
    _KIND[_op.code] = _NAMED.get(_op.name, _OTHER if _fixed or _marked else _LEAF)
    _EFFECT[_op.code] = (_fixed, _marked, len(_op.stack_after), _op.name in _IN_PLACE)


def _pickle_shape(stream: IO[bytes]) -> tuple[int, int]:
    """(objects, depth) of the pickle at `stream` once every shared reference is unfolded,
    from its opcodes alone (nothing is built). Stops early past the limits; a pickle that
    does not parse is measured up to where it breaks (torch.load then decides)."""
    stack: list[list[int]] = []  # [objects, depth] of each object on the pickle stack
    marks: list[int] = []
    memo: dict[Any, list[int]] = {}  # index -> the cell stored there
    most = deepest = 0
    with contextlib.suppress(Exception):
        for op, arg, _ in pickletools.genops(stream):
            kind = _KIND[op.code]
            if kind == _PUT:
                memo[arg] = stack[-1]
            elif kind == _GET:
                stack.append(memo.get(arg) or [1, 0])  # the same cell: sharing is counted
            elif kind == _LEAF:  # a constant, an empty container
                if _EFFECT[op.code][2]:
                    stack.append([1, 0])
            elif kind == _MARK:
                marks.append(len(stack))
            elif kind == _MEMOIZE:
                memo[len(memo)] = stack[-1]
            elif kind == _STOP:
                break
            elif kind == _DUP:
                stack.append(stack[-1])
            elif kind == _POP_MARK:
                del stack[marks.pop() :]
            else:
                fixed, marked, pushed, in_place = _EFFECT[op.code]
                at = (marks.pop() if marked else len(stack)) - fixed
                taken = stack[at:]
                del stack[at:]
                if in_place and taken:  # list.append, dict[k] = v, ...: grows taken[0]
                    cell = taken.pop(0)
                    stack.append(cell)
                else:
                    cell = [1, 0]
                    if pushed:
                        stack.append(cell)
                objects, depth = cell
                for child in taken:
                    objects += child[0]
                    if child[1] >= depth:
                        depth = child[1] + 1
                cell[0], cell[1] = objects, depth
                most, deepest = max(most, objects), max(deepest, depth)
                if most > _MAX_PICKLE_OBJECTS or deepest > _MAX_PICKLE_DEPTH:
                    break
    return most, deepest


def _pickles_of(path: Path) -> Iterator[IO[bytes]]:
    """Streams of the pickles torch.load would unpickle: every */data.pkl of a zip file (torch
    reads one; we cannot know which a damaged archive yields), else the legacy format's
    leading pickles. A zip file (by its first bytes, as torch tells) that Python's zipfile
    cannot read is refused: torch's own reader might still read a pickle we never saw."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            f.seek(0)
            for _ in range(5):  # magic number, protocol, system info, the object, storage keys
                yield f
            return
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith("data.pkl"):
                    continue
                with z.open(info) as member:
                    if info.compress_type == zipfile.ZIP_STORED:
                        yield io.BytesIO(member.read())  # no bigger than the file
                    else:  # streamed: a deflated member cannot balloon in memory
                        yield member
    except Exception as e:  # zipfile raises many types for damaged archives
        raise CheckpointError(
            f"{path}: torch.load failed: damaged zip archive: {type(e).__name__}: {e}"
        ) from None


def _check_pickle_shape(path: Path) -> None:
    for stream in _pickles_of(path):
        objects, depth = _pickle_shape(stream)
        if objects > _MAX_PICKLE_OBJECTS:
            what = f"unfolds to over {_MAX_PICKLE_OBJECTS} objects through shared references"
        elif depth > _MAX_PICKLE_DEPTH:
            what = f"nests objects over {_MAX_PICKLE_DEPTH} deep"
        else:
            continue
        raise CheckpointError(
            f"{path}: its pickle {what}; not a state dict (corrupt, or built to exhaust the reader)"
        )


def _load(torch: Any, path: Path, allow_pickle: bool) -> Any:
    def load(weights_only: bool, mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=weights_only)

    try:
        _check_pickle_shape(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e

    try:
        try:
            return load(weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # Legacy (pre-zip) serialization cannot be mapped: read it into memory.
            return load(weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: this file needs the full pickle machinery to load (it holds more "
                "than tensors, e.g. a pickled nn.Module or custom classes), and unpickling "
                "can run arbitrary code. Pass allow_pickle=True only if you trust its source."
            ) from e
    except CheckpointError:
        raise
    except Exception as e:  # torch raises many types for bad files
        raise CheckpointError(f"{path}: torch.load failed: {type(e).__name__}: {e}") from e
    try:
        try:
            return load(weights_only=False, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return load(weights_only=False, mmap=False)
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load failed: {type(e).__name__}: {e}") from e


def _state_dict(torch: Any, path: Path, obj: Any) -> dict[str, Any]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of tensors)"
        )

    def all_tensors(m: Mapping[Any, Any]) -> bool:
        return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in m.items())

    if all_tensors(obj):
        return dict(obj)
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, Mapping) and inner and all_tensors(inner):
            return dict(inner)
    bad = next(
        k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    )
    raise CheckpointError(
        f"{path}: entry {reprlib.repr(bad)} is a {type(obj[bad]).__name__}, not a tensor, and no "
        f"{'/'.join(_WRAPPER_KEYS)} key holds a flat state dict"
    )


class TorchFile:
    """A torch state dict file with the same interface as `SafetensorsFile`."""

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        torch = _import_torch(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        sd = _state_dict(torch, self.path, _load(torch, self.path, allow_pickle))
        self.metadata: dict[str, str] = {}
        self._tensors: dict[str, Any] = {}
        self._infos: dict[str, TensorInfo] = {}
        for name, t in sd.items():
            where = f"{self.path}: tensor {name!r}"
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # a pickled lone surrogate: no header can hold it
                raise CheckpointError(f"{where}: name is not valid Unicode") from None
            if t.is_quantized or t.is_nested:
                what = "quantized" if t.is_quantized else "nested"
                raise CheckpointError(f"{where}: {what} tensors are not supported")
            if t.layout != torch.strided:
                raise CheckpointError(f"{where}: layout {t.layout} is not supported")
            if t.device.type != "cpu":  # e.g. a "meta" tensor: a shape without data
                raise CheckpointError(f"{where}: tensor on device {t.device} holds no data")
            kind = _dtype_of(t)
            if kind is None:
                raise CheckpointError(f"{where}: dtype {t.dtype} is not supported")
            t = t.detach()
            if t.is_conj() or t.is_neg():  # lazy complex views numpy cannot map: resolve
                t = t.resolve_conj().resolve_neg()
            self._tensors[name] = t
            self._infos[name] = TensorInfo(
                name=name,
                shape=tuple(int(d) for d in t.shape),
                dtype=kind.safetensors,
                nbytes=t.numel() * t.element_size(),
                file=self.path,
                offset=None,
            )

    def names(self) -> list[str]:
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

    def get(self, name: str) -> np.ndarray[Any, np.dtype[Any]]:
        """A read-only numpy view of the tensor (BF16 as uint16, F8 as uint8); may be strided."""
        info = self.info(name)
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: file is closed; cannot read {name!r}")
        kind = by_name(name_of(info.dtype))
        arr: np.ndarray[Any, np.dtype[Any]]
        if kind.name == kind.storage.name and kind.storage.kind != "u":
            arr = t.numpy()  # numpy has the type itself
        else:  # bfloat16, float8, unsigned: the raw bits through a signed view
            import torch

            signed = t.view(getattr(torch, _SAME_SIZE_INT[kind.itemsize]))
            arr = signed.numpy().view(kind.storage)
        arr.flags.writeable = False
        return arr

    def prefetch(self, names: Iterable[str]) -> None:
        """No-op: torch owns the mapping."""

    def close(self) -> None:
        self._tensors.clear()

    def __enter__(self) -> TorchFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
