"""Merging PEFT LoRA adapters (isofast.adapters) on a tiny random Llama and GPT-2, offline.

* Every method's factored result equals isofast's dense merge of the same updates (the
  updates PEFT itself applies, from get_delta_weight), fp32, relative error <= 1e-4; Iso-CTS
  on a rank-deficient sum is checked against the float64 reference with the rank rule of
  docs/CONTRACT.md ("LoRA adapters").
* The adapter output loads with PeftModel and gives the model output's logits.
* Mixed ranks, rsLoRA, rank/alpha patterns, modules an adapter does not touch,
  fan_in_fan_out (GPT-2 Conv1D), max_rank truncation, `.bin` adapters, adapters in memory.
* Each refusal happens before any tensor data is read and names the file and the module.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from adapters_models import (
    adapter_update,
    load_model,
    logits,
    make_adapter,
    peft_deltas,
    quiet,
    save_base,
    tiny_gpt2,
    tiny_llama,
    with_adapter,
)

import isofast
from isofast import cli
from isofast.errors import MergeInputError
from isofast.io.reader import CheckpointReader

from conftest import F32_EPS, THREADS, fresh_seed
from reference import iso_cts as reference_iso_cts

METHODS = (
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
TOL = 1e-4


@dataclass
class Setup:
    base: Path  # the base model's folder
    model: torch.nn.Module  # the base model in memory
    adapters: list[Path]
    deltas: list[dict[str, np.ndarray]]  # per adapter: weight name -> D_t (PEFT's own)
    weights: list[str]  # every adapted weight, sorted
    seed: int  # of the adapters' factors

    def __str__(self) -> str:
        return f"seed={self.seed} (replay with ISOFAST_TEST_SEED={self.seed})"

    def dense_tasks(self) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        """A zero base and one model per adapter holding D_t (zero where not adapted)."""
        shapes = {n: d.shape for ds in self.deltas for n, d in ds.items()}
        zeros = {n: np.zeros(shapes[n], np.float32) for n in self.weights}
        tasks = [{n: ds.get(n, zeros[n]) for n in self.weights} for ds in self.deltas]
        return zeros, tasks


def _setup(root: Path, model: torch.nn.Module, configs: list[dict[str, Any]]) -> Setup:
    seed = fresh_seed()
    base = save_base(model, root / "base")
    adapters = [
        make_adapter(model, root / f"a{i}", (seed + i) % 2**63, **c) for i, c in enumerate(configs)
    ]
    deltas = [peft_deltas(model, a) for a in adapters]
    weights = sorted({n for ds in deltas for n in ds})
    return Setup(base, model, adapters, deltas, weights, seed)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """Three adapters, every scale a power of two: all 7 linear modules at rank 8; rsLoRA
    rank 16 on three of them; rank 4 with rank/alpha patterns on layer 1 only. q_proj of
    layer 1 sums to rank 32 = min(m, n) (full rank), everything else is rank-deficient."""
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    configs = [
        dict(r=8, lora_alpha=16, target_modules=every),
        dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            layers_to_transform=[1],
            rank_pattern={"q_proj": 8},
            alpha_pattern={"q_proj": 32, "model.layers.1.mlp.down_proj": 16},
        ),
    ]
    return _setup(tmp_path_factory.mktemp("llama"), tiny_llama(), configs)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """GPT-2's Conv1D layers store their weight (in, out): fan_in_fan_out adapters."""
    configs = [
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ]
    return _setup(tmp_path_factory.mktemp("gpt2"), tiny_gpt2(), configs)


def rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def module_of(weight: str) -> str:
    return weight.removesuffix(".weight")


def factored_updates(setup: Setup, method: str, transposed: bool = False, **kw: Any) -> Any:
    result = isofast.merge_adapters(setup.adapters, method, base=setup.base, threads=THREADS, **kw)
    assert result.config is not None
    return {
        w: adapter_update(result.tensors, result.config, module_of(w), transposed)
        for w in setup.weights
    }


def full_rank(d: np.ndarray) -> bool:
    s = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    return int(np.count_nonzero(s > 4 * F32_EPS * s[0])) == min(d.shape)  # float32 cut


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("method", METHODS)
def test_factored_merge_equals_the_dense_merge(llama: Setup, method: str) -> None:
    got = factored_updates(llama, method)
    zeros, tasks = llama.dense_tasks()
    dense = isofast.merge(zeros, tasks, method, threads=THREADS)
    checked_against_core = 0
    for w in llama.weights:
        want = dense[w]
        per_task = [t[w] for t in tasks]
        if method == "iso_cts":
            if full_rank(sum(per_task)):  # sizes from r = q: the core's rule too
                assert rel(got[w], want) <= TOL, (w, rel(got[w], want), str(llama))
                checked_against_core += 1
            want = reference_iso_cts(per_task, eps=F32_EPS, rank_aware=True)
        assert rel(got[w], want) <= TOL, (w, rel(got[w], want), str(llama))
    assert method != "iso_cts" or checked_against_core == 1  # q_proj of layer 1


def test_dense_iso_cts_follows_the_rank_rule(llama: Setup) -> None:
    zeros, tasks = llama.dense_tasks()
    w = "model.layers.0.self_attn.q_proj.weight"  # ranks 8 + 16: q = 24 < 32
    dense = isofast.merge({w: zeros[w]}, [{w: t[w]} for t in tasks], "iso_cts", threads=THREADS)
    want = reference_iso_cts([t[w] for t in tasks], eps=F32_EPS, rank_aware=True)
    assert rel(dense[w], want) <= TOL


def test_fan_in_fan_out_modules_merge_in_the_weights_orientation(gpt2: Setup) -> None:
    """Iso-CTS projects the left side only: the orientation is the base weight's (in, out)."""
    got = factored_updates(gpt2, "iso_cts", transposed=True)
    zeros, tasks = gpt2.dense_tasks()
    for w in gpt2.weights:
        assert zeros[w].shape == gpt2.model.state_dict()[w].shape
        want = reference_iso_cts([t[w] for t in tasks], eps=F32_EPS, rank_aware=True)
        assert rel(got[w], want) <= TOL, (w, str(gpt2))


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("method", ["iso_cts", "tsv_m", "ties", "task_arithmetic"])
def test_adapter_output_loads_in_peft_like_the_model_output(
    llama: Setup, tmp_path: Path, method: str
) -> None:
    kw: dict[str, Any] = dict(base=llama.base, threads=THREADS, alpha=0.7)
    isofast.merge_adapters(llama.adapters, method, out=tmp_path / "adapter", **kw)
    isofast.merge_adapters(llama.adapters, method, output="model", out=tmp_path / "model", **kw)
    for folder in ("adapter", "model"):
        files = {p.name for p in (tmp_path / folder).iterdir()}
        assert {"README.md", "isofast_config.yml"} <= files, files
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    merged = logits(load_model(tmp_path / "model"), tokens)
    peft = logits(with_adapter(llama.base, tmp_path / "adapter"), tokens)
    assert rel(peft, merged) <= TOL, str(llama)
    assert rel(merged, logits(llama.model, tokens)) > 1e-2  # the update is not negligible


def test_model_output_is_base_plus_alpha_times_the_update(llama: Setup) -> None:
    alpha = 0.7
    result = isofast.merge_adapters(
        llama.adapters, "iso_c", alpha, base=llama.base, output="model", threads=THREADS
    )
    update = factored_updates(llama, "iso_c")
    base = llama.model.state_dict()
    with CheckpointReader(llama.base / "model.safetensors") as reader:
        assert list(result.tensors) == reader.names()
    for name, x in result.tensors.items():
        want = base[name].numpy() + alpha * update[name] if name in update else base[name].numpy()
        assert rel(x.numpy(), want) <= TOL, name
        if name not in update:
            assert torch.equal(x, base[name]), name  # copied as it was


def test_max_rank_truncates_and_reports_each_modules_error(llama: Setup, tmp_path: Path) -> None:
    result = isofast.merge_adapters(
        llama.adapters, "task_arithmetic", base=llama.base, max_rank=6, threads=THREADS
    )
    assert result.config is not None
    for w in llama.weights:
        m = module_of(w)
        exact = sum(d[w].astype(np.float64) for d in llama.deltas if w in d)
        s = np.linalg.svd(exact, compute_uv=False)
        want = float(np.sqrt(np.sum(s[6:] ** 2) / np.sum(s**2)))
        got = adapter_update(result.tensors, result.config, m)
        assert result.ranks[m] == 6
        assert abs(result.truncation[m] - want) <= 1e-6
        assert abs(rel(got, exact) - want) <= 1e-5
    exact_rank = isofast.merge_adapters(llama.adapters, "task_arithmetic", threads=THREADS)
    q = "model.layers.1.self_attn.q_proj"
    assert exact_rank.ranks[q] == 32 and exact_rank.truncation[q] == 0.0  # concatenated
    isofast.merge_adapters(llama.adapters, "iso_c", max_rank=3, out=tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (
        config["r"] == 3 and "relative truncation error" in (tmp_path / "a/README.md").read_text()
    )
    with_adapter(llama.base, tmp_path / "a")  # PEFT loads it


def test_gpt2_adapter_and_model_outputs_agree(gpt2: Setup, tmp_path: Path) -> None:
    kw: dict[str, Any] = dict(base=gpt2.base, threads=THREADS)
    isofast.merge_adapters(gpt2.adapters, "iso_cts", out=tmp_path / "adapter", **kw)
    isofast.merge_adapters(gpt2.adapters, "iso_cts", output="model", out=tmp_path / "m", **kw)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    merged = logits(load_model(tmp_path / "m", gpt2=True), tokens)
    peft = logits(with_adapter(gpt2.base, tmp_path / "adapter", gpt2=True), tokens)
    assert rel(peft, merged) <= TOL


def test_adapters_in_memory_and_bin_files_merge_like_folders(llama: Setup, tmp_path: Path) -> None:
    want = factored_updates(llama, "iso_cts")
    binary = make_adapter(
        llama.model,
        tmp_path / "bin",
        llama.seed % 2**63,
        safetensors=False,
        **_config(llama.adapters[0]),
    )
    assert (binary / "adapter_model.bin").is_file()
    with quiet():
        in_memory = [with_adapter(llama.base, llama.adapters[1])]
    config = json.loads((llama.adapters[2] / "adapter_config.json").read_text())
    with CheckpointReader(llama.adapters[2] / "adapter_model.safetensors") as r:
        mapping = {"config": config, "weights": {n: torch.from_numpy(r.get(n).copy()) for n in r}}
    base = {k: v.clone() for k, v in llama.model.state_dict().items()}
    result = isofast.merge_adapters(
        [binary, *in_memory, mapping], "iso_cts", base=base, threads=THREADS
    )
    assert result.config is not None
    for w in llama.weights:
        got = adapter_update(result.tensors, result.config, module_of(w))
        assert rel(got, want[w]) <= 1e-6, w


def test_an_all_zero_update_is_written_as_a_zero_rank_one_module(
    llama: Setup, tmp_path: Path
) -> None:
    """PEFT initialises lora_B to zero: an untrained adapter merges to nothing."""
    zero = make_adapter(
        llama.model, tmp_path / "z", 5, zero_b=["proj"], r=4, target_modules=["q_proj"]
    )
    result = isofast.merge_adapters([zero], "iso_c", out=tmp_path / "out")
    assert set(result.ranks.values()) == {1} and set(result.truncation.values()) == {0.0}
    tokens = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(3))
    same = logits(with_adapter(llama.base, tmp_path / "out"), tokens)
    assert np.array_equal(same, logits(llama.model, tokens))


# ----------------------------------------------------------------------------- interface


def test_cli_merges_and_plans_a_config_and_its_written_config_reproduces_it(
    llama: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "lora.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": str(llama.base),
                "adapters": [str(a) for a in llama.adapters],
                "method": "iso_cts",
                "alpha": 1.0,
                "output": "adapter",
                "max_rank": 12,
                "threads": THREADS,
            }
        )
    )
    assert cli.main(["plan", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj" in printed and "factored" in printed
    assert cli.main(["merge", str(config), str(tmp_path / "out"), "-q"]) == 0
    written = tmp_path / "out" / "isofast_config.yml"
    assert yaml.safe_load(written.read_text())["max_rank"] == 12
    assert cli.main(["merge", str(written), str(tmp_path / "again"), "-q"]) == 0
    weights = "adapter_model.safetensors"
    assert (tmp_path / "out" / weights).read_bytes() == (tmp_path / "again" / weights).read_bytes()
    flags = ["--adapter", str(llama.adapters[0]), "--adapter", str(llama.adapters[1])]
    assert cli.main(["merge", str(tmp_path / "f"), *flags, "--method", "tsv_m", "-q"]) == 0
    with_adapter(llama.base, tmp_path / "f")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(output="model"), "needs the base model"),
        (dict(output="adapter", max_rank=0), "max_rank must be at least 1"),
        (dict(output="model", max_rank=4, base="x"), "output: adapter only"),
        (dict(output="both"), "output must be"),
        (dict(device="cuda"), "run on the CPU"),
    ],
)
def test_bad_adapter_settings_are_refused(
    llama: Setup, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(MergeInputError, match=message):
        isofast.merge_adapters(llama.adapters, "iso_c", **settings)
    with pytest.raises(MergeInputError, match="not both"):
        isofast.MergeRequest(str(llama.base), (str(llama.base),), adapters=(str(llama.base),))


# ----------------------------------------------------------------------------- refusals


def _config(folder: Path) -> dict[str, Any]:
    """The LoraConfig arguments an adapter folder was made with (for a copy)."""
    c = json.loads((folder / "adapter_config.json").read_text())
    keys = ("r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern")
    return {k: c[k] for k in keys} | {"layers_to_transform": c["layers_to_transform"]}


def _edited(folder: Path, tmp: Path, name: str, **changes: Any) -> Path:
    copy = tmp / name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "adapter_config.json").read_text()) | changes
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def _conv(folder: Path, tmp: Path) -> Path:
    from safetensors.torch import load_file, save_file

    copy = _edited(folder, tmp, "conv")
    tensors = load_file(copy / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key].reshape(*tensors[key].shape, 1, 1)
    save_file(tensors, copy / "adapter_model.safetensors")
    return copy


Refusal = Callable[[Setup, Path], list[Any]]
REFUSALS: dict[str, tuple[Refusal, str]] = {
    "dora": (
        lambda s, t: [
            make_adapter(s.model, t / "d", 0, r=4, target_modules=["q_proj"], use_dora=True)
        ],
        r"adapter_config.json: DoRA",
    ),
    "embedding": (
        lambda s, t: [make_adapter(s.model, t / "e", 0, r=4, target_modules=["embed_tokens"])],
        r"adapter_model.safetensors, module 'model.embed_tokens': embedding LoRA",
    ),
    "convolution": (
        lambda s, t: [_conv(s.adapters[0], t)],
        r"safetensors, module 'model.layers.0.self_attn.q_proj'.*not convolutions",
    ),
    "different bases": (
        lambda s, t: [
            _edited(s.adapters[0], t, "x", base_model_name_or_path="org/llama-a"),
            _edited(s.adapters[1], t, "y", base_model_name_or_path="org/llama-b"),
        ],
        r"different base models.*org/llama-a.*org/llama-b",
    ),
    "no config": (
        lambda s, t: [_deleted(s.adapters[0], t, "adapter_config.json")],
        r"adapter_config.json is missing",
    ),
    "no weights": (
        lambda s, t: [_deleted(s.adapters[0], t, "adapter_model.safetensors")],
        r"no weights: neither adapter_model.safetensors nor adapter_model.bin",
    ),
    "rank disagrees": (
        lambda s, t: [_edited(s.adapters[0], t, "r", r=6, lora_alpha=12)],
        r"safetensors, module 'model.layers.0.mlp.down_proj': the factors have rank 8 but",
    ),
    "modules_to_save": (
        lambda s, t: [_edited(s.adapters[0], t, "m", modules_to_save=["lm_head"])],
        r"modules_to_save",
    ),
    "trained bias": (lambda s, t: [_edited(s.adapters[0], t, "b", bias="all")], r"biases"),
    "not LoRA": (lambda s, t: [_edited(s.adapters[0], t, "i", peft_type="IA3")], r"only LoRA"),
}


def _deleted(folder: Path, tmp: Path, name: str) -> Path:
    copy = _edited(folder, tmp, f"without-{name}")
    (copy / name).unlink()
    return copy


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_file_and_module_before_reading_data(
    llama: Setup, tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, message = REFUSALS[case]
    adapters = make(llama, tmp_path)

    def no_data(self: Any, name: str) -> Any:
        raise AssertionError(f"tensor data read before the refusal: {name}")

    monkeypatch.setattr(CheckpointReader, "get", no_data)
    with pytest.raises(MergeInputError, match=message):
        isofast.plan_adapters(adapters, "iso_c", base=llama.base)
    with pytest.raises(MergeInputError, match=message):
        isofast.merge_adapters(adapters, "iso_c", base=llama.base, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_base_that_does_not_fit_is_refused(llama: Setup) -> None:
    base = {k: v.clone() for k, v in llama.model.state_dict().items()}
    q = "model.layers.0.self_attn.q_proj.weight"
    base[q] = torch.zeros(32, 16)
    with pytest.raises(
        MergeInputError, match=r"module 'model.layers.0.self_attn.q_proj'.*\(32, 16\)"
    ):
        isofast.plan_adapters(llama.adapters, base=base)
    del base[q]
    with pytest.raises(MergeInputError, match=f"has no tensor '{q}'"):
        isofast.plan_adapters(llama.adapters, base=base)
