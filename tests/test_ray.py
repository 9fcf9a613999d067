"""`executor: ray` (isofast.ray_executor) on a local Ray instance with 2 worker processes: the
output is bitwise the local executor's for every kind of method, a killed worker is retried
without changing it, a killed driver publishes nothing and its shards resume with either
executor, and the driver holds no tensor data."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import isofast
from isofast import cli
from isofast.errors import MergeInputError
from isofast.io import CheckpointWriter
from isofast.io.shards import PlannedShardWriter
from isofast.ray_executor import KILL_ONCE_ENV, split_by_bytes

from conftest import fresh_seed

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'isofast[ray]')")

TASKS = 3
# Small enough for several output shards, so tasks run side by side and finish in any order.
SHARD_BYTES = 4000


def shapes(layers: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """A small Llama layout (mlp 2.5x wider than hidden)."""
    mlp = 5 * hidden // 2
    found: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (3 * hidden, hidden)}
    for i in range(layers):
        layer = f"model.layers.{i}"
        found |= {
            f"{layer}.self_attn.q_proj.weight": (hidden, hidden),
            f"{layer}.self_attn.o_proj.weight": (hidden, hidden),
            f"{layer}.mlp.up_proj.weight": (mlp, hidden),
            f"{layer}.mlp.down_proj.weight": (hidden, mlp),
            f"{layer}.input_layernorm.weight": (hidden,),
        }
    return found | {"model.norm.weight": (hidden,)}


def write_models(root: Path, layers: int = 4, hidden: int = 16) -> Path:
    """A bf16 base (sharded, with a config.json) and TASKS fine-tunes, from a fresh seed."""
    rng = np.random.default_rng(fresh_seed())
    layout = shapes(layers, hidden)
    base = {n: (0.3 * rng.standard_normal(s)).astype(np.float32) for n, s in layout.items()}

    def save(state: dict[str, np.ndarray], folder: Path, shard_bytes: int) -> None:
        with CheckpointWriter(folder, shard_bytes) as w:
            for name, x in state.items():
                w.add(name, _bf16_bits(x), "BF16")
            w.add("model.rotary.inv_freq_ids", np.arange(8, dtype=np.int64))

    save(base, root / "base", 4000)
    (root / "base" / "config.json").write_text(f'{{"num_hidden_layers": {layers}}}\n')
    for t in range(TASKS):
        tuned = {
            n: x + 0.02 * rng.standard_normal(x.shape).astype(np.float32) for n, x in base.items()
        }
        save(tuned, root / f"ft{t}", 2**30)
        (root / f"ft{t}" / "config.json").write_text(f'{{"num_hidden_layers": {layers}}}\n')
    return root


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local Ray instance with 2 CPUs (so 2 worker processes), and the marker file of the
    kill-once hook (present: no task dies; a test removes it to kill one worker)."""
    marker = tmp_path_factory.mktemp("ray") / "killed-once"
    marker.touch()
    os.environ[KILL_ONCE_ENV] = str(marker)  # the workers inherit it
    # Ray puts the driver's working folder first on its workers' sys.path: from the repository
    # root they would import the source tree (no compiled core) instead of the installed
    # package. Drivers here run from a scratch folder.
    cwd = os.getcwd()
    os.chdir(marker.parent)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield marker
    finally:
        ray.shutdown()
        os.chdir(cwd)
        os.environ.pop(KILL_ONCE_ENV, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("models"))


def merge(root: Path, out: Path, method: str, executor: str, **kw: Any) -> Path:
    return isofast.merge(
        root / "base",
        [root / f"ft{t}" for t in range(TASKS)],
        method,
        out=out,
        executor=executor,
        max_shard_bytes=SHARD_BYTES,
        **kw,
    )


# Every method with its defaults, and the variants that take other paths: the whole-model
# TIES trim (thresholds from the workers' counts), random masks (counter-based: the same
# anywhere), per-tensor parameters (a gradient over the layers).
METHODS: list[tuple[str, dict[str, Any]]] = [
    *((name, {}) for name in isofast.methods()),
    ("ties", {"density": 0.3, "trim": "tensor"}),
    ("dare_ties", {"density": 0.5}),
    ("gta", {"sparsify": "della_magprune", "density": 0.5, "elect": "sum"}),
    ("slerp", {"t": [0.2, 0.8]}),
]
# Methods of one fine-tune (or two) besides the base.
MODELS = {"slerp": 1, "nuslerp": 2}


@pytest.mark.parametrize(("method", "params"), METHODS, ids=[f"{m}-{p}" for m, p in METHODS])
def test_ray_output_is_bitwise_the_local_output(
    ray_instance: Path, models: Path, tmp_path: Path, method: str, params: dict[str, Any]
) -> None:
    tuned = [models / f"ft{t}" for t in range(MODELS.get(method, TASKS))]

    def merge_one(out: Path, executor: str) -> Path:
        return isofast.merge(
            models / "base", tuned, method, out=out, executor=executor,
            max_shard_bytes=SHARD_BYTES, **params,
        )  # fmt: skip

    want = merge_one(tmp_path / "local", "local")
    got = merge_one(tmp_path / "ray", "ray")
    assert len(list(want.glob("*.safetensors"))) > 2
    assert folder_bytes(got) == folder_bytes(want)


def test_a_passthrough_slice_config_gives_the_local_bytes(
    ray_instance: Path, models: Path, tmp_path: Path
) -> None:
    """A mergekit frankenmerge (layer slices stacked, config.json rewritten)."""
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(models / "ft0"), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(models / "ft1"), "layer_range": [1, 4]}]},
        ],
        "out_shard_size": SHARD_BYTES,
    }
    path = tmp_path / "slices.yml"
    path.write_text(yaml.safe_dump(config))
    outs = {}
    for executor in ("local", "ray"):
        outs[executor] = tmp_path / executor
        argv = ["merge", str(path), str(outs[executor]), "-q", "--executor", executor]
        assert cli.main(argv) == 0
    assert folder_bytes(outs["ray"]) == folder_bytes(outs["local"])
    assert '"num_hidden_layers": 6' in (outs["ray"] / "config.json").read_text()


def test_gpu_tasks_give_the_local_gpu_bytes(
    ray_instance: Path, models: Path, tmp_path: Path
) -> None:
    """`device: cuda`: each task asks Ray for a GPU and merges its matrices there."""
    try:
        from isofast import _cuda
    except ImportError as exc:
        pytest.skip(f"isofast._cuda is not built ({exc})")
    if not _cuda.available() or ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("no usable CUDA GPU in this Ray instance")
    want = merge(models, tmp_path / "local", "iso_cts", "local", device="cuda")
    got = merge(models, tmp_path / "ray", "iso_cts", "ray", device="cuda")
    assert folder_bytes(got) == folder_bytes(want)


def test_a_killed_worker_is_retried_and_the_output_is_unchanged(
    ray_instance: Path, models: Path, tmp_path: Path
) -> None:
    want = merge(models, tmp_path / "local", "iso_cts", "local")
    ray_instance.unlink()  # arm the hook: the first task to write a tensor kills its worker
    got = merge(models, tmp_path / "ray", "iso_cts", "ray")
    assert ray_instance.exists(), "no worker was killed"
    assert folder_bytes(got) == folder_bytes(want)


_DRIVER = """
import sys, isofast
root, out, executor, shard_bytes = sys.argv[1:5]
isofast.merge(f"{root}/base", [f"{root}/ft{t}" for t in range(3)], "iso_cts", out=out,
              executor=executor, max_shard_bytes=int(shard_bytes), threads=1)
"""


def test_a_killed_driver_publishes_nothing_and_either_executor_resumes(
    ray_instance: Path, models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="isofast")
    want = merge(models, tmp_path / "want", "iso_cts", "local", threads=1)
    for first, then in (("ray", "local"), ("local", "ray")):
        out = tmp_path / f"{first}-then-{then}"
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        argv = [sys.executable, "-c", _DRIVER, str(models), str(out), first, str(SHARD_BYTES)]
        driver = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL, cwd=tmp_path)
        _kill_after_first_shard(driver, out)
        assert not out.exists()
        caplog.clear()
        got = merge(models, out, "iso_cts", then, threads=1, resume=True)
        assert folder_bytes(got) == folder_bytes(want), (first, then)
        reused = [r.getMessage() for r in caplog.records if "already written" in r.getMessage()]
        assert reused and " 0 shards" not in reused[0], (first, then, reused)


def _kill_after_first_shard(driver: subprocess.Popen[bytes], out: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        journals = list(out.parent.glob(f".{out.name}.isofast-tmp-*/isofast-journal.jsonl"))
        if journals and len(journals[0].read_text().splitlines()) >= 2:  # a shard is recorded
            break
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()


def test_the_driver_holds_no_tensor_data(ray_instance: Path, tmp_path: Path) -> None:
    """The driver's peak RSS does not grow with the model: a model 12x larger (its tasks
    read 170 MB more and write 42 MB more) adds next to nothing to the driver. (The peak is
    the kernel's VmHWM: getrusage's would count the test process it was forked from.)"""
    peaks, sizes = [], []
    for layers in (4, 48):
        root = write_models(tmp_path / f"m{layers}", layers=layers, hidden=256)
        code = (
            "import sys, isofast; r = sys.argv[1]; "
            "isofast.merge(f'{r}/base', [f'{r}/ft{t}' for t in range(3)], 'task_arithmetic', "
            "out=f'{r}/out', executor='ray', max_shard_bytes=4_000_000); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
        )
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        done = subprocess.run(
            [sys.executable, "-c", code, str(root)],
            env=env,
            capture_output=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        peaks.append(int(done.stdout.split()[-1]) * 1024)
        sizes.append(sum(p.stat().st_size for p in (root / "out").glob("*.safetensors")))
    assert peaks[1] - peaks[0] < (sizes[1] - sizes[0]) / 4, (peaks, sizes)


def test_the_cli_joins_a_cluster_and_writes_the_local_bytes(
    ray_instance: Path, models: Path, tmp_path: Path
) -> None:
    want = merge(models, tmp_path / "local", "ties", "local", density=0.4)
    argv = [sys.executable, "-m", "isofast.cli", "merge", str(tmp_path / "ray")]
    argv += ["--base", str(models / "base"), "--method", "ties", "--param", "density=0.4"]
    argv += [x for t in range(TASKS) for x in ("--model", str(models / f"ft{t}"))]
    argv += ["--out-shard-size", str(SHARD_BYTES), "--quiet"]
    argv += ["--executor", "ray", "--ray-address", ray.get_runtime_context().gcs_address]
    done = subprocess.run(argv, capture_output=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert folder_bytes(tmp_path / "ray") == folder_bytes(want)


def test_ray_refuses_models_in_memory_and_results_in_memory(models: Path) -> None:
    base = {"w": np.ones((4, 4), np.float32)}
    with pytest.raises(MergeInputError, match="checkpoints on disk"):
        isofast.merge(base, [base], "task_arithmetic", executor="ray", out="never")
    with pytest.raises(MergeInputError, match="into a folder"):
        isofast.merge(models / "base", [models / "ft0"], "task_arithmetic", executor="ray")
    with pytest.raises(MergeInputError, match="executor must be one of"):
        isofast.merge(models / "base", [models / "ft0"], executor="dask", out="never")
    with pytest.raises(MergeInputError, match="ray_address is for executor: ray"):
        isofast.merge(models / "base", [models / "ft0"], ray_address="auto", out="never")


def test_planned_shards_are_the_bytes_the_writer_writes(tmp_path: Path) -> None:
    """Shards laid out ahead and written by PlannedShardWriter (in any order) give the files
    CheckpointWriter writes one tensor at a time, also when a header outgrows its area."""
    rng = np.random.default_rng(fresh_seed())
    tensors = {
        f"t.{i}.{'x' * int(rng.integers(0, 200))}": rng.standard_normal(
            tuple(int(d) for d in rng.integers(1, 40, size=int(rng.integers(1, 3))))
        ).astype(np.float32)
        for i in range(60)
    }

    class TinyReserve(CheckpointWriter):
        initial_header_reserve = 56

    for writer_class in (CheckpointWriter, TinyReserve):
        with writer_class(tmp_path / f"want-{writer_class.__name__}", 3000) as w:
            for name, x in tensors.items():
                w.add(name, x)
        with writer_class(tmp_path / f"got-{writer_class.__name__}", 3000) as w:
            planned = w.plan_shards((n, "F32", x.shape) for n, x in tensors.items())
            for shard in reversed(planned):
                part = PlannedShardWriter(w.tmp_dir, shard)
                for name in shard.names:
                    part.add(name, tensors[name], "F32")
                w.add_shard(part.close())
        assert len(planned) > 3
        assert folder_bytes(w.out_dir) == folder_bytes(tmp_path / f"want-{writer_class.__name__}")


def test_split_by_bytes_keeps_order_and_balances() -> None:
    from isofast.planner import TensorPlan

    sizes = [5, 1, 1, 1, 8, 2, 2, 3]
    tensors = [
        TensorPlan(f"t{i}", (s,), "F32", "elementwise", "F32", s, s) for i, s in enumerate(sizes)
    ]
    runs = split_by_bytes(tensors, 3)
    assert [t for r in runs for t in r] == tensors
    assert 1 < len(runs) <= 3
