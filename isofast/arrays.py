"""Framework-neutral handling of the arrays a user passes in: torch tensors, numpy arrays, and
raw 16-bit arrays tagged as bfloat16 (what the checkpoint readers give for BF16 data)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from isofast.io.dtypes import FLOAT_DTYPES, by_name


@dataclass(frozen=True)
class Bf16Array:
    """A numpy uint16 array whose bits are bfloat16 values (numpy has no bfloat16)."""

    bits: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)


def _torch() -> Any:
    return sys.modules.get("torch")


def is_torch(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def dtype_name(x: Any) -> str:
    """'float32', 'bfloat16', 'int64', 'bool', ... for torch, numpy and Bf16Array inputs."""
    if isinstance(x, Bf16Array):
        return "bfloat16"
    if is_torch(x):
        return str(x.dtype).removeprefix("torch.")
    if isinstance(x, np.ndarray):
        return str(x.dtype)
    raise TypeError(f"expected a torch tensor or numpy array, got {type(x).__name__}")


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def is_float(x: Any) -> bool:
    return dtype_name(x) in FLOAT_DTYPES


def core_arg(x: Any) -> Any:
    """What the compiled core takes: a contiguous DLPack exporter, or (array, 'bfloat16')."""
    if isinstance(x, Bf16Array):
        return (np.ascontiguousarray(x.bits), "bfloat16")
    if is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(f"tensor on {x.device}: the CPU core needs CPU tensors")
        return x if x.is_contiguous() else x.contiguous()
    return np.ascontiguousarray(x)


def result_kind(x: Any) -> str:
    """ "torch" or "numpy": the kind of array a merge returns for inputs like x."""
    return "torch" if is_torch(x) else "numpy"


def empty(shape: tuple[int, ...], dtype: str, kind: str) -> Any:
    """An uninitialised array of `kind` ("torch" or "numpy"; numpy bfloat16 as Bf16Array)."""
    if kind == "torch":
        torch = _torch()
        return torch.empty(shape, dtype=getattr(torch, dtype))
    if dtype == "bfloat16":
        return Bf16Array(np.empty(shape, dtype=np.uint16))
    return np.empty(shape, dtype=dtype)


def copy_as(x: Any, kind: str) -> Any:
    """A copy of x as an array of `kind` (x: torch, numpy, or a Bf16Array of raw bits)."""
    if kind == "torch":
        torch = _torch()
        if is_torch(x):
            return x.detach().clone()
        if isinstance(x, Bf16Array):
            return torch.from_numpy(x.bits.astype(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(x, copy=True))
    if isinstance(x, Bf16Array):
        return Bf16Array(x.bits.copy())
    return np.array(x.numpy() if is_torch(x) else x, copy=True)


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name ('bfloat16' included)."""
    return by_name(dtype).itemsize


def nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * itemsize(dtype)


def storage_bits(x: Any) -> np.ndarray:
    """The numpy array whose bytes are written to disk for a merged output."""
    if isinstance(x, Bf16Array):
        return x.bits
    if is_torch(x):
        torch = _torch()
        if x.dtype == torch.bfloat16:
            return np.asarray(x.view(torch.uint16).numpy())
        return np.asarray(x.numpy())
    return np.asarray(x)
