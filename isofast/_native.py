"""Loads the compiled core after making sure OpenBLAS from scipy-openblas32 is loadable."""

from __future__ import annotations

import ctypes
import os

import scipy_openblas32

# The extension has an rpath into scipy_openblas32/lib; preloading covers layouts where that
# relative path does not hold (editable installs, unusual site-packages arrangements).
_lib = os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so")
if os.path.exists(_lib):
    ctypes.CDLL(_lib, mode=ctypes.RTLD_GLOBAL)

from isofast import _core as core  # noqa: E402

__all__ = ["core"]
