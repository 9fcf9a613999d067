"""isofast: fast, memory-frugal model merging (Iso-C, Iso-CTS, TSV-M, TIES, DARE, consensus)."""

from typing import TYPE_CHECKING, Any

from isofast.errors import BackendUnavailable, IsofastError, LinAlgError, MergeInputError
from isofast.methods import methods

if TYPE_CHECKING:
    from isofast.merge import merge

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "IsofastError",
    "LinAlgError",
    "MergeInputError",
    "__version__",
    "merge",
    "methods",
]


def __getattr__(name: str) -> Any:
    # `merge` loads numpy and the compiled core: on first use, so that the command line can
    # configure OpenBLAS before either is loaded (isofast/_cli_env.py).
    if name == "merge":
        from isofast.merge import merge as function

        globals()["merge"] = function  # replaces the submodule the import bound here
        return function
    raise AttributeError(f"module 'isofast' has no attribute {name!r}")
