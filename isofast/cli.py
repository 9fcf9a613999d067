"""The `isofast` command line: merge | plan | methods | analyze | demo | clean."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

import isofast._cli_env  # noqa: F401  (first: sets up OpenBLAS before numpy loads it)
from isofast.errors import IsofastError
from isofast.io import CheckpointError

EPILOG = """examples:
  isofast demo                                  merge small generated checkpoints, print a table
  isofast methods                               list methods, parameters and defaults
  isofast merge config.yml out/                 merge as a YAML config says (isofast or mergekit)
  isofast merge out/ --base B --model M1 --model M2 --method iso_cts --alpha 1.0
  isofast plan config.yml                       validate from headers only; print work and memory
  isofast merge lora.yml out/                   merge LoRA adapters (config with `adapters:`)
  isofast merge out/ --adapter A1 --adapter A2 --method iso_c --max-rank 16
  isofast merge config.yml out/ --resume        finish a merge that was interrupted
  isofast clean out/                            remove what interrupted merges into out/ left
  isofast analyze config.yml report/ --methods task_arithmetic,iso_c,iso_cts
                                                per-task subspace alignment, spectra, plots
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isofast",
        description="Merge fine-tuned checkpoints of one base model (Iso-C, Iso-CTS, TSV-M, "
        "TIES, DARE, consensus, task arithmetic, weight averaging), streaming from disk.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # -v / -q after any command (`isofast merge ... -v`).
    chatter = argparse.ArgumentParser(add_help=False)
    chatter.add_argument(
        "-v", "--verbose", action="count", default=0, help="say what it does (-vv: more)"
    )
    chatter.add_argument(
        "-q", "--quiet", action="store_true", help="errors only: no progress bar or summary"
    )

    merge = sub.add_parser(
        "merge",
        parents=[chatter],
        help="merge checkpoints into a new folder",
        description="Merge checkpoints. Either `merge CONFIG OUT` with a YAML config (isofast's "
        "schema or mergekit's; relative paths are relative to the config's folder), or "
        "`merge OUT --base B --model M ...` with flags. The output folder appears only when "
        "the merge is complete, with an isofast_config.yml that reproduces it.",
    )
    merge.add_argument(
        "args",
        nargs="+",
        metavar="CONFIG OUT | OUT",
        help="a YAML config and the output folder, or just the output folder",
    )
    _add_request_flags(merge)
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
    merge.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished shards of an interrupted merge of the same settings into OUT",
    )
    merge.add_argument(
        "--force",
        action="store_true",
        help="merge even if the planned peak memory exceeds the memory available",
    )

    plan = sub.add_parser(
        "plan",
        parents=[chatter],
        help="validate a merge from file headers and print its plan",
        description="Check every model path, tensor name, shape and dtype "
        "from headers only (no tensor data is read) and print the work items, "
        "estimated peak memory and output size.",
    )
    plan.add_argument("config", nargs="?", help="YAML config (or use the flags)")
    _add_request_flags(plan)

    sub.add_parser("methods", parents=[chatter], help="list merging methods with parameters")

    clean = sub.add_parser(
        "clean",
        parents=[chatter],
        help="remove what interrupted merges into OUT left behind",
        description="Remove the hidden temporary folders that interrupted merges into OUT "
        "kept for --resume (a new merge into OUT also removes those it does not resume).",
    )
    clean.add_argument("out", metavar="OUT", help="the output folder of the interrupted merges")

    analyze = sub.add_parser(
        "analyze",
        parents=[chatter],
        help="measure how each task aligns with the merged update (SAR, spectra, plots)",
        description="For the inputs of a merge (`analyze CONFIG OUT` or `analyze OUT --base B "
        "--model M ...`), per 2-D key and task: the subspace alignment ratio (SAR) of the task "
        "matrix against each method's merged update, the spectra of the task-arithmetic sum "
        "and of each update, norm shares and task-subspace overlaps. Writes analysis.json, "
        "analysis.md and PNG plots (with matplotlib: pip install 'isofast[plot]') into OUT.",
    )
    analyze.add_argument(
        "args",
        nargs="+",
        metavar="CONFIG OUT | OUT",
        help="a YAML config and the report folder, or just the report folder",
    )
    _add_request_flags(analyze)
    analyze.add_argument(
        "--methods",
        metavar="M1,M2",
        help="methods compared in one pass (default: task_arithmetic and the config's method)",
    )
    analyze.add_argument(
        "--energy-share",
        type=float,
        default=0.95,
        metavar="SHARE",
        help="k_M: fewest directions of the merged update holding this share of its energy "
        "(default 0.95)",
    )
    analyze.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="analyse only 2-D keys whose name contains PATTERN (repeat the flag)",
    )
    analyze.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    analyze.add_argument(
        "--force",
        action="store_true",
        help="analyse even if the estimated peak memory exceeds the memory available",
    )

    demo = sub.add_parser(
        "demo",
        parents=[chatter],
        help="merge small generated checkpoints with every method",
        description="Write a small base model and bf16 fine-tunes to a "
        "temporary folder, merge them with every method, print a table.",
    )
    demo.add_argument("--tasks", type=int, default=4, help="number of fine-tunes (default 4)")
    demo.add_argument("--keep", metavar="DIR", help="write into DIR and keep it")
    return parser


# How each setting of isofast.request.SETTINGS reads from the command line, where it is not a
# single string. The flags, their help and the fields they set all come from SETTINGS.
_FLAG_OPTIONS: dict[str, dict[str, Any]] = {
    "base": {"metavar": "PATH"},
    "models": {"action": "append", "metavar": "PATH"},
    "adapters": {"action": "append", "metavar": "PATH"},
    "output": {"choices": ["adapter", "model"]},
    "max_rank": {"type": int, "metavar": "RANK"},
    "max_shard_bytes": {"metavar": "SIZE"},
    "alpha": {"type": float},
    "params": {"action": "append", "metavar": "NAME=VALUE"},
    "compute_dtype": {"choices": ["float32", "float64"]},
    "out_dtype": {"choices": ["float32", "float16", "bfloat16", "float64"]},
    "exclude": {"action": "append", "metavar": "PATTERN"},
    "seed": {"type": int},
    "threads": {"type": int},
    "allow_pickle": {"action": "store_true", "default": None},
    "executor": {"choices": ["local", "ray"]},
    "ray_address": {"metavar": "auto|local|HOST:PORT"},
}


def _add_request_flags(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from isofast.request import SETTINGS, MergeRequest

    defaults = {f.name: f.default for f in dataclasses.fields(MergeRequest)}
    g = p.add_argument_group("merge settings (flags override the config)")
    for s in SETTINGS:
        default = defaults.get(s.field)
        shown = ", ".join(default) if isinstance(default, tuple) else default
        said = s.help + (f" (default {shown})" if isinstance(shown, (str, float)) else "")
        g.add_argument(s.flag, dest=s.field, help=said, **_FLAG_OPTIONS.get(s.field, {}))


def _request_from(args: argparse.Namespace, config: str | None) -> Any:
    from isofast.config import load_config
    from isofast.request import SETTINGS, MergeRequest, model_path

    given = {s.field: getattr(args, s.field) for s in SETTINGS}
    changes = {field: value for field, value in given.items() if value is not None}
    # Hugging Face names given as flags are looked up (and downloaded) as a config's are.
    if "base" in changes:
        changes["base"] = model_path(changes["base"], "--base", Path.cwd())
    for field, flag in (("models", "--model"), ("adapters", "--adapter")):
        if field in changes:
            changes[field] = [model_path(m, flag, Path.cwd()) for m in changes[field]]
    if "params" in changes:
        params = {}
        for item in changes["params"]:
            name, sep, value = item.partition("=")
            if not sep:
                raise IsofastError(f"--param needs NAME=VALUE, got {item!r}")
            params[name.strip()] = yaml.safe_load(value)
        changes["params"] = params
    if config:
        return load_config(config, **changes)
    if not (args.base and args.models) and not args.adapters:
        raise IsofastError(
            "give a config file, or --base and at least one --model (or at least one --adapter)"
        )
    changes["models"] = tuple(changes.get("models", ()))
    changes["adapters"] = tuple(changes.get("adapters", ()))
    changes.setdefault("base", {})  # an adapter merge may go without a base model
    return MergeRequest.make(changes, "command line")


def cmd_merge(args: argparse.Namespace) -> int:
    from isofast.api import run

    if len(args.args) == 2:
        config, out = args.args
    elif len(args.args) == 1:
        config, out = None, args.args[0]
    else:
        raise IsofastError("merge takes CONFIG OUT or OUT (with --base/--model)")
    request = _request_from(args, config)
    start = time.perf_counter()
    path = run(
        request,
        out,
        overwrite=args.overwrite,
        progress=not args.quiet,
        force=args.force,
        resume=args.resume,
    )
    seconds = time.perf_counter() - start
    if not args.quiet:
        n = len(request.adapters or request.models)
        what = f"{n} adapters" if request.adapters else f"{n} models"
        print(f"merged {what} with {request.method} into {path} in {seconds:.1f} s")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from isofast.api import plan_of
    from isofast.planner import format_plan

    request = _request_from(args, args.config)
    if request.adapters:
        from isofast.adapters import format_adapter_plan, plan_of_adapters

        print(format_adapter_plan(plan_of_adapters(request)))
    else:
        print(format_plan(plan_of(request)))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from isofast.io.writer import clean_leftovers

    removed = clean_leftovers(args.out)
    if not args.quiet:
        print(f"removed {len(removed)} leftover folder(s) of merges into {args.out}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from isofast.methods import methods

    for name, info in methods().items():
        params = ", ".join(f"{k}={v!r}" for k, v in info["parameters"].items()) or "-"
        print(f"{name:16s} {info['pretty_name']:26s} {info['kind']:11s} {params}")
        print(f"{'':16s} {info['summary']} ({info['reference']})")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from isofast.analysis.api import analyze_request
    from isofast.analysis.report import console_summary

    if len(args.args) not in (1, 2):
        raise IsofastError("analyze takes CONFIG OUT or OUT (with --base/--model)")
    config, out = (None, *args.args) if len(args.args) == 1 else args.args
    data = analyze_request(
        _request_from(args, config),
        out,
        methods=args.methods,
        energy_share=args.energy_share,
        include=args.include or (),
        plots=not args.no_plots,
        progress=not args.quiet,
        force=args.force,
    )
    if not args.quiet:
        print(console_summary(data, out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from isofast.demo import run_demo

    if args.keep:
        folder = Path(args.keep)
        folder.mkdir(parents=True, exist_ok=True)
        run_demo(folder, args.tasks)
    else:
        with tempfile.TemporaryDirectory(prefix="isofast-demo-") as tmp:
            run_demo(Path(tmp), args.tasks)
    return 0


COMMANDS = {
    "merge": cmd_merge,
    "plan": cmd_plan,
    "methods": cmd_methods,
    "demo": cmd_demo,
    "clean": cmd_clean,
    "analyze": cmd_analyze,
}


def _allow_many_open_files() -> None:
    """The merge keeps every input shard open (the core reads them itself): 8 models of 30
    shards is 240 files, near the usual soft limit of 1024 once Python's own are counted.
    Raise the soft limit to the hard one, as a program (not the library) may."""
    try:
        import resource
    except ImportError:  # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, 1 << 16) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@contextlib.contextmanager
def _logging_to_stderr(verbose: int, quiet: bool) -> Iterator[None]:
    """Library messages (the `isofast` logger) and Python warnings on stderr while a command
    runs: warnings by default, what the merge does with -v, every step with -vv, errors only
    with -q."""
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("isofast: %(message)s"))
    handler.setLevel(logging.ERROR if quiet else level)
    loggers = [logging.getLogger("isofast"), logging.getLogger("py.warnings")]
    old_levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(min(level, logger.level or logging.WARNING))
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for logger, old in zip(loggers, old_levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(old)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _allow_many_open_files()
    with _logging_to_stderr(args.verbose, args.quiet):
        try:
            return COMMANDS[args.command](args)
        except (IsofastError, CheckpointError, ValueError, FileExistsError) as exc:
            print(f"isofast {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(
                "isofast: interrupted; no output folder was published"
                + (
                    "; rerun with --resume to reuse the finished shards"
                    if args.command == "merge"
                    else ""
                ),
                file=sys.stderr,
            )
            return 130


if __name__ == "__main__":
    sys.exit(main())
