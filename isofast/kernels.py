"""The method registry's kernel names, bound to the compiled core's `Kernel` enum.

Checked when this module is imported: a registered method whose kernel the compiled core lacks
(a Python package out of step with its core) fails here, before any merge starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from isofast._native import core
from isofast.methods import METHODS, MethodSpec, Params
from isofast.param_schedule import position

if TYPE_CHECKING:
    from isofast.request import MergeRequest


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


def kernel_options(
    spec: MethodSpec, params: Params, request: MergeRequest, threads: int, alpha: float
) -> core.MergeOptions:
    """The compiled kernel's typed options for a method (no whole-model passes): the one
    place a request and a method's parameters become core options."""
    options = core.MergeOptions()
    options.kernel = kernel_of(spec.kernel)
    options.alpha = alpha
    options.compute64 = request.compute_dtype == "float64"
    options.dare.seed = request.seed
    options.threads = threads
    params.configure(options)
    return options


def configure_tensor(
    options: core.MergeOptions, params: Params, name: str, names: Sequence[str]
) -> None:
    """Set `options` to the parameters of tensor `name` of a model whose tensors are `names`
    (gradients run over its layers), where some parameter varies per tensor."""
    if params.per_tensor:
        params.resolve(name, position(name, names)).configure(options)
