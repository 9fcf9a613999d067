"""Typed stub of the compiled extension isofast._core (csrc/bindings.cpp)."""

from typing import Any

import numpy as np
import numpy.typing as npt

cuda_built: bool

class Kernel:
    mean: Kernel
    sum: Kernel
    ties: Kernel
    consensus: Kernel
    gta: Kernel
    tsv_m: Kernel
    iso_c: Kernel
    iso_cts: Kernel
    slerp: Kernel
    model_stock: Kernel
    nuslerp: Kernel
    multislerp: Kernel
    karcher: Kernel
    sce: Kernel
    __members__: dict[str, Kernel]
    name: str

class MatrixRoute:
    auto: MatrixRoute
    gram: MatrixRoute
    direct: MatrixRoute
    __members__: dict[str, MatrixRoute]
    name: str

class DareOptions:
    drop_rate: float
    seed: int

class TiesOptions:
    density: float
    trim_global: bool
    thresholds: list[float]
    majority_sign: int
    sum: bool

class ConsensusOptions:
    lam: float
    min_agree: int
    on_ties: bool

class Sparsify:
    none: Sparsify
    magnitude: Sparsify
    random: Sparsify
    magnitude_outliers: Sparsify
    della_magprune: Sparsify
    __members__: dict[str, Sparsify]
    name: str

class Elect:
    none: Elect
    sum: Elect
    count: Elect
    __members__: dict[str, Elect]
    name: str

class GtaOptions:
    sparsify: Sparsify
    elect: Elect
    weights: list[float]
    densities: list[float]
    gammas: list[float]
    epsilons: list[float]
    rescale: bool
    normalize: bool
    lam: float

class SlerpOptions:
    t: float
    dot_threshold: float
    eps: float

class ModelStockOptions:
    filter_wise: bool

class NuslerpOptions:
    weights: list[float]
    row_wise: bool
    flatten: bool
    eps: float

class MultislerpOptions:
    weights: list[float]
    normalize_weights: bool
    eps: float

class KarcherOptions:
    max_iter: int
    tol: float

class SceOptions:
    select_topk: float

class MatrixOptions:
    rank_tol: float
    common_space_fraction: float
    route: MatrixRoute

class MergeOptions:
    kernel: Kernel
    alpha: float
    compute64: bool
    threads: int
    item_threads: int
    dare: DareOptions
    ties: TiesOptions
    consensus: ConsensusOptions
    gta: GtaOptions
    slerp: SlerpOptions
    model_stock: ModelStockOptions
    nuslerp: NuslerpOptions
    multislerp: MultislerpOptions
    karcher: KarcherOptions
    sce: SceOptions
    matrix: MatrixOptions
    release_inputs: bool
    def __init__(self, other: MergeOptions | None = None) -> None: ...

def merge_items(options: MergeOptions, items: list[Any]) -> None: ...
def abs_histogram(
    items: list[Any], options: MergeOptions, digit: int, prefixes: list[int]
) -> npt.NDArray[np.int64]: ...
def ties_vote(items: list[Any], options: MergeOptions) -> int: ...
def svd(a: Any) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]: ...
def data_ptr(a: Any) -> int: ...
def take_route_counts() -> dict[str, int]: ...
def crc32c(data: Any, crc: int = 0) -> int: ...
def iso_cts_sizes(r: int, tasks: int, fraction: float) -> tuple[int, int]: ...
def set_num_threads(threads: int) -> None: ...
def get_num_threads() -> int: ...
def blas_config() -> str: ...
def polar_iter(
    a: Any, lower_bound: float = 1e-6, tol: float = 1e-5, compute: str | None = None
) -> tuple[npt.NDArray[Any], float, float, bool, int]: ...
def polar_schedule(
    lower_bound: float = 1e-6, target: float = 1.1920928955078125e-07
) -> list[tuple[float, float, float, float, float]]: ...
