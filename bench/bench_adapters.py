"""LoRA adapter merging: isofast against PEFT's `add_weighted_adapter` (issue 12, item 2).

Generates T random LoRA adapters (non-zero A and B) on an LLM-shaped Llama layout (hidden 4096,
intermediate 14336, grouped-query k/v 1024 x 4096, all 7 linear modules of each layer) as PEFT
adapter folders, without any base weights on disk. Then, side by side in one run, each side in
its own child process under `/usr/bin/time -v` (fresh peak RSS), `--rounds` rounds alternating:

* `peft`: a PeftModel on the Llama (its weights allocated but never written, so they are not
  resident: a real run would hold them too), the T adapters loaded, then
  `add_weighted_adapter(names, [1.0] * T, "merged", combination_type="svd", svd_rank=r)`.
  PEFT forms every adapter's dense delta s_t B_t A_t (get_delta_weight applies the scaling),
  sums them with the weights (merge_utils.task_arithmetic) and keeps the leading r triplets of
  a torch.linalg.svd of the sum; the new adapter has lora_alpha = r, so its B A is exactly
  that truncation. With weights 1.0 each this is isofast's task arithmetic with alpha 1
  (weights 1/T would be isofast's weight_average).
* `isofast task_arithmetic, max_rank r`: `isofast.merge_adapters(folders, "task_arithmetic",
  1.0, output="adapter", max_rank=r, out=...)`: the same math, on the stacked factors.
* `isofast iso_c`, `iso_cts`, `tsv_m`: the same call, adapter output at its exact rank.

Times are of the merge call alone (adapters already loaded for PEFT; isofast's call reads the
adapter files and writes the output folder) and of the whole child (imports, loading,
saving). Results: per module, the relative Frobenius difference of the dense products B A of
PEFT's merged adapter and isofast's (float64), and each one's distance to the exact sum of
the updates beside the optimal rank-r error.

    python bench/bench_adapters.py                    # 2 layers, T = 8, r = 16, 2 rounds
    python bench/bench_adapters.py --hidden 512 --intermediate 1792 --kv 128 --rounds 2  # quick

Prints a markdown table with the command that produced it; `--out JSON` saves everything.
Needs `/usr/bin/time`, torch, transformers and peft.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

HERE = Path(__file__).resolve().parent
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."
MARKER = ".isofast-bench-complete"
BASE_NAME = "bench-llama"  # base_model_name_or_path of every adapter (nothing on disk)


# ----------------------------------------------------------------------------- the workload


def module_shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} of the Llama's linear modules."""
    h, i, kv = args.hidden, args.intermediate, args.kv
    shape = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    return {f"model.layers.{n}.{k}": s for n in range(args.layers) for k, s in shape.items()}


def make_adapters(args: argparse.Namespace) -> list[Path]:
    """T PEFT adapter folders (float32 factors, lora_alpha = 2 r). A ~ N(0, 1/in) as Kaiming
    would give it; B ~ N(0, 0.02^2) with its columns scaled by 0.85^j, a decaying spectrum as
    trained adapters have, and a different overall scale per adapter."""
    from peft import LoraConfig
    from safetensors.numpy import save_file

    stamp = json.dumps(
        {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "kv", "tasks", "rank")}
    )
    root = Path(args.dir) / "adapters"
    folders = [root / f"lora{t:02d}" for t in range(args.tasks)]
    if (root / MARKER).exists() and (root / MARKER).read_text() == stamp:
        return folders
    shutil.rmtree(root, ignore_errors=True)
    r = args.rank
    decay = 0.85 ** np.arange(r)
    for t, folder in enumerate(folders):
        rng = np.random.default_rng(1000 + t)
        tensors = {}
        for name, (out_f, in_f) in module_shapes(args).items():
            a = rng.standard_normal((r, in_f), dtype=np.float32) / np.sqrt(in_f)
            b = (0.02 * (1 + 0.25 * t)) * rng.standard_normal((out_f, r), dtype=np.float32)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = (b * decay).astype(np.float32)
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=list(MODULES),
            task_type="CAUSAL_LM",
            base_model_name_or_path=BASE_NAME,
        )
        config.save_pretrained(str(folder))
    (root / MARKER).write_text(stamp)
    return folders


# ----------------------------------------------------------------------------- child processes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_peft(spec: dict[str, Any]) -> dict[str, Any]:
    import warnings

    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["heads"] * spec["kv"] // spec["hidden"],
        max_position_embeddings=128,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")  # allocated, never written: not resident
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    names = [f"t{t}" for t in range(len(spec["adapters"]))]
    peft_model = PeftModel.from_pretrained(model, spec["adapters"][0], adapter_name=names[0])
    for name, folder in zip(names[1:], spec["adapters"][1:], strict=True):
        peft_model.load_adapter(folder, adapter_name=name)
    load_s = time.perf_counter() - t0
    rss_before = _status_kib("VmRSS") * 1024
    peak = harness.PeakMemory()
    t1 = time.perf_counter()
    peft_model.add_weighted_adapter(
        names,
        [1.0] * len(names),
        "merged",
        combination_type="svd",
        svd_rank=spec["rank"],
        svd_full_matrices=spec["full_matrices"],
    )
    merge_s = time.perf_counter() - t1
    merge_peak = peak.peak_delta_mib() * harness.MiB
    state = get_peft_model_state_dict(peft_model, adapter_name="merged")
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
    scaling = {
        float(m.scaling["merged"])
        for m in peft_model.modules()
        if isinstance(getattr(m, "scaling", None), dict) and "merged" in m.scaling
    }
    return {
        "merge_s": merge_s,
        "load_s": load_s,
        "rss_before_merge": rss_before,
        "merge_peak_above_start": merge_peak,
        "base_bytes_unresident": base_bytes,
        "merged_scaling": sorted(scaling),
        "torch_threads": torch.get_num_threads(),
    }


def child_isofast(spec: dict[str, Any]) -> dict[str, Any]:
    import isofast

    rss_before = _status_kib("VmRSS") * 1024
    peak = harness.PeakMemory()
    t1 = time.perf_counter()
    result = isofast.merge_adapters(
        spec["adapters"],
        spec["method"],
        1.0,
        output="adapter",
        max_rank=spec["max_rank"],
        out=spec["out"],
        overwrite=True,
    )
    merge_s = time.perf_counter() - t1
    return {
        "merge_s": merge_s,
        "rss_before_merge": rss_before,
        "merge_peak_above_start": peak.peak_delta_mib() * harness.MiB,
        "ranks": sorted(set(result.ranks.values())),
        "max_truncation": max(result.truncation.values(), default=0.0),
    }


def run_side(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    # attempts: a child that fails at once (the package rebuilt under it) is retried
    run = harness.run_child(cmd, gnu_time=True, stdout="capture", env=env, attempts=4)
    inner = json.loads(run.stdout.strip().splitlines()[-1])
    return {"wall_s": run.seconds, "cpu_s": run.cpu_seconds, "max_rss": run.max_rss, **inner}


# ----------------------------------------------------------------------------- comparing


def _load_factors(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module: (B, A)} in float64."""
    from safetensors.numpy import load_file

    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[module] = (b.astype(np.float64), a.astype(np.float64))
    return out


def compare(adapters: list[Path], peft_out: Path, iso_out: Path, rank: int) -> list[dict]:
    """Per module: ||P - I|| / ||I|| of the dense products, each one's ||X - D|| / ||D|| against
    the exact sum D = sum_t s_t B_t A_t, the optimal rank-r error and the gap s_r / s_{r+1}."""
    inputs = [_load_factors(a) for a in adapters]
    scale = [json.loads((a / "adapter_config.json").read_text()) for a in adapters]
    scale = [c["lora_alpha"] / c["r"] for c in scale]
    peft, iso = _load_factors(peft_out), _load_factors(iso_out)
    rows = []
    for module in sorted(iso, key=lambda n: (int(n.split(".")[2]), n)):
        left = np.hstack([s * f[module][0] for s, f in zip(scale, inputs, strict=True)])
        right = np.vstack([f[module][1] for f in inputs])
        _, k_left = np.linalg.qr(left)
        _, k_right = np.linalg.qr(right.T)
        sv = np.linalg.svd(k_left @ k_right.T, compute_uv=False)
        exact = left @ right
        p = peft[module][0] @ peft[module][1]
        i = iso[module][0] @ iso[module][1]
        norm = np.linalg.norm(exact)
        rows.append(
            {
                "module": module,
                "shape": list(exact.shape),
                "peft_vs_isofast": float(np.linalg.norm(p - i) / np.linalg.norm(i)),
                "peft_vs_exact": float(np.linalg.norm(p - exact) / norm),
                "isofast_vs_exact": float(np.linalg.norm(i - exact) / norm),
                "optimal": float(np.sqrt(np.sum(sv[rank:] ** 2) / np.sum(sv**2))),
                "gap": float(sv[rank - 1] / sv[rank]),
            }
        )
        del exact, p, i
    return rows


# ----------------------------------------------------------------------------- report


def _fmt_s(values: list[float]) -> str:
    s = harness.Spread.of(values)
    digits = 2 if s.median < 10 else 1
    return f"{s.median:.{digits}f} [{s.low:.{digits}f}-{s.high:.{digits}f}]"


def _mib(values: list[float]) -> str:
    return f"{harness.Spread.of(values).median / harness.MiB:,.0f}"


def report(runs: dict[str, list[dict]], labels: dict[str, str], diff: str) -> str:
    peft = [r["merge_s"] for r in runs["peft"]]
    peft_wall = [r["wall_s"] for r in runs["peft"]]
    rows = []
    for side, rs in runs.items():
        merge, wall = [r["merge_s"] for r in rs], [r["wall_s"] for r in rs]
        rows.append(
            [
                labels[side],
                _fmt_s(merge),
                _fmt_s(wall),
                "1" if side == "peft" else f"{harness.ratio_of_medians(peft, merge):,.0f}x",
                "1" if side == "peft" else f"{harness.ratio_of_medians(peft_wall, wall):,.1f}x",
                _mib([r["max_rss"] for r in rs]),
                _mib([r["merge_peak_above_start"] for r in rs]),
                diff if side == "ta16" else "",
            ]
        )
    header = [
        "side",
        "merge call, s",
        "child wall, s",
        "PEFT / this (call)",
        "PEFT / this (wall)",
        "peak RSS, MiB",
        "merge peak above start, MiB",
        "B A vs PEFT",
    ]
    return harness.markdown_table(header, rows, right=range(1, 7))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--kv", type=int, default=1024, help="rows of k_proj / v_proj")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--methods", default="iso_c,iso_cts,tsv_m", help="isofast methods beside")
    p.add_argument(
        "--peft-full-matrices",
        action="store_true",
        help="PEFT's default svd_full_matrices=True (slower; the default here is False, "
        "PEFT's fastest setting, with the same result)",
    )
    p.add_argument("--dir", default="/tmp/isofast-bench-adapters")
    p.add_argument("--out", help="write everything measured as JSON here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._child:
        spec = json.loads(args._child)
        result = child_peft(spec) if spec["side"] == "peft" else child_isofast(spec)
        print(json.dumps(result))
        return

    load0 = os.getloadavg()
    t_start = time.perf_counter()
    adapters = make_adapters(args)
    folders = [str(a) for a in adapters]
    outs = Path(args.dir) / "out"
    common = {"adapters": folders, "rank": args.rank}
    specs: dict[str, dict[str, Any]] = {
        "peft": {
            **common,
            "side": "peft",
            "out": str(outs / "peft"),
            "full_matrices": args.peft_full_matrices,
            **{k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "kv", "heads")},
            "vocab": args.vocab,
        },
        "ta16": {
            **common,
            "side": "isofast",
            "method": "task_arithmetic",
            "max_rank": args.rank,
            "out": str(outs / "ta"),
        },
    }
    labels = {
        "peft": f"PEFT add_weighted_adapter svd, rank {args.rank}"
        + (" (full_matrices)" if args.peft_full_matrices else ""),
        "ta16": f"isofast task_arithmetic, max_rank {args.rank}",
    }
    for method in [m for m in args.methods.split(",") if m]:
        specs[method] = {
            **common,
            "side": "isofast",
            "method": method,
            "max_rank": None,
            "out": str(outs / method),
        }
        labels[method] = f"isofast {method} (exact rank)"

    env = dict(os.environ)
    unset = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if env.pop(v, None) is not None]

    def side(name: str):
        def go(index: int) -> dict:
            print(f"  round {index + 1}: {name} ...", file=sys.stderr, flush=True)
            r = run_side(specs[name], env)
            print(
                f"    merge {r['merge_s']:.2f} s, wall {r['wall_s']:.1f} s, "
                f"peak RSS {r['max_rss'] / harness.MiB:,.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
            return r

        return go

    def save_partial(index: int, _: dict) -> None:
        if args.out:  # a crash later keeps the rounds done
            done = {name: rs[: index + 1] for name, rs in runs_so_far.items()}
            Path(args.out).write_text(json.dumps({"partial": True, "runs": done}, indent=1))

    runs_so_far: dict[str, list[dict]] = {name: [] for name in specs}

    def keep(name: str):
        def go(index: int) -> dict:
            r = side(name)(index)
            runs_so_far[name].append(r)
            return r

        return go

    runs = harness.alternate(
        args.rounds, {name: keep(name) for name in specs}, after_round=save_partial
    )
    print("  comparing results ...", file=sys.stderr, flush=True)
    rows = compare(adapters, outs / "peft", outs / "ta", args.rank)
    worst = max(r["peft_vs_isofast"] for r in rows)
    diff = f"max {worst:.1e} (relative, per module)"
    load1 = os.getloadavg()

    shapes = sorted({tuple(s) for s in module_shapes(args).values()})
    print(f"Command: `{harness.command_line()}`\n")
    print(
        f"Machine: {harness.machine_summary(load0, load1)}; OPENBLAS_CORETYPE / "
        f"OPENBLAS_L2_SIZE: {'unset for the children: ' + ', '.join(unset) if unset else 'not set'}"
        f"; torch threads {runs['peft'][0]['torch_threads']}; total "
        f"{time.perf_counter() - t_start:.0f} s.\n"
    )
    print(
        f"Workload: T = {args.tasks} adapters, r = {args.rank}, {args.layers} layers x 7 "
        f"modules, shapes {', '.join(f'{a}x{b}' for a, b in shapes)} (out x in), float32 "
        f"factors; {args.rounds} rounds, alternating, median [min-max].\n"
    )
    print(report(runs, labels, diff))
    print()
    header = [
        "module",
        "PEFT vs isofast",
        "PEFT vs exact sum",
        "isofast vs exact sum",
        "optimal rank-r error",
        "s_r / s_r+1",
    ]
    print(
        harness.markdown_table(
            header,
            (
                [
                    r["module"],
                    f"{r['peft_vs_isofast']:.1e}",
                    f"{r['peft_vs_exact']:.6f}",
                    f"{r['isofast_vs_exact']:.6f}",
                    f"{r['optimal']:.6f}",
                    f"{r['gap']:.3f}",
                ]
                for r in rows
            ),
            right=range(1, 6),
        )
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": harness.command_line(),
                    "load": [load0, load1],
                    "labels": labels,
                    "runs": runs,
                    "compare": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
