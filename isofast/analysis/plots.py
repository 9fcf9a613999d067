"""PNG plots of an analysis, from the same data as the JSON file (matplotlib: the `plot` extra).

- sar_per_task.png: SAR of each task under each method, side by side;
- spectra.png: singular values of one key per layer, of the task-arithmetic sum and of each
  method's update;
- sar_heatmap.png: layer x task SAR, one panel per method.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOT_NAMES = ("sar_per_task.png", "spectra.png", "sar_heatmap.png")
MAX_SPECTRUM_PANELS = 12


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(data: Mapping[str, Any], out_dir: Path) -> list[str]:
    """Write the three PNGs into `out_dir`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    written = []
    for name, draw in zip(PLOT_NAMES, (_sar_per_task, _spectra, _heatmap), strict=True):
        fig = draw(plt, data)
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _sar_per_task(plt: Any, data: Mapping[str, Any]) -> Any:
    methods, rows = list(data["methods"]), data["per_task"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 4.0), 4.0), layout="constrained")
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(rows))]
        ax.bar(xs, [_num(r["sar"][m]) for r in rows], width, label=m)
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("SAR (energy-weighted over keys)")
    ax.set_title(
        f"Alignment of each task with the merged update (energy share "
        f"{data['settings']['energy_share']:g})",
        fontsize="medium",
    )
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _representative_keys(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The largest key of each layer, for at most MAX_SPECTRUM_PANELS evenly spread layers."""
    by_name = {k["name"]: k for k in data["keys"]}
    layers = data["per_layer"]
    if len(layers) > MAX_SPECTRUM_PANELS:
        step = (len(layers) - 1) / (MAX_SPECTRUM_PANELS - 1)
        layers = [layers[round(i * step)] for i in range(MAX_SPECTRUM_PANELS)]
    chosen = []
    for layer in layers:
        keys = [by_name[n] for n in layer["keys"]]
        chosen.append(max(keys, key=lambda k: (k["shape"][0] * k["shape"][1], -keys.index(k))))
    return chosen


def _spectra(plt: Any, data: Mapping[str, Any]) -> Any:
    keys = _representative_keys(data)
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 2.9 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel()[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.ravel(), keys, strict=False):
        _semilogy(ax, key["task_arithmetic_sum"], "task-arith. sum", "k--")
        for m in data["methods"]:
            _semilogy(ax, key["methods"][m], m, None)
        ax.set_title(_short(key["name"]), fontsize="small")
        ax.tick_params(labelsize="x-small")
    axes.ravel()[0].legend(fontsize="x-small")
    fig.suptitle("Singular values before (task-arithmetic sum) and after merging (alpha = 1)")
    return fig


def _semilogy(ax: Any, entry: Mapping[str, Any], label: str, style: str | None) -> None:
    """The numerical range only: values below the rank cut are zero (rounding), and would
    stretch the axis by orders of magnitude."""
    values: Sequence[float | None] = entry["singular_values"][: entry["rank"]]
    positive = [y if y > 0 else math.nan for y in map(_num, values)]
    if style is None:
        ax.semilogy(positive, label=label, lw=1.2)
    else:
        ax.semilogy(positive, style, label=label, lw=1.0)


def _heatmap(plt: Any, data: Mapping[str, Any]) -> Any:
    import numpy as np

    methods, layers, tasks = list(data["methods"]), data["per_layer"], data["tasks"]
    fig, axes = plt.subplots(
        1,
        len(methods),
        figsize=(2.0 + (0.4 * len(tasks) + 0.8) * len(methods), 2.6 + 0.25 * len(layers)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, m in zip(axes[0], methods, strict=True):
        grid = np.array([[_num(v) for v in layer["sar"][m]] for layer in layers])
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(m, fontsize="small")
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize="x-small")
        ax.set_yticks(range(len(layers)), [layer["layer"] for layer in layers], fontsize="x-small")
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="SAR")
    fig.suptitle("SAR per layer and task")
    return fig


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]
