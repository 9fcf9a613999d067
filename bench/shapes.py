"""CLIP ViT visual-tower tensor shapes and seeded synthetic task vectors shaped like them.

Shapes (OpenCLIP names under `model.visual.`, width d, `layers` residual blocks):

| tensor | shape | kind |
| --- | --- | --- |
| conv1.weight (patch embedding) | (d, 3, p, p) | non-2-D: mean |
| class_embedding, ln_pre.*, ln_post.* | (d,) | mean |
| positional_embedding | (g*g + 1, d), g = 224 / p | 2-D |
| proj | (d, e), e = 512 (B) or 768 (L/14) | 2-D |
| block i: ln_1.*, ln_2.* | (d,) | mean |
| block i: attn.in_proj_weight (fused qkv) / in_proj_bias | (3d, d) / (3d,) | 2-D / mean |
| block i: attn.out_proj.weight / bias | (d, d) / (d,) | 2-D / mean |
| block i: mlp.c_fc.weight / bias | (4d, d) / (4d,) | 2-D / mean |
| block i: mlp.c_proj.weight / bias | (d, 4d) / (d,) | 2-D / mean |

ViT-B/32: d=768, p=32, 12 blocks; ViT-B/16: d=768, p=16, 12 blocks; ViT-L/14: d=1024, p=14,
24 blocks. `blocks=N` keeps the stem/head tensors and the first N blocks.

Synthetic task matrices (one key of shape m x n; built for m >= n and transposed for wide keys,
so that "the small side" is always the shared input-like side; r = min(m, n), x_i = i / r):

    D_t = c_t * L_t @ K_t @ diag(b) @ V0^T
    K_t = diag(a) @ G_t / sqrt(r)            dense bulk, G_t iid N(0, 1), r x r
          + sum over a shared pool of 32 directions, each active in a task with prob. 0.6:
            w_j e_j e_j^T  (w_j = 0.6 * U(0.5, 1.5) / sqrt(1 + j / 4))
          + 8 task-specific strong rank-1 terms p q^T (random unit p, q; weight 0.6 * U(0.5, 1.5))
    a_i = (1 + 16 x_i)^(-1/2)                 decaying bulk
    b_i = a_i * 10^(-c * max(0, (x_i - 0.9) / 0.1))   shared roll-off of the last 10 %
    V0 (n x r), U0 (m x r): orthonormal bases shared by all tasks of the key
    L_t = U0 + 0.5 * Z_t / sqrt(m)            task-specific tilt of the output side
    c_t = per-task scale so that the entries' RMS is 1e-3 * U(0.75, 1.25)

The right side (input features) is shared by every task, as the input activations of a layer
are, so the small singular values of the sum are small for every key: tail depth c = 1 for
square keys (a sum of square random cores is already ill-conditioned, kappa ~ r) and c = 3
for rectangular keys. With these numbers the task sums have condition numbers ~1e4..1e5,
the top 3 % of directions of one D_t hold ~30 % of its energy and the top 25 % ~85 %
(`python bench/shapes.py --stats` prints them). Every tensor is float32 and a pure function
of (seed, tensor name, task index), so a subset of blocks has the same values as the full
model.
"""

from __future__ import annotations

import argparse
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

PREFIX = "model.visual."
TASK_RMS = 1e-3
N_SHARED = 32
N_OWN = 8
STRONG = 0.6
TILT = 0.5


@dataclass(frozen=True)
class VisionTower:
    name: str
    width: int
    layers: int
    patch: int
    embed_dim: int
    image_size: int = 224

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


MODELS: dict[str, VisionTower] = {
    "B/32": VisionTower("ViT-B/32", 768, 12, 32, 512),
    "B/16": VisionTower("ViT-B/16", 768, 12, 16, 512),
    "L/14": VisionTower("ViT-L/14", 1024, 24, 14, 768),
}


def get_model(key: str) -> VisionTower:
    aliases = {k.lower(): k for k in MODELS}
    aliases.update({v.name.lower(): k for k, v in MODELS.items()})
    try:
        return MODELS[aliases[key.lower()]]
    except KeyError:
        raise ValueError(f"unknown model {key!r}; choose from {sorted(MODELS)}") from None


def tensor_shapes(model: VisionTower, blocks: int | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the visual tower, stem and head plus the first `blocks` blocks."""
    n_blocks = model.layers if blocks is None else blocks
    if not 0 <= n_blocks <= model.layers:
        raise ValueError(f"{model.name} has {model.layers} blocks, asked for {n_blocks}")
    d, p = model.width, model.patch
    shapes: dict[str, tuple[int, ...]] = {
        "class_embedding": (d,),
        "positional_embedding": (model.grid**2 + 1, d),
        "proj": (d, model.embed_dim),
        "conv1.weight": (d, 3, p, p),
        "ln_pre.weight": (d,),
        "ln_pre.bias": (d,),
    }
    for i in range(n_blocks):
        b = f"transformer.resblocks.{i}."
        shapes.update(
            {
                b + "ln_1.weight": (d,),
                b + "ln_1.bias": (d,),
                b + "attn.in_proj_weight": (3 * d, d),
                b + "attn.in_proj_bias": (3 * d,),
                b + "attn.out_proj.weight": (d, d),
                b + "attn.out_proj.bias": (d,),
                b + "ln_2.weight": (d,),
                b + "ln_2.bias": (d,),
                b + "mlp.c_fc.weight": (4 * d, d),
                b + "mlp.c_fc.bias": (4 * d,),
                b + "mlp.c_proj.weight": (d, 4 * d),
                b + "mlp.c_proj.bias": (d,),
            }
        )
    shapes["ln_post.weight"] = (d,)
    shapes["ln_post.bias"] = (d,)
    return {PREFIX + name: shape for name, shape in shapes.items()}


def svd_cost(shapes: dict[str, tuple[int, ...]]) -> float:
    """First-order cost of the matrix methods: sum over 2-D keys of m * n * min(m, n)."""
    return float(sum(s[0] * s[1] * min(s) for s in shapes.values() if len(s) == 2))


def num_params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _generator(seed: int, *parts: object) -> torch.Generator:
    text = ":".join(str(p) for p in (seed, *parts))
    return torch.Generator().manual_seed(zlib.crc32(text.encode()) ^ (seed << 32))


def _unit_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=gen)
    unit: torch.Tensor = x / x.norm(dim=0, keepdim=True)
    return unit


def _profiles(
    r: int, square: bool, depth: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(r, dtype=torch.float64) / r
    a = (1.0 + 16.0 * x) ** -0.5
    if depth is None:
        depth = 1.0 if square else 3.0
    b = a * 10.0 ** (-depth * torch.clamp((x - 0.9) / 0.1, min=0.0))
    return a.float(), b.float()


def task_matrices(
    name: str, shape: tuple[int, int], num_tasks: int, seed: int = 0, depth: float | None = None
) -> Iterator[torch.Tensor]:
    """The T synthetic float32 task matrices of one 2-D key (construction: module docstring);
    `depth` overrides the roll-off depth c (deeper: larger condition numbers)."""
    m0, n0 = shape
    m, n = max(m0, n0), min(m0, n0)  # build tall (m >= n), transpose back for wide keys
    r = n
    shared = _generator(seed, name, "shared")
    u0, _ = torch.linalg.qr(torch.randn(m, r, generator=shared))
    v0, _ = torch.linalg.qr(torch.randn(n, r, generator=shared))
    a, b = _profiles(r, m == n, depth)
    right = b[:, None] * v0.T  # diag(b) V0^T, r x n, shared by every task
    diag = torch.arange(min(N_SHARED, r))
    pool_weight = STRONG / torch.sqrt(1.0 + diag.float() / 4.0)
    for t in range(num_tasks):
        gen = _generator(seed, name, t)
        core = a[:, None] * torch.randn(r, r, generator=gen) / math.sqrt(r)
        active = (torch.rand(len(diag), generator=gen) < 0.6).float()
        core[diag, diag] += pool_weight * (0.5 + torch.rand(len(diag), generator=gen)) * active
        p, q = _unit_columns(r, N_OWN, gen), _unit_columns(r, N_OWN, gen)
        own = STRONG * (0.5 + torch.rand(N_OWN, generator=gen))
        core += (p * own) @ q.T
        left = u0 + TILT * torch.randn(m, r, generator=gen) / math.sqrt(m)
        delta = left @ (core @ right)
        rms = TASK_RMS * (0.75 + 0.5 * torch.rand((), generator=gen).item())
        delta *= rms / delta.square().mean().sqrt()
        yield (delta if m0 >= n0 else delta.T).contiguous()


def other_tensor(name: str, shape: tuple[int, ...], task: int, seed: int = 0) -> torch.Tensor:
    """Task vector entry of a non-2-D tensor: small Gaussian noise."""
    gen = _generator(seed, name, task)
    return TASK_RMS * torch.randn(shape, generator=gen)


def make_task_vectors(
    model: VisionTower, num_tasks: int, blocks: int | None = None, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """T synthetic float32 task-vector dicts (name -> D_t) of the model's visual tower."""
    shapes = tensor_shapes(model, blocks)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(num_tasks)]
    for name, shape in shapes.items():
        if len(shape) == 2:
            for t, delta in enumerate(task_matrices(name, (shape[0], shape[1]), num_tasks, seed)):
                out[t][name] = delta
        else:
            for t in range(num_tasks):
                out[t][name] = other_tensor(name, shape, t, seed)
    return out


def spectrum_stats(tensors: list[torch.Tensor]) -> dict[str, float]:
    """Condition numbers and energy shares (float64) of a key's task matrices and their sum."""
    total = torch.stack([t.double() for t in tensors]).sum(0)
    s_sum = torch.linalg.svdvals(total)
    s_one = torch.linalg.svdvals(tensors[0].double())
    energy = s_one.square().cumsum(0) / s_one.square().sum()
    r = len(s_one)
    return {
        "kappa_sum": float(s_sum[0] / s_sum[-1]),
        "kappa_task0": float(s_one[0] / s_one[-1]),
        "energy_top3pct_task0": float(energy[max(0, math.ceil(0.03 * r) - 1)]),
        "energy_top25pct_task0": float(energy[max(0, math.ceil(0.25 * r) - 1)]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Print the tensor shapes of a CLIP visual tower and the spectra of the "
        "synthetic task matrices (one block's distinct 2-D shapes plus stem/head)."
    )
    parser.add_argument("--model", default="B/32", help="B/32, B/16 or L/14")
    parser.add_argument("--tasks", type=int, default=8, help="number of tasks T")
    parser.add_argument("--blocks", type=int, default=None, help="first N blocks only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stats", action="store_true", help="also print spectra statistics")
    args = parser.parse_args(argv)
    model = get_model(args.model)
    shapes = tensor_shapes(model, args.blocks)
    print(
        f"{model.name}: {len(shapes)} tensors, {num_params(shapes) / 1e6:.1f} M parameters, "
        f"{sum(len(s) == 2 for s in shapes.values())} 2-D keys"
    )
    if not args.stats:
        for name, shape in shapes.items():
            print(f"  {name}: {shape}")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seen: set[tuple[int, ...]] = set()
    print("| key | shape | kappa(sum) | kappa(D_0) | energy top 3% | energy top 25% |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, shape in shapes.items():
        if len(shape) != 2 or shape in seen:
            continue
        seen.add(shape)
        mats = list(task_matrices(name, (shape[0], shape[1]), args.tasks, args.seed))
        st = spectrum_stats(mats)
        print(
            f"| {name.removeprefix(PREFIX)} | {shape[0]}x{shape[1]} | {st['kappa_sum']:.2e} "
            f"| {st['kappa_task0']:.2e} | {st['energy_top3pct_task0']:.2f} "
            f"| {st['energy_top25pct_task0']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
