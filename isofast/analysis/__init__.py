"""`isofast analyze`: why a merge works or neglects a task, measured before any evaluation.

For the inputs of a merge, per 2-D key and per task: the subspace alignment ratio (SAR) of the
task matrix against each method's merged update, the spectra of the task-arithmetic sum and of
each update (condition number, effective rank, flatness), each task's norm share and the
overlaps of the tasks' subspaces; summaries per layer, task and method; JSON, Markdown and PNG
plots. Definitions: docs/ALGORITHMS.md, section 9.

Modules, one job each: `spectra` (the measures of a matrix), `updates` (a key's merged update,
by the merge's own kernels), `keys` (every measure of one key), `summary` (the data the outputs
show), `report` (Markdown), `plots` (PNGs), `api` (the entry points).
"""

from isofast.analysis.api import analyze, analyze_request

__all__ = ["analyze", "analyze_request"]
