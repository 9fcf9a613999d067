"""Method registry: each merging method's name, parameters (typed, validated) and core kernel."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from isofast.errors import MergeInputError, short

if TYPE_CHECKING:  # the registry never loads the compiled core (config.py imports it)
    from isofast._core import MergeOptions

Kind = Literal["elementwise", "matrix"]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise MergeInputError(message)


@dataclass(frozen=True, kw_only=True)
class Params:
    """Base of every method's parameters."""

    def configure(self, options: MergeOptions) -> None:
        """Set this method's fields of the compiled kernel's typed options."""


@dataclass(frozen=True, kw_only=True)
class NoParams(Params):
    pass


@dataclass(frozen=True, kw_only=True)
class TiesParams(Params):
    density: float = 0.2
    trim: Literal["global", "tensor"] = "global"
    merge: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        _check(0.0 <= self.density <= 1.0, f"density must be in [0, 1], got {short(self.density)}")
        _check(
            self.trim in ("global", "tensor"),
            f"trim must be 'global' or 'tensor', got {short(self.trim)}",
        )
        _check(
            self.merge in ("mean", "sum"), f"merge must be 'mean' or 'sum', got {short(self.merge)}"
        )

    def configure(self, options: MergeOptions) -> None:
        options.ties.density = self.density
        options.ties.trim_global = self.trim == "global"
        options.ties.sum = self.merge == "sum"


def _check_drop_rate(p: float) -> None:
    _check(0.0 <= p < 1.0, f"drop_rate must be in [0, 1), got {short(p)}")


@dataclass(frozen=True, kw_only=True)
class DareLinearParams(Params):
    drop_rate: float = 0.5

    def __post_init__(self) -> None:
        _check_drop_rate(self.drop_rate)

    def configure(self, options: MergeOptions) -> None:
        options.dare.drop_rate = self.drop_rate


@dataclass(frozen=True, kw_only=True)
class DareTiesParams(TiesParams):
    density: float = 1.0
    drop_rate: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_drop_rate(self.drop_rate)

    def configure(self, options: MergeOptions) -> None:
        super().configure(options)
        options.dare.drop_rate = self.drop_rate


@dataclass(frozen=True, kw_only=True)
class ConsensusParams(TiesParams):
    lam: float = 0.4
    min_agree: int = 2
    apply_to: Literal["ta", "ties"] = "ta"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            math.isfinite(self.lam) and self.lam >= 0, f"lam must be >= 0, got {short(self.lam)}"
        )
        _check(self.min_agree >= 0, f"min_agree must be >= 0, got {short(self.min_agree)}")
        _check(
            self.apply_to in ("ta", "ties"),
            f"apply_to must be 'ta' or 'ties', got {short(self.apply_to)}",
        )

    def configure(self, options: MergeOptions) -> None:
        super().configure(options)
        options.consensus.lam = self.lam
        options.consensus.min_agree = self.min_agree
        options.consensus.on_ties = self.apply_to == "ties"


@dataclass(frozen=True, kw_only=True)
class RankParams(Params):
    rank_tol: float | None = None

    def __post_init__(self) -> None:
        tol = self.rank_tol
        _check(
            tol is None or (math.isfinite(tol) and tol >= 0),
            f"rank_tol must be >= 0, got {short(tol)}",
        )

    def configure(self, options: MergeOptions) -> None:
        options.matrix.rank_tol = -1.0 if self.rank_tol is None else self.rank_tol


@dataclass(frozen=True, kw_only=True)
class IsoCtsParams(RankParams):
    common_space_fraction: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.common_space_fraction
        _check(0.0 <= f <= 1.0, f"common_space_fraction must be in [0, 1], got {short(f)}")

    def configure(self, options: MergeOptions) -> None:
        super().configure(options)
        options.matrix.common_space_fraction = self.common_space_fraction


@dataclass(frozen=True)
class MethodSpec:
    name: str
    pretty_name: str
    kernel: str
    kind: Kind
    params_type: type[Params]
    reference: str
    summary: str = ""
    aliases: tuple[str, ...] = field(default=())

    def parameters(self) -> dict[str, Any]:
        """Parameter names and their defaults."""
        return {f.name: f.default for f in dataclasses.fields(self.params_type)}

    def make_params(self, given: Mapping[str, Any]) -> Params:
        known = self.parameters()
        unknown = sorted(set(given) - set(known))
        if unknown:
            valid = ", ".join(known) or "none"
            raise MergeInputError(
                f"method '{self.name}' got unknown parameter(s) {unknown}; its parameters: {valid}"
            )
        try:
            return self.params_type(**given)
        except TypeError as exc:  # e.g. a wrong type that dataclass cannot take
            raise MergeInputError(f"method '{self.name}': {exc}") from exc

    def uses_global_ties(self, params: Params) -> bool:
        if isinstance(params, ConsensusParams):
            return params.apply_to == "ties" and params.trim == "global"
        return isinstance(params, TiesParams) and params.trim == "global"


_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "weight_average",
        "Weight averaging",
        "mean",
        "elementwise",
        NoParams,
        "https://arxiv.org/abs/2203.05482",
        "mean of the fine-tuned weights",
    ),
    MethodSpec(
        "task_arithmetic",
        "Task arithmetic",
        "sum",
        "elementwise",
        NoParams,
        "https://arxiv.org/abs/2212.04089",
        "base + alpha * sum of task vectors",
    ),
    MethodSpec(
        "ties",
        "TIES-merging",
        "ties",
        "elementwise",
        TiesParams,
        "https://arxiv.org/abs/2306.01708",
        "trim, elect sign, disjoint mean",
    ),
    MethodSpec(
        "dare_linear",
        "DARE + task arithmetic",
        "sum",
        "elementwise",
        DareLinearParams,
        "https://arxiv.org/abs/2311.03099",
        "seeded random drop and rescale, then sum",
    ),
    MethodSpec(
        "dare_ties",
        "DARE + TIES",
        "ties",
        "elementwise",
        DareTiesParams,
        "https://arxiv.org/abs/2311.03099",
        "seeded random drop and rescale, then TIES",
    ),
    MethodSpec(
        "consensus",
        "Consensus (TALL masks)",
        "consensus",
        "elementwise",
        ConsensusParams,
        "https://arxiv.org/abs/2405.07813",
        "keep entries that at least min_agree task masks select",
    ),
    MethodSpec(
        "tsv_m",
        "TSV-Merge",
        "tsv_m",
        "matrix",
        RankParams,
        "https://arxiv.org/abs/2412.00081",
        "per-task top singular vectors, orthogonalized",
    ),
    MethodSpec(
        "iso_c",
        "Iso-C",
        "iso_c",
        "matrix",
        RankParams,
        "https://arxiv.org/abs/2502.04959",
        "flattened spectrum of the task sum",
    ),
    MethodSpec(
        "iso_cts",
        "Iso-CTS",
        "iso_cts",
        "matrix",
        IsoCtsParams,
        "https://arxiv.org/abs/2502.04959",
        "isotropic common + task-specific subspaces",
    ),
)

METHODS: dict[str, MethodSpec] = {}
for _spec in _METHODS:
    for _name in (_spec.name, *_spec.aliases):
        if _name in METHODS:
            raise RuntimeError(f"duplicate merge method name {_name!r}")
        METHODS[_name] = _spec


def get_method(name: str) -> MethodSpec:
    """The spec of a method by name; unknown names list the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        valid = ", ".join(s.name for s in _METHODS)
        raise MergeInputError(f"unknown merge method {short(name)}; available: {valid}") from None


def methods() -> dict[str, dict[str, Any]]:
    """Every method with its kind, parameters and their defaults."""
    return {
        s.name: {
            "pretty_name": s.pretty_name,
            "kind": s.kind,
            "parameters": s.parameters(),
            "summary": s.summary,
            "reference": s.reference,
        }
        for s in _METHODS
    }
