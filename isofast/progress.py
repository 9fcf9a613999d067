"""Progress bar for long merges: tensors done and input MB/s (tqdm on stderr)."""

from __future__ import annotations

import sys
from types import TracebackType

from tqdm import tqdm


class ProgressBar:
    def __init__(
        self, total_bytes: int, total_tensors: int, disable: bool = False, desc: str = "merging"
    ) -> None:
        self.total_tensors = total_tensors
        self.done = 0
        self._bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            disable=disable or (not sys.stderr.isatty() and total_bytes < 2**30),
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def update(self, name: str, nbytes: int) -> None:
        self.done += 1
        self._bar.set_postfix_str(f"{self.done}/{self.total_tensors} tensors", refresh=False)
        self._bar.update(nbytes)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bar.close()
