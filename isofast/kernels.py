"""The method registry's kernel names, bound to the compiled core's `Kernel` enum.

Checked when this module is imported: a registered method whose kernel the compiled core lacks
(a Python package out of step with its core) fails here, before any merge starts.
"""

from __future__ import annotations

from isofast._native import core
from isofast.methods import METHODS


def _bind_kernels() -> dict[str, core.Kernel]:
    members = core.Kernel.__members__
    missing = sorted({spec.kernel for spec in METHODS.values()} - set(members))
    if missing:
        raise ImportError(
            f"the compiled core has no kernel for {', '.join(missing)}: the isofast package and "
            "its compiled core are out of step; reinstall isofast"
        )
    return {spec.kernel: members[spec.kernel] for spec in METHODS.values()}


KERNELS: dict[str, core.Kernel] = _bind_kernels()


def kernel_of(name: str) -> core.Kernel:
    """The core's kernel for a registry kernel name (e.g. 'iso_cts')."""
    return KERNELS[name]
