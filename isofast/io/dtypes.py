"""Dtype names as safetensors spells them, and the numpy dtype each one is stored as.

numpy has no bfloat16 or float8, so those come back as unsigned integer views of the raw
bits (BF16 -> uint16, F8_* -> uint8); `TensorInfo.dtype` keeps the real name and the core
reinterprets the bits.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "DTYPE_ITEMSIZE",
    "SUB_BYTE_DTYPES",
    "dtype_str_for_numpy",
    "is_compatible",
    "numpy_dtype",
]

# safetensors name -> numpy storage dtype (always little-endian).
_STORAGE: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "F8_E4M3FNUZ": np.dtype("u1"),
    "F8_E5M2FNUZ": np.dtype("u1"),
    "F8_E8M0": np.dtype("u1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
}

DTYPE_ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in _STORAGE.items()}

# Known to safetensors but packed below one byte per element: not supported here.
SUB_BYTE_DTYPES: frozenset[str] = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

# numpy dtype (native kind + itemsize) -> safetensors name, for inference in the writer.
_FROM_NUMPY: dict[tuple[str, int], str] = {
    ("b", 1): "BOOL",
    ("u", 1): "U8",
    ("i", 1): "I8",
    ("i", 2): "I16",
    ("u", 2): "U16",
    ("f", 2): "F16",
    ("i", 4): "I32",
    ("u", 4): "U32",
    ("f", 4): "F32",
    ("i", 8): "I64",
    ("u", 8): "U64",
    ("f", 8): "F64",
    ("c", 8): "C64",
}

# Extension dtypes (ml_dtypes) that hold the real type rather than raw bits.
_EXTENSION_NAMES: dict[str, str] = {
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}


def numpy_dtype(dtype_str: str) -> np.dtype[np.generic]:
    """The little-endian numpy dtype a tensor of `dtype_str` is viewed as.

    Raises KeyError for names that are not byte-sized safetensors dtypes.
    """
    return _STORAGE[dtype_str]


def dtype_str_for_numpy(dtype: np.dtype[np.generic]) -> str | None:
    """The safetensors name for a numpy dtype, or None when there is none.

    Plain uint16 maps to U16 (not BF16): pass the name explicitly for raw bf16 bits.
    """
    if dtype.name in _EXTENSION_NAMES:
        return _EXTENSION_NAMES[dtype.name]
    return _FROM_NUMPY.get((dtype.kind, dtype.itemsize))


def is_compatible(dtype: np.dtype[np.generic], dtype_str: str) -> bool:
    """Whether an array of `dtype` may be written as `dtype_str` without conversion.

    Either the exact type (byte order aside), or, for BF16 / F8_*, raw bits held in an
    unsigned or signed integer of the same size.
    """
    storage = _STORAGE.get(dtype_str)
    if storage is None or dtype.itemsize != storage.itemsize:
        return False
    exact = dtype_str_for_numpy(dtype)
    if exact == dtype_str:
        return True
    raw_bits = dtype_str == "BF16" or dtype_str.startswith("F8_")
    return raw_bits and dtype.kind in "ui"
