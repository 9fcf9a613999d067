"""Framework-neutral handling of the arrays a user passes in: torch tensors, numpy arrays, and
raw 16-bit arrays tagged as bfloat16 (what the checkpoint readers give for BF16 data)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")


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


def empty_like(x: Any, dtype: str) -> Any:
    """Uninitialised output of x's shape and framework in `dtype`."""
    if is_torch(x):
        torch = _torch()
        return torch.empty(shape_of(x), dtype=getattr(torch, dtype))
    if dtype == "bfloat16":
        return Bf16Array(np.empty(shape_of(x), dtype=np.uint16))
    return np.empty(shape_of(x), dtype=dtype)


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name ('bfloat16' included)."""
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def copy_of(x: Any) -> Any:
    if is_torch(x):
        return x.detach().clone()
    if isinstance(x, Bf16Array):
        return Bf16Array(x.bits.copy())
    return np.array(x, copy=True)


def numel(x: Any) -> int:
    n = 1
    for s in shape_of(x):
        n *= s
    return n


# safetensors dtype spelling <-> isofast dtype names.
SAFETENSORS_TO_NAME = {
    "F32": "float32",
    "F64": "float64",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
NAME_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_NAME.items()}


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
