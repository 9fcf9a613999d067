"""The adapters of one merge and the base they were trained on, opened once and checked
against each other from config files and headers alone.

Each adapted module becomes a `Module`: its base tensor name, its shape in the base weight's
orientation, and the adapters that touch it. An adapter that does not touch a module has a
zero update there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from isofast import arrays
from isofast.adapters.peft_format import Adapter, LoraModule, open_adapter
from isofast.errors import MergeInputError
from isofast.io import CheckpointError, CheckpointReader
from isofast.io.dtypes import FLOAT_DTYPES, name_of
from isofast.request import MergeRequest

# (left, right) with left @ right the update of one task, in the base weight's orientation.
FactorPair = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Part:
    """One adapter's update of one module."""

    task: int  # position of the adapter in the request (0-based)
    adapter: Adapter
    lora: LoraModule


@dataclass(frozen=True)
class Module:
    """One adapted module: W (rows x cols) <- W + alpha * M."""

    name: str  # path in the base model
    weight: str  # the base tensor it updates
    shape: tuple[int, int]  # of the base weight: (out, in), or (in, out) with fan_in_fan_out
    transposed: bool  # fan_in_fan_out: the weight is stored (in, out)
    parts: tuple[Part, ...]

    @property
    def ranks(self) -> dict[int, int]:
        return {p.task: p.lora.rank for p in self.parts}

    def factors(self) -> dict[int, FactorPair]:
        """Each touching adapter's scaled factors, in the weight's orientation (reads data)."""
        out = {}
        for p in self.parts:
            b, a = p.adapter.factors(self.name)
            s = p.lora.scale
            out[p.task] = (a.T, s * b.T) if self.transposed else (s * b, a)
        return out

    def dense_updates(self, tasks: int, dtype: Any) -> list[np.ndarray]:
        """D_1 .. D_T of this module in `dtype`, zeros where an adapter does not touch it
        (reads data; one module at a time keeps memory bounded)."""
        factors = self.factors()
        out = []
        for t in range(tasks):
            if t in factors:
                left, right = factors[t]
                out.append(left.astype(dtype) @ right.astype(dtype))
            else:
                out.append(np.zeros(self.shape, dtype))
        return out


class BaseWeights:
    """The base model's tensors: a checkpoint on disk (headers now, data on demand) or a
    state dict in memory."""

    def __init__(self, source: str | Mapping[str, Any], allow_pickle: bool) -> None:
        self.path: Path | None = None
        self._reader: CheckpointReader | None = None
        self._tensors: Mapping[str, Any] = {}
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        if isinstance(source, str):
            self.path = Path(source)
            if not self.path.exists():
                raise MergeInputError(f"base model: path does not exist: {source}")
            try:
                self._reader = CheckpointReader(source, allow_pickle=allow_pickle)
            except (CheckpointError, OSError) as exc:
                raise MergeInputError(f"base model {source}: {exc}") from None
            infos = self._reader.infos().items()
            self.meta = {n: (tuple(i.shape), name_of(i.dtype)) for n, i in infos}
        else:
            self._tensors = source
            for name, x in source.items():
                try:
                    self.meta[name] = (arrays.shape_of(x), arrays.dtype_name(x))
                except (TypeError, AttributeError):
                    raise MergeInputError(
                        f"tensor '{name}' of the base model is not a torch tensor or numpy array"
                    ) from None

    @property
    def label(self) -> str:
        return f"base model {self.path}" if self.path is not None else "base model (in memory)"

    @property
    def side_file_folder(self) -> Path | None:
        if self.path is None:
            return None
        return self.path if self.path.is_dir() else self.path.parent

    def where(self, name: str) -> str:
        if self._reader is None or name not in self.meta:
            return self.label
        return f"{self.label}, file {self._reader.info(name).file}"

    def view(self, name: str) -> Any:
        """A tensor as stored: a numpy view (bf16 as arrays.Bf16Array) or the caller's own."""
        if self._reader is None:
            return self._tensors[name]
        raw = self._reader.get(name)
        return arrays.Bf16Array(raw) if self.meta[name][1] == "bfloat16" else raw

    def nbytes(self, name: str) -> int:
        shape, dtype = self.meta[name]
        return arrays.nbytes(shape, dtype)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


class AdapterSet:
    """The adapters of a request (and its base, if any), opened and checked. Use as a context
    manager: adapter and base files stay open until the merge is done."""

    def __init__(self, request: MergeRequest) -> None:
        self.adapters: list[Adapter] = []
        self.base: BaseWeights | None = None
        try:
            for i, source in enumerate(request.adapters):
                self.adapters.append(open_adapter(source, f"adapter {i}", request.allow_pickle))
            if request.has_base:
                self.base = BaseWeights(request.base, request.allow_pickle)
            self.modules = self._modules()
        except BaseException:
            self.close()
            raise

    @property
    def tasks(self) -> int:
        return len(self.adapters)

    @property
    def base_model_name(self) -> str | None:
        """The base_model_name_or_path the adapters share (None if none says)."""
        return next((a.base_model for a in self.adapters if a.base_model), None)

    @property
    def fan_in_fan_out(self) -> bool:
        return self.adapters[0].fan_in_fan_out

    @property
    def task_type(self) -> str | None:
        types = {a.config.get("task_type") for a in self.adapters}
        return types.pop() if len(types) == 1 else None

    def _modules(self) -> list[Module]:
        names = {a.base_model for a in self.adapters if a.base_model}
        if len({_normalised(n) for n in names}) > 1:
            said = "; ".join(f"{a.label}: {a.base_model}" for a in self.adapters if a.base_model)
            raise MergeInputError(
                f"the adapters were trained on different base models "
                f"(base_model_name_or_path): {said}"
            )
        flags = {a.fan_in_fan_out for a in self.adapters}
        if len(flags) > 1:
            said = ", ".join(f"{a.label}: {a.fan_in_fan_out}" for a in self.adapters)
            raise MergeInputError(f"the adapters disagree on fan_in_fan_out ({said})")
        parts: dict[str, list[Part]] = {}
        for task, adapter in enumerate(self.adapters):
            for name, lora in adapter.modules.items():
                parts.setdefault(name, []).append(Part(task, adapter, lora))
        modules = []
        for name in sorted(parts, key=_natural):
            first = parts[name][0]
            for p in parts[name][1:]:
                got, want = (
                    (p.lora.out_features, p.lora.in_features),
                    (
                        first.lora.out_features,
                        first.lora.in_features,
                    ),
                )
                if got != want:
                    raise MergeInputError(
                        f"{p.adapter.where(name)}: update of shape {got} (out, in), but "
                        f"{first.adapter.label} has {want}: not the same base model"
                    )
            out_f, in_f = first.lora.out_features, first.lora.in_features
            shape = (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)
            module = Module(name, f"{name}.weight", shape, self.fan_in_fan_out, tuple(parts[name]))
            self._check_base(module)
            modules.append(module)
        return modules

    def _check_base(self, module: Module) -> None:
        if self.base is None:
            return
        where = f"{module.parts[0].adapter.where(module.name)}"
        meta = self.base.meta.get(module.weight)
        if meta is None:
            raise MergeInputError(
                f"{where}: the {self.base.label} has no tensor '{module.weight}' to update"
            )
        shape, dtype = meta
        if dtype not in FLOAT_DTYPES:
            raise MergeInputError(f"{where}: base tensor '{module.weight}' is {dtype}")
        if shape != module.shape:
            orient = " (fan_in_fan_out: (in, out))" if module.transposed else ""
            raise MergeInputError(
                f"{where}: the update has shape {module.shape}{orient} but base tensor "
                f"'{module.weight}' ({self.base.where(module.weight)}) has {shape}"
            )

    def close(self) -> None:
        for adapter in self.adapters:
            adapter.close()
        if self.base is not None:
            self.base.close()

    def __enter__(self) -> AdapterSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _normalised(name: str) -> str:
    """Local paths compare by their resolved form; hub ids as given."""
    return os.path.realpath(name) if os.path.exists(name) else name.rstrip("/")


def _natural(name: str) -> tuple[Any, ...]:
    """layers.2 before layers.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
