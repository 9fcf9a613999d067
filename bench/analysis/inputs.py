"""The quality benchmark's fine-tunes (bench/quality), as checkpoint folders isofast reads.

Fine-tunes with bench/quality's own code and default settings, so the checkpoint cache is
shared with `bench/quality/run.py` (a cached task is not retrained) and the models analysed
are the ones whose accuracy bench/quality/results reports. Writes the pre-trained backbone
and each task's fine-tuned backbone (the 101 tensors bench/quality merges) as one
safetensors file per folder, and an isofast config naming them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/analysis/inputs.py`
    sys.path.append(str(Path(__file__).resolve().parents[2]))

import torch
import yaml
from safetensors.torch import save_file

from bench.quality import data as qdata
from bench.quality import finetune as qft
from bench.quality.run import prepare_tasks


def write_inputs(work_dir: Path, cache_dir: Path | None = None, threads: int = 2) -> Path:
    """Fine-tune (or load from the cache) every bench/quality task, write base and fine-tunes
    under `work_dir`, and return the path of the config that names them."""
    torch.set_num_threads(threads)
    model, tokenizer = qft.load_backbone()
    base = qft.backbone_state(model)
    tasks = qdata.load_tasks(qdata.TASK_NAMES)
    cfg = qft.FinetuneConfig()  # bench/quality's defaults: same cache keys, same checkpoints
    prepared = prepare_tasks(
        model,
        tokenizer,
        base,
        tasks,
        cfg,
        cache_dir or qft.default_cache_dir(),
        2000,
        qdata.DATA_VERSION,
        qft.MODEL_PACKAGE,
    )
    _save(work_dir / "base", base)
    for p in prepared:
        _save(work_dir / p.task.name, p.state)
    config = {
        "base_model": "base",
        "models": [p.task.name for p in prepared],
        "method": "iso_c",
        "alpha": 1.0,
    }
    path = work_dir / "analysis.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _save(folder: Path, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


if __name__ == "__main__":
    start = time.perf_counter()
    out = write_inputs(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/isofast-analysis"))
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
