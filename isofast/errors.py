"""Exception types raised by isofast (the compiled core raises these too)."""

from __future__ import annotations

import reprlib
from typing import Any

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlevel = 3


def short(value: Any) -> str:
    """A value quoted in an error message, cut short: configs may hold huge or deeply shared
    structures (YAML aliases), which a plain repr would spell out in full."""
    return _SHORT.repr(value)


class IsofastError(Exception):
    """Base class of every isofast-specific error."""


class LinAlgError(IsofastError, RuntimeError):
    """A LAPACK/BLAS (or cuSOLVER/cuBLAS) routine failed, e.g. on NaN input to an SVD."""


class MergeInputError(IsofastError, ValueError):
    """The models or parameters given to a merge are inconsistent (names the tensor/model)."""


class BackendUnavailable(IsofastError, RuntimeError):
    """The requested device backend was not built or cannot run on this machine."""


class MergeWarning(UserWarning):
    """A merge that runs but probably not as meant (e.g. every matrix excluded)."""


class InsufficientMemory(IsofastError, MemoryError):
    """A merge's planned peak memory is more than the machine has available."""
