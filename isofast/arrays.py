"""Framework-neutral handling of the arrays a user passes in: torch tensors (CPU or CUDA), cupy
arrays, numpy arrays, and raw 16-bit arrays tagged as bfloat16 (what the checkpoint readers
give for BF16 data)."""

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


def is_cupy(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "__dlpack__")


def device_of(x: Any) -> str:
    """Where an array lives: 'cpu' or 'cuda:N'."""
    if is_torch(x) and x.device.type == "cuda":
        return f"cuda:{x.device.index or 0}"
    if is_cupy(x):
        return f"cuda:{int(x.device.id)}"
    return "cpu"


def dtype_name(x: Any) -> str:
    """'float32', 'bfloat16', 'int64', 'bool', ... for torch, cupy, numpy and Bf16Array inputs."""
    if isinstance(x, Bf16Array):
        return "bfloat16"
    if is_torch(x):
        return str(x.dtype).removeprefix("torch.")
    if isinstance(x, np.ndarray) or is_cupy(x):
        return str(x.dtype)
    raise TypeError(f"expected a torch tensor or numpy array, got {type(x).__name__}")


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def is_float(x: Any) -> bool:
    return dtype_name(x) in FLOAT_DTYPES


def core_arg(x: Any) -> Any:
    """What the CPU core takes: a contiguous DLPack exporter, or (array, 'bfloat16'). An array
    on a GPU is copied to the host (what the CPU core merges: vectors, elementwise methods)."""
    if isinstance(x, Bf16Array):
        return (np.ascontiguousarray(x.bits), "bfloat16")
    if is_torch(x):
        if x.device.type != "cpu":
            return x.detach().cpu().contiguous()
        return x if x.is_contiguous() else x.contiguous()
    if is_cupy(x):
        return x.get()  # a numpy copy on the host
    return np.ascontiguousarray(x)


def result_kind(x: Any) -> str:
    """ "torch", "cupy" or "numpy": the kind of array a merge returns for inputs like x."""
    return "torch" if is_torch(x) else "cupy" if is_cupy(x) else "numpy"


def to_device(x: Any, device: str, kind: str) -> Any:
    """A merged host array (torch or numpy, as `empty` made it) moved to `device` as `kind`."""
    if device == "cpu":
        return x
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(int(device.removeprefix("cuda:"))):
            return cupy.asarray(x.numpy() if is_torch(x) else x)
    return x.to(device)


def from_torch(x: Any, kind: str) -> Any:
    """A torch tensor (on a GPU) as `kind`: itself, or a zero-copy cupy view through DLPack."""
    if kind == "cupy":
        import cupy

        return cupy.from_dlpack(x)
    return x


def empty(shape: tuple[int, ...], dtype: str, kind: str) -> Any:
    """An uninitialised host array of `kind` ("torch" or "numpy"; numpy bfloat16 as Bf16Array;
    "cupy": numpy, moved to the GPU by `to_device`)."""
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
    if kind == "cupy" and is_cupy(x):
        return x.copy()
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
