"""TIES with a whole-model trim: the exact per-task magnitude threshold by radix selection over
the bit patterns of |task vector| (16 bits per pass), then the whole-model majority-sign vote.

Each pass needs one sum over the whole model (a histogram of bit patterns, a vote), taken by a
callable: over a re-iterable source of core items in one process (`global_ties_options`), or
over parts summed by other processes (isofast.ray_executor). The sums are integers, so every
way of splitting them gives the same thresholds, bit for bit."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from isofast._native import core
from isofast.models import CoreItem

ItemSource = Callable[[], Iterable[list[CoreItem]]]
# (digit, per-task prefixes) -> tasks x 65536 counts of |D_t| bit patterns over the model.
Histogram = Callable[[int, list[int]], npt.NDArray[np.int64]]
# options with the thresholds -> the whole model's sign vote.
Vote = Callable[[core.MergeOptions], int]


@dataclass(frozen=True)
class TiesTotals:
    """What the whole-model passes find: plain numbers, so they travel to other processes."""

    thresholds: tuple[float, ...]
    majority_sign: int

    def apply(self, options: core.MergeOptions) -> core.MergeOptions:
        """A copy of the core options completed with these."""
        completed = core.MergeOptions(options)
        completed.ties.thresholds = list(self.thresholds)
        completed.ties.majority_sign = self.majority_sign
        return completed


def kth_index(total: int, density: float) -> int:
    """1-based rank of the threshold among |x| sorted ascending (docs/CONTRACT.md)."""
    return math.floor(total * (1.0 - density))


def exact_thresholds(
    histogram: Histogram, tasks: int, total: int, density: float, compute64: bool
) -> list[float]:
    """Per task, the kth smallest |D_t| over every float tensor of the model."""
    kth = kth_index(total, density)
    if kth < 1:
        return [-math.inf] * tasks
    digits = 4 if compute64 else 2
    prefixes = [0] * tasks
    ranks = [kth] * tasks
    for digit in range(digits):
        hist = histogram(digit, prefixes)
        for t in range(tasks):
            cum = np.cumsum(hist[t])
            b = int(np.searchsorted(cum, ranks[t]))  # first bin whose cumulative count >= rank
            ranks[t] -= int(cum[b - 1]) if b > 0 else 0
            prefixes[t] = (prefixes[t] << 16) | b
    bits_type, float_type = (np.uint64, np.float64) if compute64 else (np.uint32, np.float32)
    return [float(np.array(p, dtype=bits_type).view(float_type)) for p in prefixes]


def whole_model_ties(
    histogram: Histogram,
    vote: Vote,
    tasks: int,
    total: int,
    density: float,
    options: core.MergeOptions,
) -> TiesTotals:
    thresholds = tuple(exact_thresholds(histogram, tasks, total, density, options.compute64))
    votes = vote(TiesTotals(thresholds, 0).apply(options))
    return TiesTotals(thresholds, (votes > 0) - (votes < 0))


def summed_histogram(source: ItemSource, tasks: int, options: core.MergeOptions) -> Histogram:
    """The histogram pass over the items `source` gives (called afresh for each pass)."""

    def histogram(digit: int, prefixes: list[int]) -> npt.NDArray[np.int64]:
        hist = np.zeros((tasks, 65536), dtype=np.int64)
        for batch in source():
            hist += core.abs_histogram(batch, options, digit, prefixes)
        return hist

    return histogram


def summed_vote(source: ItemSource) -> Vote:
    return lambda options: sum(core.ties_vote(batch, options) for batch in source())


def global_ties_options(
    source: ItemSource, tasks: int, total: int, density: float, options: core.MergeOptions
) -> core.MergeOptions:
    """A copy of the core options completed with the whole-model thresholds and majority
    sign, every pass in this process."""
    histogram = summed_histogram(source, tasks, options)
    totals = whole_model_ties(histogram, summed_vote(source), tasks, total, density, options)
    return totals.apply(options)
