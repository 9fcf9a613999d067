"""The models of a merge, opened once: checkpoints on disk (headers read at open, data read
lazily) and state dicts in memory behind one interface, checked against each other."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isofast import arrays, slices
from isofast.errors import LinAlgError, MergeInputError
from isofast.hub import why_missing
from isofast.io import CheckpointReader
from isofast.io.dtypes import name_of
from isofast.request import MergeRequest, ModelSource

log = logging.getLogger(__name__)

# How the core names what an error is about: "tensor 'x' of fine-tuned model 1".
_CORE_SUBJECT = re.compile(
    r"tensor '(?P<name>.+?)' of (?:the base model|fine-tuned model (?P<task>\d+))"
)

# What the compiled core takes for one item: (name, base, fine-tunes, output, matrix?).
CoreItem = tuple[str, Any, list[Any], Any, bool]


@dataclass(frozen=True)
class TensorMeta:
    """One tensor as a header (or an in-memory array) describes it."""

    shape: tuple[int, ...]
    dtype: str  # isofast's name: float32, bfloat16, int64, ...
    nbytes: int


class _Checkpoint:
    """A checkpoint on disk: a folder or file, any layout the reader knows."""

    def __init__(self, path: str, label: str, allow_pickle: bool) -> None:
        if not Path(path).exists():
            hub = why_missing(path)  # also not a Hugging Face name in the cache
            raise MergeInputError(
                f"{label}: path does not exist: {path}" + (f"; {hub}" if hub else "")
            )
        self.label = label
        self.path: Path | None = Path(path)
        self.reader = CheckpointReader(path, allow_pickle=allow_pickle)
        self.meta = {
            name: TensorMeta(tuple(info.shape), name_of(info.dtype), info.nbytes)
            for name, info in self.reader.infos().items()
        }
        self.from_files = all(f.suffix == ".safetensors" for f in self.reader.files)

    def where(self, name: str) -> str:
        """The model's path and the file holding tensor `name`, for error messages."""
        file = self.reader.info(name).file if name in self.meta else None
        return f"{self.path}" + (f", file {file}" if file is not None and file != self.path else "")

    def view(self, name: str) -> Any:
        array = self.reader.get(name)
        return arrays.Bf16Array(array) if self.meta[name].dtype == "bfloat16" else array

    def core_input(self, name: str) -> Any:
        """For safetensors, the open file itself: the core reads it in cache-sized chunks
        with pread, which costs about what `cat` does (touching a mapping of it cost page
        faults and as much again); else the mapped array."""
        source = self.reader.source(name)
        if source is None:
            return arrays.core_arg(self.view(name))
        fd, offset = source
        meta = self.meta[name]
        return ("file", fd, offset, meta.dtype, meta.shape)

    def prefetch(self, name: str) -> None:
        self.reader.prefetch([name])

    def release(self, name: str) -> None:
        self.reader.release([name])

    def close(self) -> None:
        self.reader.close()


class _InMemory:
    """A state dict in memory: torch tensors or numpy arrays."""

    def __init__(self, tensors: Mapping[str, Any], label: str) -> None:
        self.label = label
        self.path: Path | None = None
        self.tensors = tensors
        self.from_files = False
        self.meta = {}
        self.device = "cpu"  # where the arrays live: one device for all of them
        for i, (name, x) in enumerate(tensors.items()):
            try:
                dtype = arrays.dtype_name(x)
            except TypeError as exc:
                raise MergeInputError(f"tensor '{name}' of {label}: {exc}") from None
            shape = arrays.shape_of(x)
            self.meta[name] = TensorMeta(shape, dtype, arrays.nbytes(shape, dtype))
            device = arrays.device_of(x)
            if i == 0:
                self.device = device
            elif device != self.device:
                raise MergeInputError(
                    f"tensor '{name}' of {label} is on {device}, its other tensors on "
                    f"{self.device}: move the state dict to one device"
                )

    def where(self, name: str) -> str:
        return ""  # in memory: the label says it all

    def view(self, name: str) -> Any:
        return self.tensors[name]

    def core_input(self, name: str) -> Any:
        try:
            return arrays.core_arg(self.tensors[name])
        except ValueError as exc:
            raise MergeInputError(f"tensor '{name}' of {self.label}: {exc}") from None

    def prefetch(self, name: str) -> None:
        pass

    def release(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Sliced:
    """Layer slices of several checkpoints seen as one model (isofast.slices): each output
    name reads its tensor from (model, input name); nothing is loaded until read."""

    def __init__(self, request: MergeRequest) -> None:
        assert isinstance(request.base, str)
        self.label = "sliced model"
        self.path: Path | None = Path(request.base)
        self.parts: dict[str, _Checkpoint] = {}
        try:
            for i, path in enumerate(
                dict.fromkeys([request.base, *slices.models_of(request.slices)])
            ):
                label = "base model" if i == 0 else "sliced model"
                self.parts[path] = _Checkpoint(path, f"{label} {path}", request.allow_pickle)
            names = {path: list(part.meta) for path, part in self.parts.items()}
            self.source = slices.layout(request.slices, request.base, names)
        except BaseException:
            self.close()
            raise
        self.meta = {out: self.parts[p].meta[name] for out, (p, name) in self.source.items()}
        self.from_files = all(part.from_files for part in self.parts.values())
        self.layers = slices.layer_count(request.slices)

    def _part(self, name: str) -> tuple[_Checkpoint, str]:
        path, source = self.source[name]
        return self.parts[path], source

    def where(self, name: str) -> str:
        part, source = self._part(name)
        return part.where(source)

    def view(self, name: str) -> Any:
        part, source = self._part(name)
        return part.view(source)

    def core_input(self, name: str) -> Any:
        part, source = self._part(name)
        return part.core_input(source)

    def prefetch(self, name: str) -> None:
        part, source = self._part(name)
        part.prefetch(source)

    def release(self, name: str) -> None:
        part, source = self._part(name)
        part.release(source)

    def close(self) -> None:
        for part in self.parts.values():
            part.close()


Model = _Checkpoint | _InMemory | _Sliced


def _file_ids(model: _Checkpoint) -> list[tuple[str, int, int]]:
    return [(str(f), st.st_size, st.st_mtime_ns) for f in model.reader.files for st in [f.stat()]]


def _open(source: ModelSource, label: str, allow_pickle: bool) -> Model:
    if isinstance(source, str):
        return _Checkpoint(source, f"{label} {source}", allow_pickle)
    return _InMemory(source, label)


class ModelSet:
    """The base model and the T fine-tunes of a request, opened and checked once.

    Every fine-tune must hold exactly the base's tensor names, shapes and dtypes. Use as a
    context manager (checkpoints hold open files)."""

    def __init__(self, request: MergeRequest) -> None:
        labels = ["base model"] + [
            f"fine-tuned model {i}" if not isinstance(m, str) else "model"
            for i, m in enumerate(request.models)
        ]
        self.models: list[Model] = []
        if request.slices:  # one stacked model, copied: no fine-tunes to check against it
            self.models.append(_Sliced(request))
        try:
            for source, label in zip((request.base, *request.models), labels, strict=True):
                if not request.slices:
                    self.models.append(_open(source, label, request.allow_pickle))
            self._check()
        except BaseException:
            self.close()
            raise
        base = self.models[0].meta
        self.names = list(base)
        self.meta = base
        self.nbytes = {n: sum(m.meta[n].nbytes for m in self.models) for n in self.names}
        log.debug(
            "opened %d models, %d tensors, %.1f MiB to read",
            len(self.models),
            len(self.names),
            sum(self.nbytes.values()) / 2**20,
        )

    @property
    def tasks(self) -> int:
        return len(self.models) - 1

    @property
    def base(self) -> Model:
        return self.models[0]

    @property
    def side_file_folder(self) -> Path | None:
        """Where config.json and tokenizer files come from: the base model's folder (None for
        a base in memory)."""
        path = self.models[0].path
        if path is None:
            return None
        return path if path.is_dir() else path.parent

    @property
    def memory_device(self) -> str:
        """Where the in-memory inputs live ('cpu' for checkpoints): merged tensors go there."""
        return getattr(self.models[0], "device", "cpu")

    @property
    def from_files(self) -> bool:
        """Every input is read from safetensors files by the core (never from anonymous
        memory), so pages of mapped inputs may be dropped once converted."""
        return all(m.from_files for m in self.models)

    def edited_side_files(self) -> dict[str, str]:
        """Side files that differ from the base's: config.json of a sliced model (its layer
        count); written before the base's are copied, so they win."""
        model = self.models[0]
        if not isinstance(model, _Sliced):
            return {}
        text = slices.config_json(self.side_file_folder, model.layers)
        return {"config.json": text} if text is not None else {}

    def _check(self) -> None:
        base = self.models[0].meta
        devices = {getattr(m, "device", "cpu") for m in self.models}
        if len(devices) > 1:
            raise MergeInputError(
                f"the models are on different devices ({', '.join(sorted(devices))}): "
                "move them to one device"
            )
        for model in self.models[1:]:
            missing = sorted(set(base) - set(model.meta))
            extra = sorted(set(model.meta) - set(base))
            for names, what in ((missing, "lacks tensor '{}' of the base model"),
                                (extra, "has tensor '{}' that the base model lacks")):  # fmt: skip
                if names:
                    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
                    raise MergeInputError(f"{model.label} {what.format(names[0])}{more}")
            for name, want in base.items():
                got = model.meta[name]
                for what, mine, theirs in (("shape", got.shape, want.shape),
                                           ("dtype", got.dtype, want.dtype)):  # fmt: skip
                    if mine != theirs:
                        raise MergeInputError(
                            f"tensor '{name}': {model.label} has {what} {mine}, "
                            f"the base model {theirs}"
                        )

    def input_files(self) -> list[tuple[str, int, int]] | None:
        """(path, size, mtime in ns) of every input file, base first; None if any model is in
        memory. Identifies the inputs of a merge to resume."""
        files = []
        for model in self.models:
            parts = model.parts.values() if isinstance(model, _Sliced) else [model]
            for part in parts:
                if not isinstance(part, _Checkpoint):
                    return None
                files.extend(_file_ids(part))
        return files

    def core_item(self, name: str, matrix: bool, out: Any) -> CoreItem:
        return (
            name,
            self.models[0].core_input(name),
            [m.core_input(name) for m in self.models[1:]],
            None if out is None else arrays.core_arg(out),
            matrix,
        )

    @contextlib.contextmanager
    def naming_files(self) -> Iterator[None]:
        """Core errors name a tensor and a model by its position ("fine-tuned model 1");
        complete them with the model's path and the file that holds the tensor."""
        try:
            yield
        except (MergeInputError, LinAlgError) as exc:
            found = _CORE_SUBJECT.search(str(exc))
            if found is None:
                raise
            index = 0 if found["task"] is None else int(found["task"]) + 1
            where = self.models[index].where(found["name"]) if index < len(self.models) else ""
            if not where:
                raise
            message = f"{str(exc)[: found.end()]} ({where}){str(exc)[found.end() :]}"
            raise type(exc)(message) from exc

    def views(self, name: str) -> list[Any]:
        """Tensor `name` of every model (base first), as arrays."""
        return [m.view(name) for m in self.models]

    def prefetch(self, name: str) -> None:
        for m in self.models:
            m.prefetch(name)

    def release(self, name: str) -> None:
        for m in self.models:
            m.release(name)

    def close(self) -> None:
        for m in self.models:
            m.close()

    def __enter__(self) -> ModelSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
