"""Refuse, before any data is read, a merge whose planned peak memory the machine lacks: a
merge that would be killed by the OOM killer an hour in is worse than one refused at once."""

from __future__ import annotations

import logging
import os

from isofast.errors import InsufficientMemory
from isofast.planner import MergePlan, mib

log = logging.getLogger(__name__)


def available_bytes() -> int | None:
    """Memory the kernel says can be had without swapping (MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(plan: MergePlan, into_memory: bool, force: bool = False) -> None:
    """Raise InsufficientMemory when the plan's peak (plus the merged tensors themselves when
    they are returned in memory) exceeds the available memory, unless `force`."""
    needed = plan.peak_bytes + (plan.output_bytes if into_memory else 0)
    available = available_bytes()
    if available is None or needed <= available:
        return
    message = (
        f"this merge needs about {mib(needed)} of memory (plan estimate) and "
        f"{mib(available)} is available. Ways out: fewer threads (--threads 1 / threads=1 "
        f"merges one matrix at a time), merging into a folder instead of into memory, "
        f"closing other programs, or --force (force=True) to try anyway"
    )
    if force:
        log.warning("%s; going ahead (forced)", message.split(". Ways out")[0])
        return
    raise InsufficientMemory(message)
