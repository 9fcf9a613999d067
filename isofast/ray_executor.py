"""`executor: ray`: the same merge, its output shards written by Ray tasks across a cluster.

The driver (this process) opens headers only: it plans the merge, lays the output shards out
ahead (`CheckpointWriter.plan_shards`: where every tensor lands follows from the plan alone),
and starts one task per shard. A task opens the inputs itself (shared storage), makes the same
plan, merges its shard's tensors with the same core and streaming code as the local executor
(`pipeline._stream`), and writes the shard file into the output's temporary folder. The driver
collects each shard's journal line, then writes the index, side files, model card and config
and publishes the folder, as the local executor does: the output is the same bytes.

Whole-model statistics (global TIES) are integer sums: tasks count over parts of the model and
the driver adds them up (isofast.ties_global), so the thresholds are those of a local run, bit
for bit.

A task whose worker dies is retried by Ray (it rewrites its shard from the start); a driver
that dies publishes nothing, and its finished shards stay for `resume` (either executor).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from isofast.errors import IsofastError, MergeInputError
from isofast.io.journal import ShardRecord
from isofast.io.shards import PlannedShard
from isofast.models import ModelSet
from isofast.pipeline import (
    Progress,
    core_options,
    log_routes,
    output_writer,
    plain_options,
    write_shards,
)
from isofast.planner import MergePlan, TensorPlan, make_plan
from isofast.request import MergeRequest
from isofast.ties_global import (
    ItemSource,
    TiesTotals,
    summed_histogram,
    summed_vote,
    whole_model_ties,
)

log = logging.getLogger(__name__)

# A worker killed mid-task (its process lost) is retried this many times.
TASK_RETRIES = 3
# Fault-injection tests: a path here that does not exist makes the first shard task to see it
# create it and kill its own worker process after its first tensor (then Ray retries it).
KILL_ONCE_ENV = "ISOFAST_RAY_TEST_KILL_ONCE"


def merge_on_ray(
    plan: MergePlan,
    models: ModelSet,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool | Progress = False,
    resume: bool = False,
) -> Path:
    """Run `plan` on Ray into `out_dir` (see the module's docstring)."""
    with (
        ray_session(plan.request.ray_address) as ray,
        output_writer(plan, models, out_dir, overwrite, progress, resume) as output,
    ):
        shards = output.shards
        log.info("ray: %d output shards to write, %d CPUs", len(shards), _cluster_cpus(ray))
        ties = _global_ties(ray, plan, models) if plan.uses_global_ties else None
        resources = _task_resources(ray, plan.request, len(shards))
        task = ray.remote(write_shard).options(max_retries=TASK_RETRIES, **resources)
        gpu = "num_gpus" in resources
        request = _task_request(plan.request, int(resources["num_cpus"]), "cuda:0" if gpu else None)
        refs = [task.remote(request, s, str(output.folder), ties) for s in shards]
        for record in _results(ray, refs):
            output.collect(record)
    return Path(os.path.abspath(out_dir))


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """The `ray` module, connected: to the session this process already has, to the cluster
    at `address`, or to a local instance started here (and stopped after)."""
    try:
        import ray
    except ImportError:
        raise MergeInputError(
            "executor: ray needs Ray, which is not installed: pip install 'isofast[ray]'"
        ) from None
    if ray.is_initialized():
        yield ray
        return
    if address in (None, "local"):
        log.info(
            "ray: joining or starting a Ray instance on this machine (seconds); on one machine "
            "the local executor gives the same output without it"
        )
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise MergeInputError(f"cannot reach a Ray cluster at {address!r}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _results(ray: Any, refs: list[Any]) -> Iterator[Any]:
    """The tasks' results as they finish; a task's own error is raised as itself (a clear
    isofast error, not Ray's wrapper), and every other task is cancelled."""
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield _get(ray, ready[0])
    finally:
        for ref in pending:  # interrupted or failed: stop writing into the temporary folder
            ray.cancel(ref, force=True)


def _get(ray: Any, ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, (IsofastError, OSError)):
            raise cause from None
        raise


def _cluster_cpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def _task_resources(ray: Any, request: MergeRequest, shards: int) -> dict[str, float]:
    """CPUs (and a GPU for `device: cuda`) per task: `threads` when given, else the cluster's
    CPUs shared among the shards, at most one node's worth (a larger task never runs)."""
    node_cpus = max(
        (n["Resources"].get("CPU", 1) for n in ray.nodes() if n.get("Alive")), default=1
    )
    cpus = request.threads or max(1, _cluster_cpus(ray) // max(1, shards))
    resources: dict[str, float] = {"num_cpus": float(min(cpus, node_cpus))}
    if request.device.startswith("cuda"):
        resources["num_gpus"] = 1.0
    return resources


def _task_request(request: MergeRequest, threads: int, device: str | None) -> MergeRequest:
    """The request a task runs in its worker, locally, on its own share of threads and on
    `device` (a GPU task's is the one Ray gave it, visible to it as device 0)."""
    changes = {"threads": threads, "executor": "local", "ray_address": None}
    return request.replace(**changes, **({"device": device} if device else {}))


def write_shard(
    request: MergeRequest, shard: PlannedShard, folder: str, ties: TiesTotals | None
) -> ShardRecord:
    """A Ray task: merge the tensors of `shard` and write its file into `folder`."""
    with ModelSet(request) as models:
        plan = make_plan(request, models)
        options = core_options(plan, models, ties)
        records = write_shards(plan, models, options, [shard], folder, _maybe_die_for_a_test)
        (record,) = records
        log_routes()
        return record


def _maybe_die_for_a_test(name: str) -> None:
    marker = os.environ.get(KILL_ONCE_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


# -- global TIES --------------------------------------------------------------------------


def _global_ties(ray: Any, plan: MergePlan, models: ModelSet) -> TiesTotals:
    """The whole-model thresholds and sign, from counts the tasks take over parts of the
    model, summed here."""
    floats = [t for t in plan.tensors if not t.copy]
    parts = [[t.name for t in part] for part in split_by_bytes(floats, 2 * _cluster_cpus(ray))]
    request = _task_request(plan.request, 1, "cpu")  # counting runs on the CPU
    histogram_task = ray.remote(part_histogram).options(max_retries=TASK_RETRIES, num_cpus=1)
    vote_task = ray.remote(part_vote).options(max_retries=TASK_RETRIES, num_cpus=1)

    def histogram(digit: int, prefixes: list[int]) -> npt.NDArray[np.int64]:
        refs = [histogram_task.remote(request, names, digit, prefixes) for names in parts]
        return sum((_get(ray, r) for r in refs), np.zeros((plan.tasks, 65536), np.int64))

    def vote(options: Any) -> int:
        thresholds = TiesTotals(tuple(options.ties.thresholds), 0)
        refs = [vote_task.remote(request, names, thresholds) for names in parts]  # side by side
        return sum(_get(ray, r) for r in refs)

    return whole_model_ties(
        histogram,
        vote,
        plan.tasks,
        sum(math.prod(t.shape) for t in floats),
        getattr(plan.params, "density", 1.0),
        plain_options(plan, models),
    )


def split_by_bytes(tensors: Sequence[TensorPlan], parts: int) -> list[list[TensorPlan]]:
    """`tensors` in order, cut into at most `parts` runs of about equal work."""
    total = sum(t.work_bytes for t in tensors) or 1
    runs: list[list[TensorPlan]] = [[]]
    done = 0
    for t in tensors:
        if runs[-1] and done >= total * len(runs) / parts:
            runs.append([])
        runs[-1].append(t)
        done += t.work_bytes
    return [r for r in runs if r]


@contextlib.contextmanager
def _part(request: MergeRequest, names: Sequence[str]) -> Iterator[tuple[ItemSource, Any]]:
    """The core items of the tensors `names` (read afresh on each call) and the options."""
    with ModelSet(request) as models, models.naming_files():
        options = plain_options(make_plan(request, models), models)
        yield lambda: ([models.core_item(n, False, None)] for n in names), options


def part_histogram(
    request: MergeRequest, names: Sequence[str], digit: int, prefixes: list[int]
) -> npt.NDArray[np.int64]:
    """A Ray task: the histogram pass over the tensors `names`."""
    with _part(request, names) as (source, options):
        return summed_histogram(source, len(request.models), options)(digit, prefixes)


def part_vote(request: MergeRequest, names: Sequence[str], thresholds: TiesTotals) -> int:
    """A Ray task: the sign vote over the tensors `names`, trimmed at `thresholds`."""
    with _part(request, names) as (source, options):
        return summed_vote(source)(thresholds.apply(options))
