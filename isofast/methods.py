"""Method registry: each merging method's name, parameters (typed, validated) and core kernel."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from isofast import param_schedule as sched
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

    # Fields that take settings of isofast.param_schedule (gradients, filters), and of those
    # the ones that may differ per model.
    SCHEDULED: ClassVar[tuple[str, ...]] = ()
    PER_MODEL: ClassVar[tuple[str, ...]] = ()

    def configure(self, options: MergeOptions) -> None:
        """Set this method's fields of the compiled kernel's typed options."""

    @property
    def per_tensor(self) -> bool:
        """Whether some value depends on the tensor (a gradient or a filter)."""
        return any(sched.varies_per_tensor(getattr(self, f)) for f in self.SCHEDULED)

    def resolve(self, name: str, t: float) -> Params:
        """These parameters for tensor `name` at layer position `t`: every scheduled value a
        scalar (a tuple per model), the default where nothing matched."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for f in self.SCHEDULED:
            value = sched.resolve(getattr(self, f), name, t)
            if isinstance(value, tuple):
                value = tuple(defaults[f] if v is None else v for v in value)
            changes[f] = defaults[f] if value is None else value
        return dataclasses.replace(self, **changes)

    def check_tasks(self, tasks: int) -> None:
        """Raise unless every per-model list has one value per model."""
        for f in self.PER_MODEL:
            value = getattr(self, f)
            if sched.is_per_model(value) and len(value[sched.PER_MODEL]) != tasks:
                raise MergeInputError(
                    f"parameter '{f}' has {len(value[sched.PER_MODEL])} per-model values "
                    f"for {tasks} models"
                )

    def _check_settings(self, checks: Mapping[str, Any]) -> None:
        for f, leaf in checks.items():
            sched.check(getattr(self, f), f, leaf, per_model=f in self.PER_MODEL)


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


def _number(name: str, low: float = -math.inf, high: float = math.inf) -> Any:
    def leaf(v: Any) -> None:
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        _check(
            number and abs(v) <= 1e300 and math.isfinite(v),
            f"{name} must be a finite number, got {short(v)}",
        )
        _check(low <= v <= high, f"{name} must be in [{low:g}, {high:g}], got {short(v)}")

    return leaf


def _flag(name: str) -> Any:
    def leaf(v: Any) -> None:
        _check(isinstance(v, bool), f"{name} must be true or false, got {short(v)}")

    return leaf


def _per_task(value: Any) -> list[float]:
    """A resolved value as the core's per-task list (one entry: the same for every task)."""
    return [float(v) for v in value] if isinstance(value, tuple) else [float(value)]


@dataclass(frozen=True, kw_only=True)
class GtaParams(Params):
    """mergekit's generalized task arithmetic (docs/MERGEKIT.md): per model, sparsify the
    task vector (magnitude: exact top-k; random: the contract's DARE draw; magnitude_outliers:
    breadcrumbs; della_magprune: DELLA's draw with rank-dependent probabilities density +-
    epsilon), rescale it to its L1 norm (rescale) and weight it; then sum, over the entries
    whose sign is the elected one (elect), divided by the sum of their weights (normalize),
    times lam. weight, density, gamma and epsilon may differ per model; every value may be a
    gradient or filtered (isofast.param_schedule)."""

    SCHEDULED: ClassVar[tuple[str, ...]] = (
        "weight",
        "density",
        "gamma",
        "epsilon",
        "rescale",
        "normalize",
        "lam",
    )
    PER_MODEL: ClassVar[tuple[str, ...]] = ("weight", "density", "gamma", "epsilon")

    sparsify: Literal["none", "magnitude", "random", "magnitude_outliers", "della_magprune"] = (
        "none"
    )
    elect: Literal["none", "sum", "count"] = "none"
    weight: Any = 1.0
    density: Any = 1.0
    gamma: Any = 0.01
    epsilon: Any = 0.15
    rescale: Any = False
    normalize: Any = False
    lam: Any = 1.0

    def __post_init__(self) -> None:
        kinds = ("none", "magnitude", "random", "magnitude_outliers", "della_magprune")
        _check(
            self.sparsify in kinds, f"sparsify must be one of {kinds}, got {short(self.sparsify)}"
        )
        _check(
            self.elect in ("none", "sum", "count"),
            f"elect must be 'none', 'sum' or 'count', got {short(self.elect)}",
        )
        self._check_settings(
            {
                "weight": _number("weight"),
                "density": _number("density", 0.0, 1.0),
                "gamma": _number("gamma", 0.0, 1.0),
                "epsilon": _number("epsilon", 0.0, 1.0),
                "rescale": _flag("rescale"),
                "normalize": _flag("normalize"),
                "lam": _number("lam"),
            }
        )

    def configure(self, options: MergeOptions) -> None:
        # Per-tensor values: the pipeline configures each tensor from resolve(); this is the
        # value of a tensor outside the layers that no filter names.
        p = self.resolve("", 0.0)
        assert isinstance(p, GtaParams)
        g = options.gta
        g.sparsify = type(g.sparsify).__members__[p.sparsify]
        g.elect = type(g.elect).__members__[p.elect]
        g.weights = _per_task(p.weight)
        g.densities = _per_task(p.density)
        g.gammas = _per_task(p.gamma)
        g.epsilons = _per_task(p.epsilon)
        g.rescale = bool(p.rescale)
        g.normalize = bool(p.normalize)
        g.lam = float(p.lam)
        options.dare.drop_rate = 0.0  # the random sparsification replaces DARE's drop


@dataclass(frozen=True, kw_only=True)
class SlerpParams(Params):
    """mergekit's slerp: the spherical interpolation of the full weights of the base (t = 0)
    and the fine-tuned model (t = 1; with several fine-tunes, their mean), linear where the
    two are nearly colinear. t may be a gradient over the layers or filtered by tensor name."""

    SCHEDULED: ClassVar[tuple[str, ...]] = ("t",)

    t: Any = 0.5

    def __post_init__(self) -> None:
        self._check_settings({"t": _number("t")})

    def configure(self, options: MergeOptions) -> None:
        p = self.resolve("", 0.0)  # per-tensor values: the pipeline configures each tensor
        assert isinstance(p, SlerpParams)
        options.slerp.t = float(p.t)


@dataclass(frozen=True, kw_only=True)
class ModelStockParams(Params):
    """Model Stock: base + t * mean task vector, t = k cos / (1 + (k - 1) cos) from the mean
    cosine between the task vectors, per tensor or (filter_wise) per row of its last axis."""

    filter_wise: bool = False

    def __post_init__(self) -> None:
        _flag("filter_wise")(self.filter_wise)

    def check_tasks(self, tasks: int) -> None:
        super().check_tasks(tasks)
        _check(tasks >= 2, f"model_stock needs at least two fine-tuned models, got {tasks}")

    def configure(self, options: MergeOptions) -> None:
        options.model_stock.filter_wise = self.filter_wise


@dataclass(frozen=True, kw_only=True)
class NuslerpParams(Params):
    """mergekit's nuslerp: the spherical interpolation of two task vectors at
    t = w_1 / (w_0 + w_1), over the whole tensor (nuslerp_flatten), its rows of the last axis,
    or (nuslerp_row_wise) its vectors along the first axis; more models fold in one at a time
    (a running spherical mean; mergekit takes exactly two). weight is per model and may be a
    gradient or filtered."""

    SCHEDULED: ClassVar[tuple[str, ...]] = ("weight",)
    PER_MODEL: ClassVar[tuple[str, ...]] = ("weight",)

    weight: Any = 1.0
    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True

    def __post_init__(self) -> None:
        self._check_settings({"weight": _number("weight")})
        _flag("nuslerp_row_wise")(self.nuslerp_row_wise)
        _flag("nuslerp_flatten")(self.nuslerp_flatten)

    def configure(self, options: MergeOptions) -> None:
        p = self.resolve("", 0.0)  # per-tensor values: the pipeline configures each tensor
        assert isinstance(p, NuslerpParams)
        options.nuslerp.weights = _per_task(p.weight)
        options.nuslerp.row_wise = self.nuslerp_row_wise
        options.nuslerp.flatten = self.nuslerp_flatten


@dataclass(frozen=True, kw_only=True)
class MultislerpParams(Params):
    """mergekit's multislerp: barycentric interpolation of the task vectors on the
    hypersphere, scaled to their weighted mean norm. weight is per model and may be a gradient
    or filtered."""

    SCHEDULED: ClassVar[tuple[str, ...]] = ("weight",)
    PER_MODEL: ClassVar[tuple[str, ...]] = ("weight",)

    weight: Any = 1.0
    normalize_weights: bool = True
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self._check_settings({"weight": _number("weight")})
        _flag("normalize_weights")(self.normalize_weights)
        _number("eps", 0.0)(self.eps)

    def configure(self, options: MergeOptions) -> None:
        p = self.resolve("", 0.0)  # per-tensor values: the pipeline configures each tensor
        assert isinstance(p, MultislerpParams)
        options.multislerp.weights = _per_task(p.weight)
        options.multislerp.normalize_weights = self.normalize_weights
        options.multislerp.eps = float(self.eps)


@dataclass(frozen=True, kw_only=True)
class KarcherParams(Params):
    """mergekit's karcher: the Karcher (Riemannian) mean on the unit sphere of the full
    weights of the base and every fine-tuned model, equal weights, scaled to their mean norm:
    at most max_iter steps, stopping once the tangent step is below tol."""

    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self) -> None:
        it = self.max_iter
        _check(
            isinstance(it, int) and not isinstance(it, bool) and 0 <= it <= 10**6,
            f"max_iter must be an integer in [0, 1000000], got {short(it)}",
        )
        _number("tol", 0.0)(self.tol)

    def configure(self, options: MergeOptions) -> None:
        options.karcher.max_iter = self.max_iter
        options.karcher.tol = float(self.tol)


@dataclass(frozen=True, kw_only=True)
class SceParams(Params):
    """mergekit's SCE: keep the entries whose variance across the task vectors is in the top
    select_topk share (1: all), weight each task vector by its mean square, and take the
    weighted mean over the entries of the elected sign."""

    select_topk: float = 1.0

    def __post_init__(self) -> None:
        _number("select_topk")(self.select_topk)

    def configure(self, options: MergeOptions) -> None:
        options.sce.select_topk = float(self.select_topk)


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
        "gta",
        "Generalized task arithmetic (mergekit's rules)",
        "gta",
        "elementwise",
        GtaParams,
        "https://github.com/arcee-ai/mergekit",
        "per model: sparsify, rescale, weight; elect a sign; weighted mean or sum",
    ),
    MethodSpec(
        "slerp",
        "SLERP",
        "slerp",
        "elementwise",
        SlerpParams,
        "https://en.wikipedia.org/wiki/Slerp",
        "spherical interpolation of the base and the fine-tuned weights at t",
    ),
    MethodSpec(
        "model_stock",
        "Model Stock",
        "model_stock",
        "elementwise",
        ModelStockParams,
        "https://arxiv.org/abs/2403.19522",
        "base + t * mean task vector, t from the angles between task vectors",
    ),
    MethodSpec(
        "nuslerp",
        "NuSLERP",
        "nuslerp",
        "elementwise",
        NuslerpParams,
        "https://github.com/arcee-ai/mergekit",
        "spherical interpolation of two task vectors, weighted, per tensor or per row",
    ),
    MethodSpec(
        "multislerp",
        "Multi-SLERP",
        "multislerp",
        "elementwise",
        MultislerpParams,
        "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        "weighted barycentre of the task vectors on the hypersphere",
    ),
    MethodSpec(
        "karcher",
        "Karcher mean",
        "karcher",
        "elementwise",
        KarcherParams,
        "https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
        "Riemannian mean of the base and fine-tuned weights on the hypersphere",
    ),
    MethodSpec(
        "sce",
        "SCE",
        "sce",
        "elementwise",
        SceParams,
        "https://arxiv.org/abs/2408.07990",
        "select high-variance entries, weight by mean square, elect sign, weighted mean",
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
