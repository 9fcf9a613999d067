"""One torch `.pt`/`.bin`/`.pth` state dict, memory-mapped through `torch.load`.

torch is imported only when such a file is opened. Files are loaded with
`weights_only=True` (no arbitrary code runs); a file that needs the full pickle machinery
is refused unless the caller passes `allow_pickle=True`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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


def _load(torch: Any, path: Path, allow_pickle: bool) -> Any:
    def load(weights_only: bool, mmap: bool) -> Any:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=weights_only)

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
        f"{path}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor, and no "
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
            if t.layout != torch.strided or t.is_quantized:
                raise CheckpointError(f"{where}: layout {t.layout} is not supported")
            kind = _dtype_of(t)
            if kind is None:
                raise CheckpointError(f"{where}: dtype {t.dtype} is not supported")
            t = t.detach()
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
