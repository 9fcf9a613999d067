"""isofast: fast, memory-frugal model merging (Iso-C, Iso-CTS, TSV-M, TIES, DARE, consensus).

`isofast.merge` merges state dicts in memory or checkpoints on disk, into memory or into a
folder; `isofast.plan` tells what a merge would do from headers alone; `isofast.analyze`
measures how each task aligns with the merged update (SAR, spectra); `isofast.methods()`
lists the methods and their parameters. `isofast.merge_adapters` merges PEFT LoRA adapters
without forming their dense updates (`isofast.plan_adapters`: the same from headers alone).
Library messages go to the `isofast` logger.
"""

import logging
from typing import TYPE_CHECKING, Any

from isofast.errors import (
    BackendUnavailable,
    InsufficientMemory,
    IsofastError,
    LinAlgError,
    MergeInputError,
    MergeWarning,
)
from isofast.methods import methods

if TYPE_CHECKING:
    from isofast.adapters import merge_adapters, plan_adapters
    from isofast.analysis import analyze
    from isofast.api import merge, plan
    from isofast.planner import MergePlan
    from isofast.request import MergeRequest

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "InsufficientMemory",
    "IsofastError",
    "LinAlgError",
    "MergeInputError",
    "MergePlan",
    "MergeRequest",
    "MergeWarning",
    "__version__",
    "analyze",
    "merge",
    "merge_adapters",
    "methods",
    "plan",
    "plan_adapters",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Loaded on first use: they load numpy and the compiled core, and the command line must
# configure OpenBLAS before either is loaded (isofast/_cli_env.py).
_LAZY = {
    "analyze": "isofast.analysis",
    "merge": "isofast.api",
    "merge_adapters": "isofast.adapters",
    "plan_adapters": "isofast.adapters",
    "plan": "isofast.api",
    "MergePlan": "isofast.planner",
    "MergeRequest": "isofast.request",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # replaces a submodule of the same name bound by the import
        return value
    raise AttributeError(f"module 'isofast' has no attribute {name!r}")
