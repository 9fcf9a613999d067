"""The `isofast` command line: merge | plan | methods | demo."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
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
"""


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isofast",
        description="Merge fine-tuned checkpoints of one base model (Iso-C, Iso-CTS, TSV-M, "
        "TIES, DARE, consensus, task arithmetic, weight averaging), streaming from disk.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = sub.add_parser(
        "merge",
        help="merge checkpoints into a new folder",
        description="Merge checkpoints. Either `merge CONFIG OUT` with a YAML "
        "config, or `merge OUT --base B --model M ...` with flags.",
    )
    merge.add_argument(
        "args",
        nargs="+",
        metavar="CONFIG OUT | OUT",
        help="a YAML config and the output folder, or just the output folder",
    )
    _add_request_flags(merge)
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output")
    merge.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")

    plan = sub.add_parser(
        "plan",
        help="validate a merge from file headers and print its plan",
        description="Check every model path, tensor name, shape and dtype "
        "from headers only (no tensor data is read) and print the work items, "
        "estimated peak memory and output size.",
    )
    plan.add_argument("config", nargs="?", help="YAML config (or use the flags)")
    _add_request_flags(plan)

    sub.add_parser("methods", help="list merging methods with parameters and defaults")

    demo = sub.add_parser(
        "demo",
        help="merge small generated checkpoints with every method",
        description="Write a small base model and bf16 fine-tunes to a "
        "temporary folder, merge them with every method, print a table.",
    )
    demo.add_argument("--tasks", type=int, default=4, help="number of fine-tunes (default 4)")
    demo.add_argument("--keep", metavar="DIR", help="write into DIR and keep it")
    return parser


def _add_request_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("merge settings (flags override the config)")
    g.add_argument("--base", help="base (pre-trained) model: folder or file")
    g.add_argument("--model", action="append", default=None, help="fine-tuned model (repeat)")
    g.add_argument("--method", help="merge method (see `isofast methods`), default iso_cts")
    g.add_argument("--alpha", type=float, help="scale of the merged update, default 1.0")
    g.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="method parameter, e.g. --param density=0.2 (repeat)",
    )
    g.add_argument("--dtype", choices=["float32", "float64"], help="compute dtype")
    g.add_argument(
        "--out-dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="output dtype (default: each tensor keeps the base model's dtype)",
    )
    g.add_argument("--exclude", action="append", help="name substring kept out of matrix methods")
    g.add_argument("--seed", type=int, help="seed for DARE")
    g.add_argument("--threads", type=int, help="compute threads (default: all cores)")
    g.add_argument(
        "--device",
        help="cpu (default), or cuda / cuda:N: Iso-C's matrices on the GPU (needs the CUDA "
        "build and PyTorch with CUDA)",
    )
    g.add_argument("--out-shard-size", help="max output shard size, e.g. 5GB (default 5GiB)")
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow torch files that need full unpickling (runs code: trust them!)",
    )


def _request_from(args: argparse.Namespace, config: str | None) -> Any:
    from dataclasses import replace

    from isofast.config import load_config, parse_size
    from isofast.pipeline import MergeRequest

    if config:
        request = load_config(config)
    else:
        if not args.base or not args.model:
            raise IsofastError("give a config file, or --base and at least one --model")
        request = MergeRequest(base=args.base, models=tuple(args.model))
    changes: dict[str, Any] = {}
    if args.base and config:
        changes["base"] = args.base
    if args.model and config:
        changes["models"] = tuple(args.model)
    for flag, field in [
        ("method", "method"),
        ("alpha", "alpha"),
        ("dtype", "compute_dtype"),
        ("out_dtype", "out_dtype"),
        ("seed", "seed"),
        ("threads", "threads"),
        ("device", "device"),
    ]:
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    if args.exclude is not None:
        changes["exclude"] = tuple(args.exclude)
    if args.out_shard_size is not None:
        changes["max_shard_bytes"] = parse_size(args.out_shard_size)
    if args.allow_pickle:
        changes["allow_pickle"] = True
    if args.param:
        params = dict(request.params or {})
        for item in args.param:
            name, sep, value = item.partition("=")
            if not sep:
                raise IsofastError(f"--param needs NAME=VALUE, got {item!r}")
            params[name.strip()] = _parse_value(value)
        changes["params"] = params
    return replace(request, **changes)


def cmd_merge(args: argparse.Namespace) -> int:
    from isofast.model_card import merge_config_yaml
    from isofast.pipeline import merge_checkpoints
    from isofast.progress import ProgressBar

    if len(args.args) == 2:
        config, out = args.args
    elif len(args.args) == 1:
        config, out = None, args.args[0]
    else:
        raise IsofastError("merge takes CONFIG OUT or OUT (with --base/--model)")
    request = _request_from(args, config)
    from isofast.planning import make_plan

    plan = make_plan(request)  # validates everything from headers before any data is read
    start = time.perf_counter()
    with ProgressBar(plan.total_input_bytes, len(plan.items), disable=args.quiet) as bar:
        path = merge_checkpoints(
            request,
            out,
            overwrite=args.overwrite,
            progress=bar.update,
            config_text=merge_config_yaml(request),
        )
    if not args.quiet:
        seconds = time.perf_counter() - start
        print(
            f"merged {len(request.models)} models with {request.method} into {path} "
            f"in {seconds:.1f} s"
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from isofast.planning import format_plan, make_plan

    request = _request_from(args, args.config)
    print(format_plan(make_plan(request)))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from isofast.methods import methods

    for name, info in methods().items():
        params = ", ".join(f"{k}={v!r}" for k, v in info["parameters"].items()) or "-"
        print(f"{name:16s} {info['pretty_name']:26s} {info['kind']:11s} {params}")
        print(f"{'':16s} {info['summary']} ({info['reference']})")
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


COMMANDS = {"merge": cmd_merge, "plan": cmd_plan, "methods": cmd_methods, "demo": cmd_demo}


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _allow_many_open_files()
    try:
        return COMMANDS[args.command](args)
    except (IsofastError, CheckpointError, ValueError, FileExistsError) as exc:
        print(f"isofast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("isofast: interrupted; no output folder was published", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
