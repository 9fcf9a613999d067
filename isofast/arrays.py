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
