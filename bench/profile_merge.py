"""Where isofast's CPU time goes: run one in-memory merge under perf, then group the samples.

    perf record -F 999 -o /tmp/p.data -- python bench/profile_merge.py run iso_cts 2 8
    python bench/profile_merge.py summarize /tmp/p.data

`run METHOD BLOCKS T` merges the cached synthetic ViT-B/32 inputs of bench_methods.py
(`--blocks BLOCKS --tasks T`; run that first so they exist) with `isofast.merge(threads=2)`.
`summarize` groups `perf report` symbols into the categories of bench/RESULTS.md's profile
table. Loading the inputs is part of the process, so it shows up (Python, torch, file reads).
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys

CATEGORIES = [
    (
        "symmetric eigensolver",
        r"sytrd|sytd2|latrd|symv|syr2|stemr|larr|ormtr|ormql|orm2l|larfb|larft|larfg|larf_|"
        r"stebz|stein|laneg|lasq|sterf|syevr|lasrt|laev2|laebz|lar1v|lagts|lagtf|gemv|dot_|"
        r"axpy|scal_k|nrm2",
    ),
    ("gesdd", r"bdsdc|gebrd|labrd|ormbr|orgbr|lasd|bdsqr|gesdd|gelq|geqr|lascl|lartg"),
    ("GEMM / SYRK (BLAS 3)", r"gemm|syrk|trmm|_beta|oncopy|otcopy|itcopy|incopy"),
    ("isofast core", r"_core\.cpython"),
    ("OS (page faults, zeroing, file reads)", r"\[kernel|libc\.so"),
    ("OpenBLAS threads waiting", r"blas_thread_server|inner_thread"),
    ("Python, torch, loading", r"libpython|libtorch|libc10|_C\.cpython|python3"),
]
LINE = re.compile(r"\s+([0-9.]+)%\s+(\S+)\s+\[.\]\s+(.*)")


def run(method: str, blocks: int, tasks: int) -> None:
    import synthetic_inputs as inputs
    import torch

    import isofast

    folder = inputs.inputs_dir(inputs.DEFAULT_CACHE, "B/32", blocks, tasks)
    vectors = inputs.load_inputs(folder, tasks)
    base = {k: torch.zeros_like(v) for k, v in vectors[0].items()}
    isofast.merge(base, vectors, method, 1.0, threads=2)


def summarize(data: str) -> None:
    report = subprocess.run(
        ["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: collections.Counter[str] = collections.Counter()
    for line in report.splitlines():
        found = LINE.match(line)
        if not found:
            continue
        pct, where = float(found.group(1)), f"{found.group(2)} {found.group(3)}"
        name = next((n for n, rx in CATEGORIES if re.search(rx, where, re.I)), "other")
        shares[name] += pct
    for name, pct in shares.most_common():
        print(f"{pct:5.1f}%  {name}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "run":
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif len(sys.argv) == 3 and sys.argv[1] == "summarize":
        summarize(sys.argv[2])
    else:
        sys.exit(__doc__)
