"""`TensorInfo`: what the headers say about one tensor, without reading its data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isofast.io.dtypes import numpy_dtype

__all__ = ["TensorInfo"]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a checkpoint, as described by its file's header.

    `dtype` is the safetensors spelling ("F32", "BF16", ...). `offset` is the absolute byte
    offset of the tensor's data in `file` for safetensors files (data is contiguous,
    little-endian, C order) and None for torch pickles.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    file: Path
    offset: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def numpy_dtype(self) -> np.dtype[np.generic]:
        """The numpy dtype `CheckpointReader.get` returns (uint16 for BF16, uint8 for F8)."""
        return numpy_dtype(self.dtype)
