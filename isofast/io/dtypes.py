"""The one dtype table: every tensor dtype isofast knows, as safetensors spells it, as isofast
(and torch) names it, and the numpy dtype its bytes are viewed as.

numpy has no bfloat16 or float8, so those are viewed as unsigned integers of their raw bits
(BF16 -> uint16, F8_* -> uint8); the name keeps the real type and the core reinterprets the
bits. Only the four float types below are merged; every other dtype is copied from the base.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "COMPUTE_DTYPES",
    "DTYPES",
    "DTYPE_ITEMSIZE",
    "FLOAT_DTYPES",
    "SUB_BYTE_DTYPES",
    "DType",
    "by_name",
    "dtype_str_for_numpy",
    "is_compatible",
    "name_of",
    "numpy_dtype",
    "parse_float_dtype",
    "safetensors_name",
]


@dataclass(frozen=True)
class DType:
    safetensors: str  # "BF16"
    name: str  # "bfloat16" (torch's spelling, without "torch.")
    storage: np.dtype[np.generic]  # little-endian numpy view of the bytes
    merged: bool = False  # a float type the methods merge (others are copied from the base)

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize


DTYPES: tuple[DType, ...] = (
    DType("F32", "float32", np.dtype("<f4"), merged=True),
    DType("F64", "float64", np.dtype("<f8"), merged=True),
    DType("F16", "float16", np.dtype("<f2"), merged=True),
    DType("BF16", "bfloat16", np.dtype("<u2"), merged=True),
    DType("BOOL", "bool", np.dtype(np.bool_)),
    DType("U8", "uint8", np.dtype("u1")),
    DType("I8", "int8", np.dtype("i1")),
    DType("I16", "int16", np.dtype("<i2")),
    DType("U16", "uint16", np.dtype("<u2")),
    DType("I32", "int32", np.dtype("<i4")),
    DType("U32", "uint32", np.dtype("<u4")),
    DType("I64", "int64", np.dtype("<i8")),
    DType("U64", "uint64", np.dtype("<u8")),
    DType("C64", "complex64", np.dtype("<c8")),
    DType("F8_E4M3", "float8_e4m3fn", np.dtype("u1")),
    DType("F8_E5M2", "float8_e5m2", np.dtype("u1")),
    DType("F8_E4M3FNUZ", "float8_e4m3fnuz", np.dtype("u1")),
    DType("F8_E5M2FNUZ", "float8_e5m2fnuz", np.dtype("u1")),
    DType("F8_E8M0", "float8_e8m0fnu", np.dtype("u1")),
)
_BY_SAFETENSORS = {d.safetensors: d for d in DTYPES}
_BY_NAME = {d.name: d for d in DTYPES}

FLOAT_DTYPES: tuple[str, ...] = tuple(d.name for d in DTYPES if d.merged)
COMPUTE_DTYPES: tuple[str, ...] = ("float32", "float64")
DTYPE_ITEMSIZE: dict[str, int] = {d.safetensors: d.itemsize for d in DTYPES}

# Known to safetensors but packed below one byte per element: not supported here.
SUB_BYTE_DTYPES: frozenset[str] = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

# Short spellings users write (mergekit configs, command lines).
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}
_ALIASES |= {"float": "float32", "fp64": "float64", "double": "float64"}


def numpy_dtype(dtype_str: str) -> np.dtype[np.generic]:
    """The little-endian numpy dtype a tensor of safetensors dtype `dtype_str` is viewed as.

    Raises KeyError for names that are not byte-sized safetensors dtypes.
    """
    return _BY_SAFETENSORS[dtype_str].storage


def name_of(dtype_str: str) -> str:
    """isofast's name of a safetensors dtype ('BF16' -> 'bfloat16'); unknown names as given."""
    found = _BY_SAFETENSORS.get(dtype_str)
    return found.name if found else dtype_str


def safetensors_name(name: str) -> str:
    """The safetensors spelling of an isofast dtype name ('bfloat16' -> 'BF16')."""
    return _BY_NAME[name].safetensors


def by_name(name: str) -> DType:
    """The table row of an isofast dtype name; KeyError when unknown."""
    return _BY_NAME[name]


def parse_float_dtype(text: object, what: str = "dtype") -> str:
    """A user's spelling of a merged float type ('bf16', 'torch.bfloat16', 'float32') ->
    its isofast name. ValueError naming `what` otherwise."""
    name = str(text).strip().lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(FLOAT_DTYPES)}, got {text!r}")
    return name


def dtype_str_for_numpy(dtype: np.dtype[np.generic]) -> str | None:
    """The safetensors name for a numpy dtype, or None when there is none.

    Plain uint16 maps to U16 (not BF16): pass the name explicitly for raw bf16 bits. Extension
    dtypes (ml_dtypes' bfloat16, float8_*) that hold the real type map by their name.
    """
    row = _BY_NAME.get(dtype.name)
    if row is not None and row.name != row.storage.name:  # a real bfloat16 / float8 type
        return row.safetensors
    for row in DTYPES:
        plain = row.name == row.storage.name
        if plain and (row.storage.kind, row.itemsize) == (dtype.kind, dtype.itemsize):
            return row.safetensors
    return None


def is_compatible(dtype: np.dtype[np.generic], dtype_str: str) -> bool:
    """Whether an array of `dtype` may be written as `dtype_str` without conversion.

    Either the exact type (byte order aside), or, for BF16 / F8_*, raw bits held in an
    unsigned or signed integer of the same size.
    """
    row = _BY_SAFETENSORS.get(dtype_str)
    if row is None or dtype.itemsize != row.itemsize:
        return False
    if dtype_str_for_numpy(dtype) == dtype_str:
        return True
    raw_bits = dtype_str == "BF16" or dtype_str.startswith("F8_")
    return raw_bits and dtype.kind in "ui"
