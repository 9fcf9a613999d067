"""Work items: same-shape matrices are merged side by side (one thread each) when that fits the
memory budget; everything else goes one tensor at a time with all threads inside it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from isofast.merge_plan import TensorPlan

# Compute-dtype copies one matrix item holds in the core: base, T task vectors, the merged
# update, and about four more for sums, factors and concatenations.
EXTRA_COPIES = 6


def item_bytes(numel: int, tasks: int, compute_bytes: int) -> int:
    return (tasks + EXTRA_COPIES) * numel * compute_bytes


def side_by_side(numel: int, tasks: int, compute_bytes: int, threads: int, budget: int) -> int:
    """How many items of this size may run at once within `budget` bytes (at least 1)."""
    return max(1, min(threads, budget // max(1, item_bytes(numel, tasks, compute_bytes))))


def make_batches(
    plans: Sequence[TensorPlan],
    shapes: Mapping[str, Sequence[int]],
    tasks: int,
    compute_bytes: int,
    threads: int,
    budget: int,
) -> list[tuple[list[TensorPlan], int]]:
    """(plans, item_threads) per batch, in first-appearance order of each shape."""
    groups: dict[tuple[object, ...], list[TensorPlan]] = {}
    batches: list[tuple[list[TensorPlan], int]] = []
    for plan in plans:
        if not plan.matrix:
            batches.append(([plan], 1))
            continue
        groups.setdefault((tuple(shapes[plan.name]), plan.out_dtype), []).append(plan)
    for (shape, _), members in groups.items():
        numel = 1
        for s in shape:  # type: ignore[attr-defined]
            numel *= int(s)
        width = side_by_side(numel, tasks, compute_bytes, threads, budget)
        for i in range(0, len(members), width):
            batches.append((members[i : i + width], width))
    return batches
