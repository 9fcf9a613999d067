"""`isofast analyze` on the quality benchmark's fine-tunes, and SAR against measured accuracy.

1. Fine-tunes all-MiniLM-L6-v2 on the seven bench/quality tasks with bench/quality's own code
   and settings (or takes them from its checkpoint cache) and writes the backbones as
   checkpoint folders with a config (inputs.py).
2. Runs `isofast analyze CONFIG bench/analysis/results --methods ...` on them.
3. Relates each task's SAR under each method to the accuracy bench/quality measured for that
   task and method (bench/quality/results/results.json): sar_vs_accuracy.md and .png.

Run:  python bench/analysis/run.py [--work-dir DIR] [--out-dir DIR] [--methods M1,M2,...]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/analysis/run.py`
    sys.path.append(str(Path(__file__).resolve().parents[2]))

REPO = Path(__file__).resolve().parents[2]
METHODS = "task_arithmetic,ties,tsv_m,iso_c,iso_cts"
QUALITY = REPO / "bench" / "quality" / "results" / "results.json"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python bench/analysis/run.py", description=__doc__)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/isofast-analysis"))
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "analysis" / "results")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--energy-share", default="0.95")
    p.add_argument("--quality", type=Path, default=QUALITY, help="bench/quality results.json")
    p.add_argument(
        "--compare-only",
        action="store_true",
        help="reuse OUT_DIR/analysis.json: only redo the comparison with accuracy",
    )
    args = p.parse_args(argv)
    if not args.compare_only:
        analyse(args)
    data = json.loads((args.out_dir / "analysis.json").read_text())
    quality = json.loads(args.quality.read_text())
    pairs = sar_and_accuracy(data, quality)
    (args.out_dir / "sar_vs_accuracy.md").write_text(comparison_report(pairs, data))
    scatter(pairs, args.out_dir / "sar_vs_accuracy.png")
    print(comparison_report(pairs, data))


def analyse(args: argparse.Namespace) -> None:
    from bench.analysis.inputs import write_inputs

    start = time.perf_counter()
    config = write_inputs(args.work_dir)
    print(f"inputs ready in {time.perf_counter() - start:.0f} s: {config}", file=sys.stderr)

    from isofast import cli

    command = [
        "analyze",
        str(config),
        str(args.out_dir),
        "--methods",
        args.methods,
        "--energy-share",
        args.energy_share,
        "--threads",
        "2",
    ]
    print("isofast " + shlex.join(command), file=sys.stderr)
    if cli.main(command) != 0:
        raise SystemExit(1)


def sar_and_accuracy(data: dict[str, Any], quality: dict[str, Any]) -> list[dict[str, Any]]:
    """(task, method): SAR, normalised accuracy, and the share of the fine-tuning gain over
    zero-shot that the merge kept."""
    rows = {r["name"]: r for r in quality["rows"]}
    zero, solo = rows["zero-shot"]["test_acc"], rows["individual"]["test_acc"]
    out = []
    for entry in data["per_task"]:
        task = entry["task"]
        for method, sar in entry["sar"].items():
            if method not in rows:
                continue
            acc = rows[method]["test_acc"][task]
            gain = solo[task] - zero[task]
            out.append(
                {
                    "task": task,
                    "method": method,
                    "sar": sar,
                    "normalized": rows[method]["normalized"][task],
                    "kept_gain": (acc - zero[task]) / gain if gain > 0 else math.nan,
                    "finetune_gain": gain,
                    "norm_share": entry["norm_share"],
                }
            )
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    return pearson(ranks(xs), ranks(ys))


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def comparison_report(pairs: list[dict[str, Any]], data: dict[str, Any]) -> str:
    methods = list(dict.fromkeys(p["method"] for p in pairs))
    tasks = list(dict.fromkeys(p["task"] for p in pairs))
    at = {(p["task"], p["method"]): p for p in pairs}
    lines = [
        "# SAR against measured accuracy (bench/quality)",
        "",
        f"SAR: energy-weighted over the {len(data['keys'])} analysed 2-D backbone keys, energy "
        f"share {data['settings']['energy_share']:g}. Accuracy: bench/quality/results (test split, "
        "each method at its validation-chosen alpha). Kept gain = (merged - zero-shot) / "
        "(individual - zero-shot) accuracy of the task.",
        "",
        "| task | fine-tuning gain (points) | norm share | "
        + " | ".join(f"{m} SAR / norm. acc." for m in methods)
        + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for t in tasks:
        first = at[(t, methods[0])]
        cells = " | ".join(
            f"{at[(t, m)]['sar']:.3f} / {100 * at[(t, m)]['normalized']:.1f}" for m in methods
        )
        lines.append(
            f"| {t} | {100 * first['finetune_gain']:.1f} | {first['norm_share']:.3f} | {cells} |"
        )
    lines += ["", "Rank correlations (Spearman):", ""]

    def corr(sel: list[dict[str, Any]], key: str) -> str:
        kept = [p for p in sel if math.isfinite(p[key])]
        return f"{spearman([p['sar'] for p in kept], [p[key] for p in kept]):+.2f}"

    lines.append(
        f"- all {len(pairs)} (task, method) pairs: SAR vs normalised accuracy "
        f"{corr(pairs, 'normalized')}, SAR vs kept gain {corr(pairs, 'kept_gain')}"
    )
    means = [
        (
            sum(at[(t, m)]["sar"] for t in tasks) / len(tasks),
            sum(at[(t, m)]["normalized"] for t in tasks) / len(tasks),
        )
        for m in methods
    ]
    lines.append(
        f"- across methods (mean over tasks, {len(methods)} points): "
        f"{spearman([a for a, _ in means], [b for _, b in means]):+.2f}"
    )
    for t in tasks:
        sel = [at[(t, m)] for m in methods]
        lines.append(f"- within task {t} (across methods): {corr(sel, 'normalized')}")
    for m in methods:
        sel = [at[(t, m)] for t in tasks]
        lines.append(
            f"- within method {m} (across tasks): vs normalised accuracy "
            f"{corr(sel, 'normalized')}, vs kept gain {corr(sel, 'kept_gain')}"
        )
    return "\n".join(lines) + "\n"


def scatter(pairs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for m in dict.fromkeys(p["method"] for p in pairs):
        sel = [p for p in pairs if p["method"] == m]
        ax.scatter([p["sar"] for p in sel], [100 * p["normalized"] for p in sel], label=m, s=22)
    ax.set_xlabel("task SAR (energy-weighted over keys)")
    ax.set_ylabel("normalised accuracy of the task (%)")
    ax.set_title("all-MiniLM-L6-v2, 7 tasks: alignment vs accuracy kept", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
