"""The one exception class of the checkpoint I/O layer."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be read or written as asked.

    Messages always name the file and, where one is involved, the tensor.
    """
