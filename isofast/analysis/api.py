"""`analyze`: for the inputs of a merge, how each task's update lines up with the merged
update, key by key (SAR, spectra, norm shares, task-subspace overlaps), for one or several
methods in one pass; written as JSON, Markdown and PNG plots."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from isofast import __version__
from isofast.analysis import plots, report, summary
from isofast.analysis.keys import KeyMeasures, Settings, measure_key
from isofast.analysis.sources import Inputs, open_source
from isofast.api import Source, _request
from isofast.errors import InsufficientMemory, MergeInputError, short
from isofast.memory_guard import available_bytes
from isofast.methods import get_method
from isofast.planner import FIXED_OVERHEAD_BYTES, mib
from isofast.progress import ProgressBar
from isofast.request import MergeRequest

log = logging.getLogger(__name__)

DEFAULT_SHARE = 0.95
JSON_NAME, MARKDOWN_NAME = "analysis.json", "analysis.md"
BASELINE = "task_arithmetic"  # always compared: the plain sum every method starts from


def analyze(
    base: Source | None,
    finetuned: Sequence[Source] = (),
    method: str = MergeRequest.method,
    *,
    adapters: Sequence[Any] | None = None,
    methods: str | Sequence[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    energy_share: float = DEFAULT_SHARE,
    include: str | Sequence[str] = (),
    plots: bool = True,
    progress: bool = False,
    force: bool = False,
    **settings: Any,
) -> dict[str, Any]:
    """Analyse the merge `isofast.merge(base, finetuned, method, **settings)` would make.

    Models, settings and method parameters are those of `isofast.merge`, checked the same way;
    LoRA adapters are given as to `isofast.merge_adapters`, with `adapters=[...]` and no
    fine-tuned models (`base` may then be None). For every float 2-D key (the keys the matrix
    methods treat as matrices; `include` keeps only names containing one of its strings) and
    each task: the SAR of the task matrix against the update of each method in `methods`
    (default: task arithmetic and `method`; the parameters apply to `method`, the others take
    their defaults), the spectra of the task-arithmetic sum and of each update, the tasks' norm
    shares and the overlaps of their subspaces; summaries per layer, task and method.
    `energy_share` sets k_M (docs/ALGORITHMS.md, section 9).

    Returns the analysis as JSON-ready data; with `out`, also writes analysis.json,
    analysis.md and (with matplotlib, unless `plots=False`) three PNGs into that folder.
    """
    if adapters is not None:
        from isofast.adapters.merge import adapter_request

        if finetuned:
            raise MergeInputError("give fine-tuned models or LoRA adapters to merge, not both")
        request = adapter_request(adapters, method, 1.0, base, None, None, settings)
    else:
        if base is None:
            raise MergeInputError("a merge of fine-tuned models needs the base model")
        request = _request(base, finetuned, method, 1.0, settings)
    return analyze_request(
        request,
        out,
        methods=methods,
        energy_share=energy_share,
        include=include,
        plots=plots,
        progress=progress,
        force=force,
    )


def analyze_request(
    request: MergeRequest,
    out: str | os.PathLike[str] | None = None,
    *,
    methods: str | Sequence[str] | None = None,
    energy_share: float = DEFAULT_SHARE,
    include: str | Sequence[str] = (),
    plots: bool = True,
    progress: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """`analyze` for a ready request (what the command line builds from a config)."""
    chosen = method_list(request, methods)
    share = _share(energy_share)
    patterns = (include,) if isinstance(include, str) else tuple(include)
    start = time.perf_counter()
    source = open_source(request, patterns)
    try:
        names = source.names
        _check_memory(source, request.compute_dtype, force)
        updates = [source.updates(m, p) for m, p in chosen.items()]
        settings = Settings(share, _rank_cut(request), request.compute_dtype)
        measured: list[KeyMeasures] = []
        total = sum(source.nbytes(n) for n in names)
        with ProgressBar(total, len(names), disable=not progress, desc="analyzing") as bar:
            for name in names:
                with source.naming():
                    deltas = source.task_matrices(name)
                    measured.append(measure_key(name, deltas, updates, settings))
                bar.update(name, source.nbytes(name))
    finally:
        source.close()
    header = _header(request, share, patterns)
    data = summary.build(
        measured, task_labels(request), {u.name: u.params for u in updates}, header
    )
    data["seconds"] = round(time.perf_counter() - start, 3)
    log.info("analysed %d keys for %s in %.1f s", len(names), ", ".join(chosen), data["seconds"])
    if out is not None:
        write_outputs(data, Path(out), plots)
    return data


def method_list(
    request: MergeRequest, methods: str | Sequence[str] | None
) -> dict[str, dict[str, Any]]:
    """Method name -> parameters: the request's own parameters for its method, defaults for
    the others. Unknown names fail as a merge fails on them."""
    given = [request.method] if methods is None else _names(methods)
    if methods is None and request.method != BASELINE:
        given.insert(0, BASELINE)
    chosen: dict[str, dict[str, Any]] = {}
    for name in given:
        spec = get_method(name)
        chosen.setdefault(spec.name, dict(request.params) if spec.name == request.method else {})
    if not chosen:
        raise MergeInputError("methods: give at least one method name")
    return chosen


def write_outputs(data: dict[str, Any], out_dir: Path, with_plots: bool = True) -> list[Path]:
    """analysis.json, analysis.md and the PNGs (when matplotlib is there) in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs: list[str] = []
    if with_plots and plots.available():
        pngs = plots.write_plots(data, out_dir)
    elif with_plots:
        log.warning(
            "matplotlib is not installed: no plots (pip install 'isofast[plot]'); the JSON "
            "and Markdown reports are written"
        )
    (out_dir / JSON_NAME).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    (out_dir / MARKDOWN_NAME).write_text(report.markdown(data, pngs))
    return [out_dir / n for n in (JSON_NAME, MARKDOWN_NAME, *pngs)]


def task_labels(request: MergeRequest) -> list[str]:
    """A short, unique name per fine-tune: its folder or file name, else task0, task1, ..."""
    labels = []
    for t, model in enumerate(request.models or request.adapters):
        label = f"task{t}"
        if isinstance(model, str):
            path = Path(model)
            label = path.name if path.is_dir() else path.stem
            if label in ("model", "pytorch_model", "adapter_model"):
                label = path.parent.name  # a checkpoint file: name it by its folder
        labels.append(label if label not in labels else f"{label}#{t}")
    return labels


def _names(methods: str | Sequence[str]) -> list[str]:
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    if not all(isinstance(m, str) for m in items):
        raise MergeInputError(f"methods must be names, got {short(methods)}")
    return [m.strip() for m in items if m.strip()]


def _share(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeInputError(f"energy_share must be a number, got {short(value)}")
    if not 0.0 < float(value) <= 1.0:
        raise MergeInputError(f"energy_share must be in (0, 1], got {short(value)}")
    return float(value)


def _rank_cut(request: MergeRequest) -> float:
    """The merge's rank tolerance (docs/ALGORITHMS.md, section 8.2): rank_tol when the request
    sets it, else the compute dtype's default."""
    from isofast.adapters.plan import rank_tolerance

    return rank_tolerance(request.method_params, request.compute_dtype)


def key_bytes(shape: tuple[int, ...], tasks: int, compute_bytes: int) -> int:
    """Memory one key takes while it is measured: the T task matrices, one update and the
    theta0 conversion in the compute dtype; the Gram matrix, its eigenvectors and eigen-solver
    workspace (about 4 r^2) and one basis (at most max(m, n) x r) in float64."""
    m, n = shape
    r = min(m, n)
    return (tasks + 2) * m * n * compute_bytes + 8 * (4 * r * r + max(m, n) * r)


def _check_memory(source: Inputs, dtype: str, force: bool) -> None:
    compute_bytes = 8 if dtype == "float64" else 4
    peak = FIXED_OVERHEAD_BYTES + max(
        key_bytes(source.shape(n), source.tasks, compute_bytes) for n in source.names
    )
    available = available_bytes()
    if available is None or peak <= available:
        return
    message = (
        f"this analysis needs about {mib(peak)} of memory (estimate for its largest key) and "
        f"{mib(available)} is available. Ways out: analyse fewer keys (--include / include=), "
        f"closing other programs, or --force (force=True) to try anyway"
    )
    if force:
        log.warning("%s; going ahead (forced)", message.split(". Ways out")[0])
        return
    raise InsufficientMemory(message)


def _header(request: MergeRequest, share: float, include: Sequence[str]) -> dict[str, Any]:
    def where(model: Any) -> str:
        return model if isinstance(model, str) else "(in memory)"

    return {
        "isofast_version": __version__,
        "inputs": {
            "base": where(request.base) if request.has_base else "(none)",
            "models": [where(m) for m in request.models],
            "adapters": [where(a) for a in request.adapters],
        },
        "settings": {
            "energy_share": share,
            "compute_dtype": request.compute_dtype,
            "exclude": list(request.exclude),
            "include": list(include),
            "rank_cut": _rank_cut(request),
            "seed": request.seed,
            "note": "updates are M at alpha = 1; SAR, flatness and effective rank do not "
            "depend on alpha",
        },
    }
