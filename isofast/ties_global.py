"""TIES with a whole-model trim: the exact per-task magnitude threshold by radix selection over
the bit patterns of |task vector| (16 bits per pass), then the whole-model majority-sign vote.
Works on any re-iterable source of core items, so in-memory and out-of-core merges share it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from isofast._native import core
from isofast.models import CoreItem

ItemSource = Callable[[], Iterable[list[CoreItem]]]


def kth_index(total: int, density: float) -> int:
    """1-based rank of the threshold among |x| sorted ascending (docs/CONTRACT.md)."""
    return math.floor(total * (1.0 - density))


def exact_thresholds(
    source: ItemSource, tasks: int, total: int, density: float, options: core.MergeOptions
) -> list[float]:
    """Per task, the kth smallest |D_t| over every float tensor of the model."""
    kth = kth_index(total, density)
    if kth < 1:
        return [-math.inf] * tasks
    compute64 = options.compute64
    digits = 4 if compute64 else 2
    prefixes = [0] * tasks
    ranks = [kth] * tasks
    for digit in range(digits):
        hist = np.zeros((tasks, 65536), dtype=np.int64)
        for batch in source():
            hist += core.abs_histogram(batch, options, digit, prefixes)
        for t in range(tasks):
            cum = np.cumsum(hist[t])
            b = int(np.searchsorted(cum, ranks[t]))  # first bin whose cumulative count >= rank
            ranks[t] -= int(cum[b - 1]) if b > 0 else 0
            prefixes[t] = (prefixes[t] << 16) | b
    bits_type, float_type = (np.uint64, np.float64) if compute64 else (np.uint32, np.float32)
    return [float(np.array(p, dtype=bits_type).view(float_type)) for p in prefixes]


def majority_sign(source: ItemSource, options: core.MergeOptions) -> int:
    vote: int = sum(core.ties_vote(batch, options) for batch in source())
    return (vote > 0) - (vote < 0)


def global_ties_options(
    source: ItemSource, tasks: int, total: int, density: float, options: core.MergeOptions
) -> core.MergeOptions:
    """A copy of the core options completed with the whole-model thresholds and majority
    sign."""
    completed = core.MergeOptions(options)
    completed.ties.thresholds = exact_thresholds(source, tasks, total, density, options)
    completed.ties.majority_sign = majority_sign(source, completed)
    return completed
