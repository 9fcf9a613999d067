"""Loads the compiled core after making sure OpenBLAS from scipy-openblas32 is loadable."""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
from pathlib import Path

# The extension has an rpath into scipy_openblas32/lib; preloading covers layouts where that
# relative path does not hold (editable installs, unusual site-packages arrangements). The
# package is located, not imported: its __init__ reads its version through importlib.metadata,
# which cost about 30 ms of every CLI start.
_spec = importlib.util.find_spec("scipy_openblas32")
if _spec is not None and _spec.origin is not None:
    _lib_dir = os.path.join(os.path.dirname(_spec.origin), "lib")
    for _lib in sorted(glob.glob(os.path.join(_lib_dir, "libscipy_openblas*.so"))):
        ctypes.CDLL(_lib, mode=ctypes.RTLD_GLOBAL)
        break


def _not_built(exc: ImportError) -> ImportError:
    """The usual cause: Python found the source checkout (the current folder comes first on
    sys.path) instead of the installed package, and the source has no compiled core."""
    package = Path(__file__).resolve().parent
    if (package.parent / "pyproject.toml").is_file() and (package.parent / "csrc").is_dir():
        return ImportError(
            f"isofast's compiled core is not in {package}: Python imported the source checkout "
            f"instead of the installed package (the current folder comes first on sys.path). "
            f"Run from another folder, or build in place with "
            f"`pip install --no-build-isolation -e .`"
        )
    return ImportError(f"isofast's compiled core could not be loaded: {exc}")


try:
    from isofast import _core as core
except ImportError as _exc:
    raise _not_built(_exc) from _exc

__all__ = ["core"]
