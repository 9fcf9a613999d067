"""`MergeRequest`: everything one merge needs, its defaults, its validation, and its config form.

Every way into a merge (`isofast.merge`, `isofast plan`, `isofast merge` with flags or a
YAML config, the config written beside a merged model) builds one of these. `SETTINGS` is the
only list of the settings: the config keys, the command-line flags and the written config all
come from it. A request is checked and normalised when it is made, before any file is opened.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isofast import slices
from isofast.errors import MergeInputError, short
from isofast.hub import local_model
from isofast.io.dtypes import COMPUTE_DTYPES, parse_float_dtype
from isofast.methods import Params, get_method
from isofast.param_schedule import with_model_parameters

# A model is a checkpoint path (folder or file) or, in memory, a mapping of names to tensors.
ModelSource = str | Mapping[str, Any]

DEFAULT_SHARD_BYTES = 5 * 2**30


@dataclass(frozen=True)
class Setting:
    """One setting of a merge: its request field, YAML key, command-line flag and help."""

    field: str
    key: str
    flag: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("base", "base_model", "--base", "base (pre-trained) model: folder or file"),
    Setting("models", "models", "--model", "fine-tuned model: folder or file (repeat the flag)"),
    Setting(
        "adapters",
        "adapters",
        "--adapter",
        "PEFT LoRA adapter folder, merged instead of fine-tuned models (repeat the flag)",
    ),
    Setting(
        "output",
        "output",
        "--output",
        "adapter merges: write an 'adapter' (default) or a full 'model' (needs the base)",
    ),
    Setting(
        "max_rank", "max_rank", "--max-rank", "adapter output: truncate each module to this rank"
    ),
    Setting("method", "method", "--method", "merge method (see `isofast methods`)"),
    Setting("alpha", "alpha", "--alpha", "scale of the merged update: theta0 + alpha * M"),
    Setting("params", "parameters", "--param", "method parameter NAME=VALUE (repeat the flag)"),
    Setting("compute_dtype", "dtype", "--dtype", "compute dtype: float32 or float64"),
    Setting("out_dtype", "out_dtype", "--out-dtype", "output dtype (default: each tensor's own)"),
    Setting(
        "exclude", "exclude", "--exclude", "name substring kept out of matrix methods (repeat)"
    ),
    Setting("seed", "seed", "--seed", "seed of the random methods (DARE)"),
    Setting(
        "slices",
        "slices",
        "--slices",
        "passthrough: stack layer ranges MODEL:FIRST:END,... (with --base and each --model)",
    ),
    Setting("threads", "threads", "--threads", "compute threads (default: every core)"),
    Setting("max_shard_bytes", "out_shard_size", "--out-shard-size", "largest output shard (5GiB)"),
    Setting(
        "allow_pickle",
        "allow_pickle",
        "--allow-pickle",
        "read torch files that need full unpickling (runs their code: trust them!)",
    ),
    Setting(
        "device",
        "device",
        "--device",
        "cpu, or cuda / cuda:N: Iso-C's matrices on the GPU (CUDA build + PyTorch)",
    ),
    Setting(
        "executor",
        "executor",
        "--executor",
        "local (this process), or ray: output shards written by Ray tasks (pip install "
        "'isofast[ray]')",
    ),
    Setting(
        "ray_address",
        "ray_address",
        "--ray-address",
        "Ray cluster: auto (the one on this machine or in RAY_ADDRESS), local (a new one "
        "here) or HOST:PORT; default: Ray's own choice (auto, else a new local one)",
    ),
)
# How a merge is run, not what it gives: left out of the written config (the output is the
# same bytes either way; an address means nothing on another cluster).
RUN_ONLY_KEYS = ("executor", "ray_address")
EXECUTORS = ("local", "ray")
CONFIG_KEYS: dict[str, str] = {s.key: s.field for s in SETTINGS}


@dataclass(frozen=True)
class MergeRequest:
    """One merge: theta = theta0 + alpha * M(theta_1 - theta0, ..., theta_T - theta0).

    Made from keyword arguments, a config or flags; normalised on creation:
    paths become absolute, a single `exclude` string becomes a one-element tuple, dtypes take
    their canonical names, and the method's parameters are checked.

    A merge of LoRA adapters (isofast.adapters) gives `adapters` instead of `models`; its
    `base` may then be an empty mapping (no base model: `has_base` is False), `output` says
    whether it writes an adapter or a model, and `max_rank` caps an adapter's ranks.
    """

    base: ModelSource
    models: tuple[ModelSource, ...]
    method: str = "iso_cts"
    alpha: float = 1.0
    params: Mapping[str, Any] = field(default_factory=dict)
    compute_dtype: str = "float32"
    out_dtype: str | None = None
    exclude: tuple[str, ...] = ("text_projection",)
    seed: int = 0
    threads: int | None = None
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    allow_pickle: bool = False
    device: str = "cpu"
    adapters: tuple[ModelSource, ...] = ()
    output: str | None = None  # "adapter" or "model"; default: adapter for adapter merges
    max_rank: int | None = None
    # Layer slices (isofast.slices): the output stacks these layer ranges; each is a
    # (model path, first, end) source. `models` are then the slices' models.
    slices: tuple[Any, ...] = ()
    executor: str = "local"  # "ray": isofast.ray_executor
    ray_address: str | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("base", _source(self.base, "base model"))
        models = [self.models] if isinstance(self.models, (str, os.PathLike)) else self.models
        put("models", tuple(_source(m, "fine-tuned model") for m in models))
        single = isinstance(self.adapters, (str, os.PathLike))
        adapters = [self.adapters] if single else self.adapters or ()
        put("adapters", tuple(_source(a, "adapter") for a in adapters))
        if self.models and self.adapters:
            raise MergeInputError("give fine-tuned models or LoRA adapters to merge, not both")
        if not self.models and not self.adapters:
            raise MergeInputError("no fine-tuned models given (T = 0): need at least one")
        self._check_output()
        for name in ("method", "compute_dtype", "device"):
            if not isinstance(getattr(self, name), str):
                raise MergeInputError(f"{name} must be a name, got {short(getattr(self, name))}")
        spec = get_method(self.method)
        put("method", spec.name)
        put("alpha", _finite(self.alpha, "alpha"))
        if not isinstance(self.params or {}, Mapping) or not all(
            isinstance(k, str) for k in (self.params or {})
        ):
            raise MergeInputError(
                f"parameters must be a mapping of names to values, got {short(self.params)}"
            )
        put("params", dict(self.params or {}))
        params = spec.make_params(self.params)  # raises on an unknown name or a bad value
        params.check_tasks(len(self.models or self.adapters))
        if self.adapters and params.per_tensor:
            raise MergeInputError("adapter merges take one value per parameter (no gradients)")
        if str(self.compute_dtype) not in COMPUTE_DTYPES:
            raise MergeInputError(
                f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                f"got {short(self.compute_dtype)}"
            )
        if self.out_dtype is not None:
            put("out_dtype", _float_dtype(self.out_dtype, "out_dtype"))
        put("exclude", _strings(self.exclude, "exclude"))
        put("seed", _integer(self.seed, "seed") % 2**64)
        if self.threads is not None and _integer(self.threads, "threads") < 1:
            raise MergeInputError(f"threads must be at least 1, got {short(self.threads)}")
        put("max_shard_bytes", parse_size(self.max_shard_bytes))
        if not isinstance(self.allow_pickle, bool):
            raise MergeInputError(
                f"allow_pickle must be true or false, got {short(self.allow_pickle)}"
            )
        put("device", parse_device(self.device))
        self._check_executor()
        if self.slices:
            self._check_slices()

    def _check_slices(self) -> None:
        found = slices.parse(self.slices, "slices", lambda m, w: model_path(m, w, Path.cwd()))
        object.__setattr__(self, "slices", found)
        if self.adapters or not self.has_base or not isinstance(self.base, str):
            raise MergeInputError("slices take models on disk and a base model, not adapters")
        if self.method != slices.METHOD or self.params:
            raise MergeInputError(
                f"slices are copied (passthrough): method must be {slices.METHOD}, "
                f"without parameters"
            )
        if list(self.models) != slices.models_of(found):
            raise MergeInputError("models must be the slices' models, in order of appearance")

    def _check_executor(self) -> None:
        if self.executor not in EXECUTORS:
            raise MergeInputError(
                f"executor must be one of {', '.join(EXECUTORS)}, got {short(self.executor)}"
            )
        if self.ray_address is not None:
            if not isinstance(self.ray_address, str) or not self.ray_address.strip():
                raise MergeInputError(
                    f"ray_address must be 'auto' or HOST:PORT, got {short(self.ray_address)}"
                )
            if self.executor != "ray":
                raise MergeInputError("ray_address is for executor: ray")
        if self.executor == "ray" and (self.adapters or not self.on_disk):
            raise MergeInputError(
                "executor: ray merges checkpoints on disk (its workers read them): give paths, "
                "not models in memory, and fine-tuned models, not adapters"
            )

    def _check_output(self) -> None:
        output = self.output if self.output is not None else "adapter" if self.adapters else "model"
        if output not in ("adapter", "model"):
            raise MergeInputError(f"output must be 'adapter' or 'model', got {short(output)}")
        if output == "adapter" and not self.adapters:
            raise MergeInputError("output: adapter needs LoRA adapters to merge (adapters: [...])")
        if output == "model" and not self.has_base:
            raise MergeInputError("output: model needs the base model (base_model) to add to")
        object.__setattr__(self, "output", output)
        if self.max_rank is not None:
            if _integer(self.max_rank, "max_rank") < 1:
                raise MergeInputError(f"max_rank must be at least 1, got {short(self.max_rank)}")
            if output != "adapter":
                raise MergeInputError("max_rank applies to output: adapter only")

    @property
    def has_base(self) -> bool:
        """False only for an adapter merge without a base model (an empty mapping)."""
        return not (self.adapters and isinstance(self.base, Mapping) and not self.base)

    @property
    def method_params(self) -> Params:
        """The method's typed parameters (defaults filled in)."""
        return get_method(self.method).make_params(self.params)

    @property
    def on_disk(self) -> bool:
        """Whether every model is a path (so the request can be written as a config)."""
        bases = (self.base,) if self.has_base else ()
        return all(isinstance(m, str) for m in (*bases, *self.models, *self.adapters))

    def replace(self, **changes: Any) -> MergeRequest:
        return dataclasses.replace(self, **changes)

    def to_config(self) -> dict[str, Any]:
        """The YAML config that reproduces this merge, every setting spelled out (paths are
        absolute, so the config means the same from any working directory)."""
        if not self.on_disk:
            raise MergeInputError("a merge of in-memory models cannot be written as a config")
        values = {s.key: getattr(self, s.field) for s in SETTINGS if s.key not in RUN_ONLY_KEYS}
        values["models"] = list(self.models)
        values["adapters"] = list(self.adapters)
        values["base_model"] = self.base if self.has_base else None
        values["parameters"] = dataclasses.asdict(self.method_params)  # defaults spelled out
        values["exclude"] = list(self.exclude)
        values["slices"] = slices.to_config(self.slices)
        return values

    @classmethod
    def make(cls, fields: Mapping[str, Any], where: str) -> MergeRequest:
        """A request from field values read from `where` (a config, flags): errors name it."""
        try:
            return cls(**fields)
        except MergeInputError as exc:
            raise MergeInputError(f"{where}: {exc}") from None


def config_fields(data: Mapping[str, Any], where: str, root: Path) -> dict[str, Any]:
    """The request fields an isofast YAML config sets; relative paths are relative to `root`
    (the config file's folder). `where` names the config in errors."""
    unknown = sorted(str(k) for k in set(data) - {*CONFIG_KEYS, "slices"})
    if unknown:
        raise MergeInputError(
            f"{where}: unknown config key(s) {unknown}; known: {sorted(CONFIG_KEYS)}"
        )
    adapters = data.get("adapters") or []
    if not isinstance(adapters, list):
        raise MergeInputError(f"{where}: 'adapters' must be a list of adapter folders")
    # An adapter merge needs neither models nor (for output: adapter) a base model.
    for key in ("base_model", "models") if not adapters else ():
        if key not in data:
            raise MergeInputError(f"{where}: missing required key '{key}'")
    models = data.get("models") or []
    if not isinstance(models, list) or not (models or adapters):
        raise MergeInputError(f"{where}: 'models' must be a non-empty list")
    fields = {
        CONFIG_KEYS[k]: v
        for k, v in data.items()
        if (v is not None or k == "out_dtype") and k != "slices"
    }
    base = data.get("base_model")
    no_base = adapters and base is None
    fields["base"] = {} if no_base else model_path(base, f"{where}: base_model", root)
    fields["models"] = tuple(model_path(m, f"{where}: models", root) for m in models)
    own = [m.get("parameters") or {} if isinstance(m, Mapping) else {} for m in models]
    if any(own):  # per-model parameters: {model: path, parameters: {weight: 0.5}}
        if not all(isinstance(o, Mapping) for o in own):
            raise MergeInputError(f"{where}: a model's 'parameters' must be a mapping")
        shared = fields.get("params") or {}
        if not isinstance(shared, Mapping):
            raise MergeInputError(f"{where}: 'parameters' must be a mapping")
        fields["params"] = with_model_parameters(shared, own)
    fields["adapters"] = tuple(model_path(a, f"{where}: adapters", root) for a in adapters)
    if data.get("slices"):  # written configs spell out `slices: []`
        take = lambda m, w: model_path(m, w, root)  # noqa: E731
        fields["slices"] = slices.parse(data["slices"], f"{where}: slices", take)
    return fields


def model_path(entry: Any, where: str, root: Path) -> str:
    """A model entry of a config (`path` or `{model: path}`) as an absolute path; a Hugging
    Face name (`org/name[@rev]`) that is not a local path is looked up in the hub cache."""
    if isinstance(entry, Mapping) and isinstance(entry.get("model"), str):
        entry = entry["model"]
    if not isinstance(entry, str):
        raise MergeInputError(
            f"{where}: each model must be a path or {{model: path}}, got {short(entry)}"
        )
    try:
        return local_model(entry, root)  # a path, or a Hugging Face name (org/name[@rev])
    except MergeInputError as exc:
        raise MergeInputError(f"{where}: {exc}") from None


def _source(value: Any, what: str) -> ModelSource:
    if isinstance(value, (str, os.PathLike)):
        return local_model(os.fspath(value), Path.cwd(), strict=False)
    if isinstance(value, Mapping):
        return value
    raise MergeInputError(
        f"{what} must be a checkpoint path or a mapping of names to tensors, "
        f"got {type(value).__name__}"
    )


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise MergeInputError(f"{what} must be a number, got {short(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MergeInputError(f"{what} must be a number, got {short(value)}") from None
    if not math.isfinite(number):
        raise MergeInputError(f"{what} must be finite, got {value!r}")
    return number


def _integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MergeInputError(f"{what} must be a whole number, got {short(value)}")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    """A string is one pattern (not a sequence of one-letter patterns)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(v, str) for v in items):
        raise MergeInputError(f"{what} must be a string or a list of strings, got {short(value)}")
    return tuple(items)


def _float_dtype(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise MergeInputError(f"{what} must be a dtype name, got {short(value)}")
    try:
        return parse_float_dtype(value, what)
    except ValueError as exc:
        raise MergeInputError(str(exc)) from None


def parse_device(device: Any) -> str:
    """'cpu', 'cuda' / 'gpu' (-> 'cuda:0'), or 'cuda:N'."""
    name = str(device).strip().lower()
    if name in ("cuda", "gpu"):
        return "cuda:0"
    if name == "cpu" or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise MergeInputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {short(device)}")


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(value: Any) -> int:
    """'5GB', '500MiB', 1000000 -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    found = _SIZE.match(str(value)) if isinstance(value, (str, int, float)) else None
    try:
        unit = _UNITS[((found.group(2) or "") if found else "").lower().removesuffix("b")]
        size = int(float(found.group(1)) * unit) if found else 0
    except (ValueError, OverflowError):  # "1.2.3", ".", or beyond any float
        size = 0
    if size <= 0:
        raise MergeInputError(f"cannot read size {short(value)} (examples: 5GB, 500MiB, 1000000)")
    return size
