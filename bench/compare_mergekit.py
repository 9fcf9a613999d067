"""mergekit 0.1.5 against `isofast merge` on the same mergekit YAML configs (mergekit parity,
acceptance item 2).

Setup (once; mergekit lives in its own virtual environment, outside the repository, and reuses
the torch already installed):

    python -m venv --system-site-packages /work/venvs/mergekit
    /work/venvs/mergekit/bin/pip install mergekit==0.1.5
    # if pip wants to replace torch, install torch's CPU wheel into the venv first:
    #   /work/venvs/mergekit/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu

Then, from the repository root (isofast installed in the running interpreter):

    python bench/compare_mergekit.py                            # hidden 1024, 8 layers, base + 3
    python bench/compare_mergekit.py --quick --methods ties,slerp   # tiny set, two methods
    python bench/compare_mergekit.py --mergekit /other/venv/bin/mergekit-yaml --rounds 3

What it does:

1. Two checkpoint sets of a Llama layout (`bench_memory.llama_shapes`: q/k/v/o hidden x hidden,
   gate/up/down with intermediate = 2.75 hidden, RMS norms, embed_tokens and lm_head
   vocab x hidden), a base model and 3 fine-tunes (`bench_memory.ensure_set`: base
   N(0, 0.02^2), each fine-tune adds its own N(0, 0.001^2)), cached under `--dir` and reused:
   a bf16 set (the timed one) and an fp32 set drawn from the same seeds (not rounded to bf16,
   so task vectors have no ties in magnitude: the accuracy rows). A Llama `config.json` is
   written beside each model's weights: mergekit reads the architecture and layer count there.
2. One mergekit YAML per method (absolute paths; mergekit resolves relative ones against the
   working directory, isofast against the config's folder), written under `--dir`/configs and
   given as they are to both tools: linear, task_arithmetic (a weight gradient), ties
   (per-model weights and densities, one density filtered), dare_ties, dare_linear,
   breadcrumbs, breadcrumbs_ties, della, della_linear, sce, model_stock, multislerp, karcher,
   nuslerp, slerp (a t gradient per `self_attn` / `mlp` filter and a default), passthrough
   (layer ranges of three models stacked), and `slerp_slices`, the usual form of a slerp
   config in mergekit's README (one slice with both models' full layer range).
   Timed set: `dtype: float32`, `out_dtype: bfloat16`: both tools compute in float32 and write
   bf16 (with `dtype: bfloat16` mergekit would round every step to bf16, isofast would not).
   Accuracy set: `dtype: float32`, `out_dtype: float32`. Passthrough keeps the inputs' dtype
   (`dtype: bfloat16` on the bf16 set), as isofast copies tensors bit for bit.
3. Per method, on the bf16 set, `--rounds` rounds (default 2) alternating `isofast merge CONFIG
   OUT --quiet --overwrite` and `mergekit-yaml CONFIG OUT --no-cuda --no-copy-tokenizer
   --no-write-model-card --quiet --out-shard-size 5B`, each a child process under
   `/usr/bin/time -v` (bench/harness.py: wall seconds, peak RSS). `--threads N` passes
   `--threads N` to isofast and `-j N` to mergekit; by default both use every core (torch's
   default). Not used: `--lazy-unpickle` (it only changes how pickled .bin files are read;
   these are safetensors), `--async-write` (more memory), `--cuda`. Both write one shard.
   Then each tool runs once on the fp32 set (mergekit twice for the random methods, with
   `--random-seed 1` and `2`).
4. Compares the outputs tensor by tensor (safetensors, in float64), with U = output - the
   set's base model (the merged update):
   * deterministic methods: per tensor ||U_isofast - U_mergekit|| / ||U_mergekit||, max and
     median over the tensors, and the share of entries that are not bitwise equal; target
     <= 1e-3 on the fp32 set, after allowing eps ||theta_base|| (eps of the output dtype) for
     the rounding of each written weight: an update far below the weights' ULP (model_stock
     with t near 0 on these uncorrelated fine-tunes) has no relative accuracy left in any
     output. A row beyond that is explained where it can be: for magnitude trims (ties,
     breadcrumbs*), whether every differing entry has a magnitude |D_t| that another entry of
     the same task vector shares (mergekit orders ties by torch's unstable sort, isofast by
     index); otherwise mergekit runs once more computing in float64 (`dtype: float64`) and
     both sides' distance to that is shown;
   * random methods (dare_*, della*): the kept fraction, the share of all entries (every
     tensor together) where U != 0, of each tool, and the Pearson correlation of U_isofast
     and U_mergekit over all entries, beside that of two mergekit runs with different seeds
     (what two independent draws of the masks give);
   * passthrough: the same tensor names, every tensor bitwise equal (dtype included), and
     num_hidden_layers of both config.json.
   On the bf16 set the same numbers are shown, but bf16 output rounding (one ULP of a weight
   near 0.02 is about 10 % of an update entry near 1e-3) dominates them.

Prints one markdown table with the command that produced it, the machine summary and a
check per row: rel. diff <= 1e-3 (deterministic methods; "ok (diff explained)" when the
difference is ties in magnitude, or mergekit's own float32 error while isofast is within
1e-3 of float64), time ratio (mergekit / isofast, medians) >= 2, and peak RSS ratio
(mergekit / isofast, medians; GNU time's maximum resident set size, which counts the pages of
memory-mapped inputs too) > 1. A tool that refuses a config gets its message in the row.
Then the times of the fp32 runs, for scale. Exit status 3 if any check fails.
`--keep-outputs` keeps the last outputs under `--dir`/out. Needs /usr/bin/time
(apt-get install time), torch, safetensors and PyYAML.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from bench_memory import CheckpointSet, ensure_set, llama_shapes
from harness import (
    GNU_TIME,
    ChildFailed,
    ChildRun,
    MiB,
    Spread,
    alternate,
    command_line,
    machine_summary,
    markdown_table,
    run_child,
)
from safetensors import safe_open

DEFAULT_MERGEKIT = "/work/venvs/mergekit/bin/mergekit-yaml"
DEFAULT_DIR = "/work/bench_cache/mergekit-compare"
TASKS = 3
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
PASSTHROUGH = ("passthrough",)
MAX_REL_DIFF = 1e-3
MIN_SPEEDUP = 2.0
SIDES = ("isofast", "mergekit")
MERGEKIT_FLAGS = (
    "--no-cuda",
    "--no-copy-tokenizer",
    "--no-write-model-card",
    "--quiet",
    "--out-shard-size",
    "5B",
)

Config = dict[str, Any]


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    vocab: int

    @property
    def inter(self) -> int:
        return self.hidden * 11 // 4  # Llama's 2.75 ratio (TinyLlama: 5632 / 2048)

    def checkpoint_set(self, dtype: str) -> CheckpointSet:
        short = "bf16" if dtype == "bfloat16" else "fp32"
        key = f"llama-h{self.hidden}-l{self.layers}-v{self.vocab}-{short}"
        shapes = llama_shapes(self.layers, self.hidden, self.inter, self.vocab)
        return CheckpointSet(key, f"Llama {short}", shapes, dtype, TASKS, self.layers, 512 * MiB)

    def hf_config(self, dtype: str) -> dict[str, Any]:
        """The Llama config.json mergekit needs (architecture, layer count); no grouped-query
        attention, untied embeddings, as llama_shapes lays the weights out."""
        heads = max(1, self.hidden // 64)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "dtype": dtype,
        }


@dataclass(frozen=True)
class ModelSet:
    dtype: str
    base: Path
    fts: tuple[Path, ...]


def prepare_set(root: Path, shape: Shape, dtype: str) -> ModelSet:
    """The cached base + 3 fine-tunes (generated when missing) with a config.json each."""
    cs = shape.checkpoint_set(dtype)
    base, fts = ensure_set(root, cs, TASKS)
    text = json.dumps(shape.hf_config(dtype), indent=2)
    for folder in (base, *fts):
        path = folder / "config.json"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return ModelSet(dtype, base.resolve(), tuple(f.resolve() for f in fts))


# ----------------------------------------------------------------------------- configs


def _models(paths: Sequence[Path], **per_model: Sequence[Any]) -> list[Config]:
    """models: entries with the i-th value of each per-model parameter."""
    entries: list[Config] = []
    for i, path in enumerate(paths):
        entry: Config = {"model": str(path)}
        if per_model:
            entry["parameters"] = {name: values[i] for name, values in per_model.items()}
        entries.append(entry)
    return entries


def _gta(ms: ModelSet, **per_model: Sequence[Any]) -> Config:
    return {"base_model": str(ms.base), "models": _models(ms.fts, **per_model)}


def _slerp_t() -> list[Config]:
    """mergekit README's slerp schedule: a gradient per filter and a default."""
    return [
        {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
        {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
        {"value": 0.5},
    ]


def method_configs(ms: ModelSet, layers: int) -> dict[str, Config]:
    """One mergekit config per method (without dtype keys) over the set `ms`."""
    base, fts = str(ms.base), ms.fts
    weights = [0.5, 0.3, 0.4]
    # Three slices of layer_count / 2 layers, from overlapping ranges of the three fine-tunes.
    half, quarter = max(1, layers // 2), max(1, layers // 4)
    starts = [0, min(quarter, layers - half), layers - half]
    configs: dict[str, Config] = {
        # The base is one of the averaged models (mergekit: weighted mean of all inputs).
        "linear": {"models": _models((ms.base, *fts), weight=[0.2, 0.4, 0.25, 0.15])},
        "task_arithmetic": {
            **_gta(ms, weight=[[0.3, 0.7], 0.3, 0.4]),  # a gradient over the layers
            "parameters": {"lambda": 0.9},
        },
        "ties": _gta(
            ms,
            weight=weights,
            density=[0.3, 0.5, [{"filter": "mlp", "value": 0.6}, {"value": 0.7}]],
        ),
        "dare_ties": _gta(ms, weight=weights, density=[0.3, 0.5, 0.7]),
        "dare_linear": _gta(ms, weight=weights, density=[0.3, 0.5, 0.7]),
        "breadcrumbs": _gta(ms, weight=weights, density=[0.8, 0.7, 0.9], gamma=[0.01, 0.02, 0.05]),
        "breadcrumbs_ties": _gta(
            ms, weight=weights, density=[0.8, 0.7, 0.9], gamma=[0.01, 0.02, 0.05]
        ),
        "della": _gta(ms, weight=weights, density=[0.4, 0.5, 0.6], epsilon=[0.1, 0.1, 0.2]),
        "della_linear": _gta(ms, weight=weights, density=[0.4, 0.5, 0.6], epsilon=[0.1, 0.1, 0.2]),
        "sce": {**_gta(ms), "parameters": {"select_topk": 0.5}},
        "model_stock": _gta(ms),
        "multislerp": _gta(ms, weight=[0.5, 0.3, 0.2]),
        "karcher": _gta(ms),
        "nuslerp": {"base_model": base, "models": _models(fts[:2], weight=[0.6, 0.4])},
        "slerp": {
            "base_model": base,
            "models": _models((ms.base, fts[0])),
            "parameters": {"t": _slerp_t()},
        },
        "slerp_slices": {
            "slices": [
                {
                    "sources": [
                        {"model": base, "layer_range": [0, layers]},
                        {"model": str(fts[0]), "layer_range": [0, layers]},
                    ]
                }
            ],
            "base_model": base,
            "parameters": {"t": _slerp_t()},
        },
        "passthrough": {
            "slices": [
                {"sources": [{"model": str(m), "layer_range": [s, s + half]}]}
                for m, s in zip(fts, starts, strict=True)
            ],
            "base_model": base,
        },
    }
    for name, config in configs.items():
        config["merge_method"] = "slerp" if name == "slerp_slices" else name
    return configs


def write_config(
    folder: Path, name: str, config: Config, ms: ModelSet, compute: str = "float32"
) -> Path:
    """The YAML both tools get: compute in `compute`, write the set's dtype (float64 when
    computing in float64: the reference runs)."""
    short = "bf16" if ms.dtype == "bfloat16" else "fp32"
    out = "float64" if compute == "float64" else ms.dtype
    extra = {"dtype": ms.dtype} if name in PASSTHROUGH else {"dtype": compute, "out_dtype": out}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{short}{'-fp64' if compute == 'float64' else ''}.yml"
    path.write_text(yaml.safe_dump({**config, **extra}, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- running


@dataclass
class Tools:
    mergekit: str
    threads: int | None

    def command(self, side: str, config: Path, out: Path, seed: int | None = None) -> list[str]:
        if side == "isofast":
            cmd = [*isofast_command(), "merge", str(config), str(out), "--quiet", "--overwrite"]
            return cmd + (["--threads", str(self.threads)] if self.threads else [])
        cmd = [self.mergekit, str(config), str(out), *MERGEKIT_FLAGS]
        cmd += ["-j", str(self.threads)] if self.threads else []
        return cmd + (["--random-seed", str(seed)] if seed is not None else [])


def isofast_command() -> list[str]:
    """The `isofast` console script of the running interpreter: the command users type (and
    `python -m isofast.cli` from the repository root may import the source tree first)."""
    script = Path(sys.executable).parent / "isofast"
    found = str(script) if script.exists() else shutil.which("isofast")
    if found is None:
        raise SystemExit("the isofast command is not installed: pip install -e .")
    return [found]


def _child_env() -> dict[str, str]:
    # Local folders only: no hub look-ups on either side.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _why_failed(cmd: Sequence[str]) -> str:
    """The last line of the stderr of a failed child (run again, which is quick for a
    refusal)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def run_once(cmd: Sequence[str], out: Path) -> ChildRun | str:
    """One timed child under GNU time: its run, or why it failed."""
    shutil.rmtree(out, ignore_errors=True)
    try:
        return run_child(cmd, gnu_time=True, sample_rss=True, stdout="discard", env=_child_env())
    except ChildFailed:
        return _why_failed(cmd)


# ----------------------------------------------------------------------------- comparing


class Folder:
    """The tensors of a safetensors model folder (one file or an index over shards)."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        index = path / "model.safetensors.index.json"
        if index.exists():
            files = dict(json.loads(index.read_text())["weight_map"])
        else:
            single = path / "model.safetensors"
            with safe_open(str(single), framework="pt") as f:
                files = dict.fromkeys(f.keys(), single.name)
        self.files = files
        self._open = {
            name: stack.enter_context(safe_open(str(path / name), framework="pt"))
            for name in sorted(set(files.values()))
        }

    def names(self) -> list[str]:
        return sorted(self.files)

    def get(self, name: str) -> torch.Tensor:
        tensor: torch.Tensor = self._open[self.files[name]].get_tensor(name)
        return tensor


def num_layers(folder: Path) -> int | None:
    try:
        value = json.loads((folder / "config.json").read_text()).get("num_hidden_layers")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) else None


@dataclass
class Moments:
    """Running sums over all entries for a Pearson correlation of two vectors."""

    n: int = 0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    syy: float = 0.0
    sxy: float = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.n += x.numel()
        self.sx += float(x.sum())
        self.sy += float(y.sum())
        self.sxx += float((x * x).sum())
        self.syy += float((y * y).sum())
        self.sxy += float((x * y).sum())

    def corr(self) -> float:
        cov = self.sxy - self.sx * self.sy / self.n
        vx = self.sxx - self.sx**2 / self.n
        vy = self.syy - self.sy**2 / self.n
        return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


@dataclass
class Parity:
    """How two outputs of one method agree (fields by kind of method)."""

    rel: list[float] = field(default_factory=list)  # per tensor
    # per tensor, the part of ||U_iso - U_mk|| beyond eps ||theta_base|| (what writing the
    # weights in the output dtype may round away on each side), over ||U_mk||
    excess: list[float] = field(default_factory=list)
    differ: int = 0  # entries whose outputs are not bitwise equal
    total: int = 0  # entries in all
    kept: dict[str, float] = field(default_factory=dict)  # side -> fraction of U != 0
    corr: float | None = None  # isofast vs mergekit
    corr_mk: float | None = None  # mergekit seed 1 vs seed 2
    bitwise: bool | None = None
    layers: tuple[int | None, int | None] | None = None
    problem: str = ""  # names or shapes that differ
    differing: list[str] = field(default_factory=list)  # tensors not bitwise equal
    cause: str = ""  # what a difference beyond MAX_REL_DIFF comes from (see `explain`)
    explained: bool = False  # by mergekit's own float32 error or by ties in |D|

    def summary(self) -> str:
        if self.problem:
            return self.problem
        if self.bitwise is not None:
            same = "bitwise equal" if self.bitwise else "NOT bitwise equal"
            return f"{same}; layers {self.layers[0]} / {self.layers[1]}" if self.layers else same
        if self.corr is not None:
            text = f"kept {self.kept['isofast']:.4f} / {self.kept['mergekit']:.4f}, "
            text += f"corr {self.corr:.4f}"
            return text + (f" (mk-mk {self.corr_mk:.4f})" if self.corr_mk is not None else "")
        if self.differ == 0:
            return "bitwise equal"
        s = Spread.of(self.rel)
        text = f"{s.high:.1e} / {s.median:.1e} ({self.differ / self.total:.0e} of entries differ)"
        if s.high > MAX_REL_DIFF:
            text += f"; beyond output rounding {max(self.excess):.1e}"
        return text + (f"; {self.cause}" if self.cause else "")

    def ok(self, kind: str) -> bool:
        if self.problem:
            return False
        if kind == "passthrough":
            return bool(self.bitwise) and self.layers is not None and len(set(self.layers)) == 1
        if kind == "random":
            return True  # no threshold: kept fractions and correlation are shown
        return max(self.excess) <= MAX_REL_DIFF or self.explained

    def beyond(self) -> bool:
        """A deterministic difference beyond MAX_REL_DIFF (after output rounding)."""
        return bool(self.excess) and max(self.excess) > MAX_REL_DIFF


def _rel(iso: torch.Tensor, mk: torch.Tensor, allowance: float = 0.0) -> float:
    """||iso - mk|| / ||mk||, less `allowance` (an absolute norm) first."""
    den = float(torch.linalg.vector_norm(mk))
    num = max(0.0, float(torch.linalg.vector_norm(iso - mk)) - allowance)
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


@dataclass
class Updates:
    """The merged updates of one tensor, float64: out - theta_base."""

    iso: torch.Tensor
    mk: torch.Tensor
    rounding: float  # eps of the output dtype times ||theta_base||

    @classmethod
    def of(cls, name: str, iso: Folder, mk: Folder, base: Folder) -> Updates:
        theta, out_mk = base.get(name).double(), mk.get(name)
        rounding = torch.finfo(out_mk.dtype).eps * float(torch.linalg.vector_norm(theta))
        return cls(iso.get(name).double() - theta, out_mk.double() - theta, rounding)


def _add_updates(p: Parity, name: str, u: Updates) -> None:
    p.rel.append(_rel(u.iso, u.mk))
    p.excess.append(_rel(u.iso, u.mk, u.rounding))
    differ = int(torch.count_nonzero(u.iso != u.mk))
    p.differ += differ
    p.total += u.mk.numel()
    if differ:
        p.differing.append(name)


def compare(kind: str, base: Path, outs: dict[str, Path], mk2: Path | None = None) -> Parity:
    """Tensor-by-tensor parity of the isofast and mergekit outputs (`mk2`: a second mergekit
    run with another seed, for random methods)."""
    p = Parity()
    with ExitStack() as stack:
        iso, mk = (Folder(outs[side], stack) for side in SIDES)
        if iso.names() != mk.names():
            missing = sorted(set(mk.names()) ^ set(iso.names()))
            p.problem = f"names differ: {len(missing)} not in both, e.g. {missing[:3]}"
            return p
        if kind == "passthrough":
            p.bitwise = all(_same(iso.get(n), mk.get(n)) for n in mk.names())
            p.layers = (num_layers(outs["isofast"]), num_layers(outs["mergekit"]))
            return p
        b = Folder(base, stack)
        other = Folder(mk2, stack) if mk2 is not None else None
        kept = {"isofast": 0, "mergekit": 0}
        moments, moments_mk = Moments(), Moments()
        for name in mk.names():
            u = Updates.of(name, iso, mk, b)
            if u.iso.shape != u.mk.shape:
                p.problem = f"{name}: shapes {tuple(u.iso.shape)} / {tuple(u.mk.shape)}"
                return p
            _add_updates(p, name, u)
            if kind == "random":
                kept["isofast"] += int(torch.count_nonzero(u.iso))
                kept["mergekit"] += int(torch.count_nonzero(u.mk))
                moments.add(u.iso, u.mk)
                if other is not None:
                    moments_mk.add(u.mk, other.get(name).double() - b.get(name).double())
        if kind == "random":
            p.kept = {side: count / p.total for side, count in kept.items()}
            p.corr = moments.corr()
            p.corr_mk = moments_mk.corr() if other is not None else None
    return p


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def float64_errors(base: Path, outs: dict[str, Path], ref: Path) -> dict[str, float]:
    """Per side, the largest relative difference over the tensors of its update from that of
    `ref` (mergekit computing in float64)."""
    worst = dict.fromkeys(SIDES, 0.0)
    with ExitStack() as stack:
        b, r = Folder(base, stack), Folder(ref, stack)
        sides = {side: Folder(outs[side], stack) for side in SIDES}
        for name in r.names():
            theta = b.get(name).double()
            want = r.get(name).double() - theta
            for side, folder in sides.items():
                worst[side] = max(worst[side], _rel(folder.get(name).double() - theta, want))
    return worst


def tied_entries(ms: ModelSet, outs: dict[str, Path], names: Sequence[str]) -> tuple[int, int]:
    """(tied, differing): of the entries where the outputs differ, how many have a magnitude
    |D_t| (D_t = theta_t - theta_0 in float32, as both compute it) that another entry of the
    same task vector shares exactly, in some model t: entries that a magnitude trim keeps or
    drops by the order it gives to ties."""
    tied = total = 0
    with ExitStack() as stack:
        iso, mk = (Folder(outs[side], stack) for side in SIDES)
        base = Folder(ms.base, stack)
        fts = [Folder(f, stack) for f in ms.fts]
        for name in names:
            where = (iso.get(name) != mk.get(name)).reshape(-1).nonzero().reshape(-1)
            theta = base.get(name).float().reshape(-1)
            mags = [(ft.get(name).float().reshape(-1) - theta).abs() for ft in fts]
            for i in where.tolist():
                total += 1
                tied += any(int((m == m[i]).sum()) > 1 for m in mags)
    return tied, total


# ----------------------------------------------------------------------------- one method


@dataclass
class Row:
    method: str
    kind: str  # deterministic | random | passthrough
    runs: dict[str, list[ChildRun]] = field(default_factory=lambda: {s: [] for s in SIDES})
    fp32_runs: dict[str, ChildRun] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # side -> message
    fp32: Parity | None = None
    bf16: Parity | None = None

    def seconds(self, side: str) -> Spread:
        return Spread.of(r.seconds for r in self.runs[side])

    def rss(self, side: str) -> Spread:
        return Spread.of((r.max_rss or 0) / MiB for r in self.runs[side])

    def anon(self, side: str) -> Spread:
        """Peak RssAnon (memory the tool allocated, without mapped file pages), MiB."""
        return Spread.of(r.rss_anon / MiB for r in self.runs[side])

    def timed(self) -> bool:
        return all(self.runs[s] for s in SIDES)

    def checks(self) -> list[str]:
        """The targets this row misses (empty: all met)."""
        if self.refused:
            return ["refused"]
        missed = []
        if self.fp32 is not None and not self.fp32.ok(self.kind):
            missed.append("parity")
        if self.timed():
            if self.seconds("mergekit").median < MIN_SPEEDUP * self.seconds("isofast").median:
                missed.append("time")
            if self.rss("mergekit").median <= self.rss("isofast").median:
                missed.append("RSS")
        return missed


def kind_of(method: str) -> str:
    if method in PASSTHROUGH:
        return "passthrough"
    return "random" if method in RANDOM else "deterministic"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _record(row: Row, side: str, result: ChildRun | str, into: Callable[[ChildRun], None]) -> None:
    if isinstance(result, str):
        row.refused[side] = result
        _log(f"  {row.method} {side}: FAILED: {result}")
    else:
        into(result)
        rss = (result.max_rss or 0) / MiB
        _log(f"  {row.method} {side}: {result.seconds:.1f} s, peak RSS {rss:,.0f} MiB")


MAGNITUDE_TRIMS = ("ties", "breadcrumbs", "breadcrumbs_ties")


@dataclass
class Bench:
    """Where and how one comparison runs."""

    tools: Tools
    sets: dict[str, ModelSet]  # "bf16" (timed), "fp32" (parity)
    root: Path  # configs/ and out/ below it
    layers: int
    rounds: int
    keep: bool = False

    def config(self, method: str, label: str, compute: str = "float32") -> Path:
        ms = self.sets[label]
        raw = method_configs(ms, self.layers)[method]
        return write_config(self.root / "configs", method, raw, ms, compute)

    def out(self, method: str, side: str) -> Path:
        return self.root / "out" / f"{method}-{side}"

    def drop(self, *paths: Path) -> None:
        for path in () if self.keep else paths:
            shutil.rmtree(path, ignore_errors=True)


def timed_rounds(row: Row, bench: Bench) -> None:
    """`rounds` rounds on the bf16 set, the sides alternating; parity of the last outputs."""
    config = bench.config(row.method, "bf16")
    outs = {side: bench.out(row.method, side) for side in SIDES}

    def side_run(side: str) -> Callable[[int], None]:
        def run(_round: int) -> None:
            if side not in row.refused:
                result = run_once(bench.tools.command(side, config, outs[side]), outs[side])
                _record(row, side, result, row.runs[side].append)

        return run

    alternate(bench.rounds, {side: side_run(side) for side in SIDES})
    if not row.refused:
        row.bf16 = compare(row.kind, bench.sets["bf16"].base, outs)
    bench.drop(*outs.values())


def parity_runs(row: Row, bench: Bench) -> None:
    """One run per tool on the fp32 set (random methods: mergekit twice, seeds 1 and 2)."""
    config = bench.config(row.method, "fp32")
    outs = {side: bench.out(row.method, side) for side in SIDES}
    for side in SIDES:
        seed = 1 if row.kind == "random" and side == "mergekit" else None
        result = run_once(bench.tools.command(side, config, outs[side], seed), outs[side])
        _record(row, side, result, partial(row.fp32_runs.__setitem__, side))
    second = bench.out(row.method, "mergekit-seed2") if row.kind == "random" else None
    if second is not None and not row.refused:
        result = run_once(bench.tools.command("mergekit", config, second, 2), second)
        if isinstance(result, str):
            row.refused["mergekit"] = result
    if not row.refused:
        row.fp32 = compare(row.kind, bench.sets["fp32"].base, outs, second)
        if row.kind == "deterministic" and row.fp32.beyond():
            explain(row, row.fp32, bench, outs)
    bench.drop(*outs.values(), *([second] if second else []))


def explain(row: Row, p: Parity, bench: Bench, outs: dict[str, Path]) -> None:
    """Why a deterministic difference exceeds MAX_REL_DIFF: for magnitude trims, whether the
    differing entries are ties in |D|; otherwise which side is farther from mergekit computing
    in float64 (`dtype: float64`, written in float64)."""
    ms = bench.sets["fp32"]
    if row.method in MAGNITUDE_TRIMS:
        tied, total = tied_entries(ms, outs, p.differing)
        p.cause = f"{tied} of {total} differing entries are magnitude ties"
        p.explained = tied == total
        return
    ref = bench.out(row.method, "mergekit-float64")
    config = bench.config(row.method, "fp32", compute="float64")
    result = run_once(bench.tools.command("mergekit", config, ref), ref)
    if isinstance(result, str):
        p.cause = f"mergekit in float64 failed: {result}"
        return
    _log(f"  {row.method} mergekit float64 reference: {result.seconds:.1f} s")
    err = float64_errors(ms.base, outs, ref)
    p.cause = (
        f"max rel. diff from mergekit in float64: isofast {err['isofast']:.1e}, "
        f"mergekit {err['mergekit']:.1e}"
    )
    p.explained = err["isofast"] <= MAX_REL_DIFF < err["mergekit"]
    bench.drop(ref)


# ----------------------------------------------------------------------------- report


def _secs(s: Spread) -> str:
    return f"{s.median:.1f} ({s.low:.1f}-{s.high:.1f})"


def _mib(s: Spread) -> str:
    return f"{s.median:,.0f} ({s.low:,.0f}-{s.high:,.0f})"


def table(rows: Sequence[Row]) -> str:
    header = ["method", "fp32: rel. diff of update (max / median)", "bf16: rel. diff"]
    header += ["isofast s", "mergekit s", "time ratio", "isofast peak RSS MiB"]
    header += ["mergekit peak RSS MiB", "RSS ratio", "peak RssAnon MiB isofast / mergekit"]
    header += ["check"]
    lines = []
    for r in rows:
        fp32 = r.fp32.summary() if r.fp32 else "-"
        bf16 = r.bf16.summary() if r.bf16 else "-"
        if r.refused:
            fp32 = "; ".join(f"{side} failed: {msg}" for side, msg in r.refused.items())
        cells: list[object] = [r.method, fp32, bf16]
        if r.timed():
            t_iso, t_mk = r.seconds("isofast"), r.seconds("mergekit")
            m_iso, m_mk = r.rss("isofast"), r.rss("mergekit")
            cells += [_secs(t_iso), _secs(t_mk), f"{t_mk.median / t_iso.median:.1f}x"]
            cells += [_mib(m_iso), _mib(m_mk), f"{m_mk.median / m_iso.median:.2f}x"]
            anon = [r.anon(side).median for side in SIDES]
            cells.append(f"{anon[0]:,.0f} / {anon[1]:,.0f}")
        else:
            one = {s: _secs(r.seconds(s)) if r.runs[s] else "-" for s in SIDES}
            cells += [one["isofast"], one["mergekit"], "-", "-", "-", "-", "-"]
        missed = r.checks()
        explained = r.fp32 is not None and r.fp32.explained
        cells.append(
            "MISSED: " + ", ".join(missed) if missed else "ok" + " (diff explained)" * explained
        )
        lines.append(cells)
    return markdown_table(header, lines, right=(3, 4, 5, 6, 7, 8, 9))


def fp32_times(rows: Sequence[Row]) -> str:
    """The single fp32 runs (the accuracy runs), for scale."""
    header = ["method", "isofast s", "mergekit s", "isofast peak RSS MiB", "mergekit peak RSS MiB"]
    lines = []
    for r in rows:
        if all(s in r.fp32_runs for s in SIDES):
            iso, mk = r.fp32_runs["isofast"], r.fp32_runs["mergekit"]
            lines.append(
                [
                    r.method, f"{iso.seconds:.1f}", f"{mk.seconds:.1f}",
                    f"{(iso.max_rss or 0) / MiB:,.0f}", f"{(mk.max_rss or 0) / MiB:,.0f}",
                ]
            )  # fmt: skip
    return markdown_table(header, lines, right=(1, 2, 3, 4))


# ----------------------------------------------------------------------------- main


ALL_METHODS = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock", "multislerp", "karcher",
    "nuslerp", "slerp", "slerp_slices", "passthrough",
)  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--mergekit", default=DEFAULT_MERGEKIT, help="path of mergekit-yaml")
    ap.add_argument("--dir", default=DEFAULT_DIR, help="checkpoints, configs, outputs (reused)")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma list")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    ap.add_argument("--layers", type=int, default=8, help="layers (default 8)")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary (default 32000)")
    ap.add_argument("--quick", action="store_true", help="hidden 256, 4 layers, vocab 2000")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs per tool (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="threads of both (default all)")
    ap.add_argument("--skip-fp32", action="store_true", help="no fp32 accuracy runs")
    ap.add_argument("--skip-bf16", action="store_true", help="no timed bf16 runs")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the last outputs")
    ap.add_argument("--json", default=None, help="also write every run and result here")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab = 256, 4, 2000
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
    return args


def check_tools(mergekit: str) -> str | None:
    """Why the comparison cannot run, or None."""
    if not os.path.exists(GNU_TIME):
        return f"{GNU_TIME} not found: apt-get install time"
    if not (os.path.isfile(mergekit) and os.access(mergekit, os.X_OK)):
        return (
            f"mergekit-yaml not found at {mergekit}. Install mergekit 0.1.5 in its own venv:\n"
            f"  python -m venv --system-site-packages /work/venvs/mergekit\n"
            f"  /work/venvs/mergekit/bin/pip install mergekit==0.1.5\n"
            f"or pass --mergekit /path/to/venv/bin/mergekit-yaml"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    why = check_tools(args.mergekit)
    if why:
        print(why, file=sys.stderr)
        return 1
    root = Path(args.dir)
    shape = Shape(args.hidden, args.layers, args.vocab)
    wanted = {"bf16": "bfloat16", "fp32": "float32"}
    if args.skip_bf16:
        del wanted["bf16"]
    if args.skip_fp32:
        del wanted["fp32"]
    sets = {label: prepare_set(root / "models", shape, dtype) for label, dtype in wanted.items()}
    tools = Tools(args.mergekit, args.threads)
    bench = Bench(tools, sets, root, args.layers, args.rounds, args.keep_outputs)
    load_before = os.getloadavg()
    rows: list[Row] = []
    for method in args.methods:
        _log(f"{method}:")
        row = Row(method, kind_of(method))
        if "bf16" in sets:
            timed_rounds(row, bench)
        if "fp32" in sets and not row.refused:
            parity_runs(row, bench)
        rows.append(row)
        _log(table([row]).splitlines()[-1])
    load_after = os.getloadavg()
    mb = sum(math.prod(s) for s in shape.checkpoint_set("bfloat16").shapes.values()) / 1e6
    print(f"Command: `{command_line()}`\n")
    print(
        f"Inputs: Llama layout, hidden {shape.hidden}, intermediate {shape.inter}, "
        f"{shape.layers} layers, vocab {shape.vocab} ({mb:.0f} M parameters), base + {TASKS} "
        f"fine-tunes; timed on bf16 checkpoints (compute float32, output bf16), {args.rounds} "
        f"rounds alternating; parity on fp32 checkpoints (compute and output float32). Time "
        f"and RSS ratio: mergekit / isofast (medians). Machine: "
        f"{machine_summary(load_before, load_after)}.\n"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if any(r.fp32_runs for r in rows):
        print("\nThe fp32 (parity) runs, one each:\n")
        print(fp32_times(rows))
    return 3 if any(r.checks() for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
