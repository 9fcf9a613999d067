"""isofast: fast, memory-frugal model merging (Iso-C, Iso-CTS, TSV-M, TIES, DARE, consensus)."""

from isofast.errors import BackendUnavailable, IsofastError, LinAlgError, MergeInputError
from isofast.merge import merge
from isofast.methods import methods

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
