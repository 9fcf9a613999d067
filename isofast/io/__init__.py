"""Checkpoint I/O: lazy memory-mapped readers and an atomic sharded safetensors writer."""

from isofast.io.dtypes import DTYPE_ITEMSIZE as DTYPE_ITEMSIZE
from isofast.io.dtypes import numpy_dtype as numpy_dtype
from isofast.io.errors import CheckpointError as CheckpointError
from isofast.io.reader import CheckpointReader as CheckpointReader
from isofast.io.safetensors_format import SafetensorsFile as SafetensorsFile
from isofast.io.side_files import SIDE_FILE_PATTERNS as SIDE_FILE_PATTERNS
from isofast.io.side_files import copy_side_files as copy_side_files
from isofast.io.tensor_info import TensorInfo as TensorInfo
from isofast.io.writer import INDEX_NAME as INDEX_NAME
from isofast.io.writer import SINGLE_NAME as SINGLE_NAME
from isofast.io.writer import CheckpointWriter as CheckpointWriter
from isofast.io.writer import shard_name as shard_name

__all__ = [
    "DTYPE_ITEMSIZE",
    "INDEX_NAME",
    "SIDE_FILE_PATTERNS",
    "SINGLE_NAME",
    "CheckpointError",
    "CheckpointReader",
    "CheckpointWriter",
    "SafetensorsFile",
    "TensorInfo",
    "copy_side_files",
    "numpy_dtype",
    "shard_name",
]
