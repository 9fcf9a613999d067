"""Loads the compiled core after making sure OpenBLAS from scipy-openblas32 is loadable."""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os

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

from isofast import _core as core  # noqa: E402

__all__ = ["core"]
