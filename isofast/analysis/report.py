"""The Markdown report of an analysis (built from the same data as the JSON file)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MEANING = (
    "SAR (subspace alignment ratio) of a task: the share of its update that lies in the "
    "dominant subspace of the merged update, sqrt(||Pi D_t||^2 / ||D_t||^2), 1 = fully kept, "
    "0 = ignored; a task with a low SAR is one the merge neglects. Flatness: effective rank / "
    "numerical rank of a spectrum, 1 = every direction equally strong (isotropic)."
)
LOWEST_PAIRS = 10


def markdown(data: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    methods = list(data["methods"])
    tasks = list(data["tasks"])
    lines = [
        "# isofast analyze",
        "",
        f"Base: `{data['inputs']['base']}`; {len(tasks)} fine-tunes; "
        f"{len(data['keys'])} 2-D keys in {len(data['per_layer'])} layers; energy share "
        f"{data['settings']['energy_share']:g} (k_M: the fewest leading directions of the "
        f"merged update holding that share of its energy); compute dtype "
        f"{data['settings']['compute_dtype']}.",
        "",
        MEANING,
        "",
        "## Methods",
        "",
        "| method | min task SAR | least aligned task | mean task SAR | update flatness | "
        "effective rank | k_M / r |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = data["summary"][m]
        lines.append(
            f"| {m} | {_f(s['min_task_sar'])} | {s['least_aligned_task'] or '-'} | "
            f"{_f(s['mean_task_sar'])} | {_f(s['mean_flatness'])} | "
            f"{_f(s['mean_effective_rank'], 1)} | {_f(s['mean_energy_rank_fraction'])} |"
        )
    before = data["before"]
    lines += [
        "",
        f"Before merging, the task-arithmetic sum has a mean flatness of "
        f"{_f(before['mean_flatness'])} and a mean effective rank of "
        f"{_f(before['mean_effective_rank'], 1)} per key (means over keys).",
        "",
        "## SAR per task",
        "",
        "Over all analysed keys, each key weighted by the task's energy there.",
        "",
        "| task | norm share | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for row in data["per_task"]:
        cells = " | ".join(_f(row["sar"][m]) for m in methods)
        lines.append(f"| {row['task']} | {_f(row['norm_share'])} | {cells} |")
    lines += [
        "",
        "## SAR per layer",
        "",
        "Minimum over tasks / mean over tasks; flatness of the task-arithmetic sum and of each "
        "update (mean over the layer's keys).",
        "",
        "| layer | keys | "
        + " | ".join(f"{m} min / mean SAR" for m in methods)
        + " | flatness sum | "
        + " | ".join(f"flatness {m}" for m in methods)
        + " | task overlap |",
        "|---|---|" + "---|" * (2 * len(methods) + 2),
    ]
    for layer in data["per_layer"]:
        sar = " | ".join(f"{_f(layer['min_sar'][m])} / {_f(layer['mean_sar'][m])}" for m in methods)
        flat = " | ".join(_f(layer["flatness"][m]) for m in methods)
        lines.append(
            f"| {layer['layer']} | {len(layer['keys'])} | {sar} | "
            f"{_f(layer['flatness']['task_arithmetic_sum'])} | {flat} | "
            f"{_f(layer['mean_overlap'])} |"
        )
    lines += ["", f"## Least aligned (key, task) pairs, {LOWEST_PAIRS} per method", ""]
    for m in methods:
        pairs = sorted(
            (sar, key["name"], tasks[t])
            for key in data["keys"]
            for t, sar in enumerate(key["methods"][m]["sar"])
            if sar is not None
        )[:LOWEST_PAIRS]
        lines.append(
            f"- **{m}**: " + "; ".join(f"{name} / {task} {_f(sar)}" for sar, name, task in pairs)
        )
    lines += [
        "",
        "## Task-subspace overlaps",
        "",
        "Mean over keys of the overlap of two tasks' energy-share subspaces (mean squared cosine "
        "of their principal angles: 1 = one holds the other, 0 = orthogonal).",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for task, row in zip(tasks, data["overlaps"], strict=True):
        lines.append(f"| {task} | " + " | ".join(_f(v) for v in row) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def console_summary(data: Mapping[str, Any], out: object = None) -> str:
    """What `isofast analyze` prints: one line per method, the meaning, where the files are."""
    tasks = len(data["tasks"])
    lines = [
        f"analysed {len(data['keys'])} 2-D keys of {tasks} fine-tunes in {data['seconds']:.1f} s "
        f"(energy share {data['settings']['energy_share']:g})",
        "",
        f"{'method':16s} {'min task SAR':>12s} {'least aligned':>16s} {'mean task SAR':>13s} "
        f"{'flatness':>9s}",
    ]
    for m, s in data["summary"].items():
        worst = str(s["least_aligned_task"] or "-")[:16]
        lines.append(
            f"{m:16s} {_f(s['min_task_sar']):>12s} {worst:>16s} {_f(s['mean_task_sar']):>13s} "
            f"{_f(s['mean_flatness']):>9s}"
        )
    lines += ["", MEANING]
    if out is not None:
        lines.append(f"report: {out}/analysis.md (all numbers: analysis.json)")
    return "\n".join(lines)
