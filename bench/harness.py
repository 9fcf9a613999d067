"""The measuring harness shared by the benchmark scripts and the pytest-benchmark suite.

- `run_child`: one command in a child process: wall and CPU seconds and, if asked, its peak
  RSS from GNU time (`/usr/bin/time -v`) and the peaks of its RssAnon / RssFile from /proc
  samples.
- `alternate`: N rounds that run every side once, in order, so that the drift of a shared
  machine hits every side alike.
- `Spread`, `ratio_of_medians`: median, min and max of repeated runs.
- `markdown_table`, `command_line`, `machine_summary`: reports that say which command, on
  which machine, produced them.
- `PeakMemory`: peak RSS of the current process over a stretch of code (VmHWM after a reset).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

HERE = Path(__file__).resolve().parent
MiB = 2**20
GNU_TIME = "/usr/bin/time"
# A child that fails this fast was most likely broken by something outside it (the package
# being rebuilt under it); `run_child` retries those after a pause.
QUICK_FAILURE_S = 30.0
RETRY_PAUSE_S = 60.0

R = TypeVar("R")


# ----------------------------------------------------------------------------- commands


def isofast_merge_command(
    out: Path, base: Path, models: Sequence[Path], method: str, threads: int | None
) -> list[str]:
    """`isofast merge` as a child process runs it (the CLI module of the running interpreter)."""
    cmd = [sys.executable, "-m", "isofast.cli", "merge", str(out), "--base", str(base)]
    for model in models:
        cmd += ["--model", str(model)]
    cmd += ["--method", method, "--quiet", "--overwrite"]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


# ----------------------------------------------------------------------------- child processes


@dataclass
class ChildRun:
    seconds: float  # wall
    cpu_seconds: float  # user + system of the child and of everything it waited for
    stdout: str = ""  # when captured
    max_rss: int | None = None  # bytes, GNU time's "Maximum resident set size"
    rss_anon: int = 0  # peak of the /proc samples, bytes: memory the child allocated
    rss_file: int = 0  # peak of the /proc samples, bytes: pages of mapped files
    samples: int = 0


class ChildFailed(RuntimeError):
    pass


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _proc_children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _proc_status_bytes(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class RssSampler:
    """Peaks of RssAnon / RssFile of a child, sampled every 20 ms from /proc on a thread.

    With `wrapped`, the process to sample is the first child of `pid` (the command that
    /usr/bin/time runs), not `pid` itself."""

    def __init__(self, pid: int, wrapped: bool) -> None:
        self.rss_anon = self.rss_file = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pid, wrapped), daemon=True)
        self._thread.start()

    def _run(self, pid: int, wrapped: bool) -> None:
        target = None if wrapped else pid
        while not self._stop.is_set():
            if target is None:
                kids = _proc_children(pid)
                target = kids[0] if kids else None
            status = _proc_status_bytes(target) if target is not None else {}
            if status:
                self.rss_anon = max(self.rss_anon, status.get("RssAnon", 0))
                self.rss_file = max(self.rss_file, status.get("RssFile", 0))
                self.samples += 1
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _gnu_time_max_rss(log: str) -> int:
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    if not found:
        raise ChildFailed(f"no maximum RSS in the output of {GNU_TIME} -v:\n{log}")
    return int(found.group(1)) * 1024


def run_child(
    cmd: Sequence[str],
    *,
    gnu_time: bool = False,
    sample_rss: bool = False,
    stdout: Literal["inherit", "capture", "discard"] = "inherit",
    env: Mapping[str, str] | None = None,
    attempts: int = 1,
) -> ChildRun:
    """Run `cmd` to the end and measure it; raise `ChildFailed` if it exits non-zero.

    `gnu_time` runs it under `/usr/bin/time -v` for its peak RSS; `sample_rss` samples /proc
    while it runs. A run that fails within QUICK_FAILURE_S is retried after RETRY_PAUSE_S,
    up to `attempts` runs in all."""
    pipe = {"inherit": None, "capture": subprocess.PIPE, "discard": subprocess.DEVNULL}[stdout]
    for attempt in range(attempts):
        with tempfile.NamedTemporaryFile("r", prefix="isofast-bench-", suffix=".time") as log:
            full = [GNU_TIME, "-v", "-o", log.name, *cmd] if gnu_time else list(cmd)
            cpu0, t0 = _children_cpu(), time.perf_counter()
            proc = subprocess.Popen(full, stdout=pipe, env=None if env is None else dict(env))
            sampler = RssSampler(proc.pid, wrapped=gnu_time) if sample_rss else None
            out, _ = proc.communicate()
            seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
            if sampler is not None:
                sampler.stop()
            time_log = log.read() if gnu_time else ""
        text = out.decode(errors="replace") if out else ""
        if proc.returncode == 0:
            run = ChildRun(seconds, cpu, stdout=text)
            if gnu_time:
                run.max_rss = _gnu_time_max_rss(time_log)
            if sampler is not None:
                run.rss_anon, run.rss_file = sampler.rss_anon, sampler.rss_file
                run.samples = sampler.samples
            return run
        if seconds > QUICK_FAILURE_S or attempt + 1 == attempts:
            raise ChildFailed(
                f"exit {proc.returncode} after {seconds:.1f} s: {shlex.join(cmd)}\n"
                f"{text[-4000:]}{time_log}"
            )
        print(
            f"  child failed after {seconds:.1f} s (exit {proc.returncode}); "
            f"retrying in {RETRY_PAUSE_S:.0f} s",
            file=sys.stderr,
        )
        time.sleep(RETRY_PAUSE_S)
    raise AssertionError("unreachable")


def alternate(
    rounds: int,
    sides: Mapping[str, Callable[[int], R]],
    after_round: Callable[[int, dict[str, R]], None] | None = None,
) -> dict[str, list[R]]:
    """Run every side once per round, in the order given: {side: [result of each round]}.

    Each side gets the round index (0-based); `after_round` sees each round's results."""
    results: dict[str, list[R]] = {name: [] for name in sides}
    for index in range(rounds):
        this_round = {name: run(index) for name, run in sides.items()}
        for name, result in this_round.items():
            results[name].append(result)
        if after_round is not None:
            after_round(index, this_round)
    return results


# ----------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        data = list(values)
        return cls(statistics.median(data), min(data), max(data))

    @property
    def spread(self) -> float:
        return self.high - self.low


def ratio_of_medians(numerator: Iterable[float], denominator: Iterable[float]) -> float:
    return Spread.of(numerator).median / Spread.of(denominator).median


# ----------------------------------------------------------------------------- reports


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()
) -> str:
    """A markdown table; the columns whose index is in `right` are right-aligned."""
    aligned = set(right)
    rule = ["---:" if i in aligned else "---" for i in range(len(header))]
    lines = [header, rule, *([str(cell) for cell in row] for row in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The running command as typed from the repository root, e.g. `python bench/x.py --y`."""
    args = list(sys.argv if argv is None else argv)
    script = Path(args[0]).resolve()
    shown = f"bench/{script.name}" if script.parent == HERE else args[0]
    return shlex.join(["python", shown, *args[1:]])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_summary(load_before: Sequence[float], load_after: Sequence[float]) -> str:
    return (
        f"{cpu_name()}, {len(os.sched_getaffinity(0))} CPUs visible, load average "
        f"{load_before[0]:.1f} at start, {load_after[0]:.1f} at end"
    )


# ----------------------------------------------------------------------------- in process


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def release_free_memory() -> None:
    """Hand memory that glibc keeps after `free` back to the system (malloc_trim), so that
    the next measured stretch starts from what is really in use."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak RSS of this process from now on: VmHWM after a reset, or a sampling thread.

    It sees every allocation (Python, torch, C++ and BLAS alike), but not memory that an
    allocator reuses without returning it to the system in between."""

    def __init__(self) -> None:
        self.base_kib = _status_kib("VmRSS")
        self.method = "VmHWM after clear_refs"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "VmRSS sampled every 2 ms"
        self._peak = self.base_kib
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.method.startswith("VmRSS"):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _status_kib("VmRSS"))

    def peak_delta_mib(self) -> float:
        """Peak RSS since the start minus RSS at the start, MiB (ends the sampling)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = self._peak
        else:
            peak = _status_kib("VmHWM")
        return (peak - self.base_kib) / 1024.0
