"""Process settings for the `isofast` command, applied before numpy or the core loads.

OpenBLAS (numpy's copy and the core's) starts a pool of threads that spin for a while after
loading and after every call. The command line's merges are run by the core, which sets the
BLAS threads it wants itself (all cores for large matrices); idle pools spinning beside it
cost a task-arithmetic merge of an 8.9 GiB LLM set 12% of its wall time (2.06 -> 1.79 s,
median of 5, bench/RESULTS.md). A value the user set is kept.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
