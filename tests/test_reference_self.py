"""Sanity checks of tests/reference.py itself (the ground truth must be trusted first)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import reference as ref

F32_EPS = float(np.finfo(np.float32).eps)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def tasks(T: int, m: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((m, n)) for _ in range(T)]


def low_rank(m: int, n: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))


def svals(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(a, compute_uv=False)


# ----------------------------------------------------------------------------- Iso-CTS sizes


@pytest.mark.parametrize(
    ("r", "T", "expected"),
    [
        # Worked examples from docs/ALGORITHMS.md (section 8.5).
        (768, 8, (616, 19)),
        (768, 20, (608, 8)),
        (1024, 20, (824, 10)),
        # r=50, f=0.8: k0 = floor(40.0) = 40, r - k0 = 10.
        # T=8:  10/8  = 1.25 -> 1, S_ts = 8,  k = 42, s = 1.
        (50, 8, (42, 1)),
        # T=14: 10/14 = 0.714 -> 1, S_ts = 14, k = 36, s = 1.
        (50, 14, (36, 1)),
        # T=20: 10/20 = 0.5 -> 0 (half to even), S_ts = 0, k = 50, s = 0.
        (50, 20, (50, 0)),
    ],
)
def test_iso_cts_sizes_worked(r: int, T: int, expected: tuple[int, int]) -> None:
    assert ref.iso_cts_sizes(r, T) == expected


def test_iso_cts_sizes_clamp() -> None:
    # f=0, r=10, T=6: 10/6 = 1.67 -> 2, S_ts = 12 > 10, so S_ts = floor(10/6)*6 = 6: k=4, s=1.
    assert ref.iso_cts_sizes(10, 6, 0.0) == (4, 1)
    # f=0, r=10, T=4: 10/4 = 2.5 -> 2 (half to even), S_ts = 8: k=2, s=2.
    assert ref.iso_cts_sizes(10, 4, 0.0) == (2, 2)
    # f=1: no task-specific space.
    assert ref.iso_cts_sizes(64, 3, 1.0) == (64, 0)


# ----------------------------------------------------------------------------- Iso-C / Iso-CTS


@pytest.mark.parametrize(("m", "n"), [(24, 16), (16, 24), (20, 20)])
def test_iso_c_flat_spectrum(m: int, n: int) -> None:
    ds = tasks(4, m, n)
    out = ref.iso_c(ds)
    expected = svals(sum(ds)).mean()
    np.testing.assert_allclose(svals(out), expected, rtol=1e-12)
    # Same singular subspaces as the sum: M = sigma_bar * polar(D).
    u, _, vt = np.linalg.svd(sum(ds), full_matrices=False)
    assert rel(out, expected * u @ vt) < 1e-12


@pytest.mark.parametrize(("m", "n"), [(24, 16), (16, 24)])
def test_iso_cts_f1_equals_iso_c(m: int, n: int) -> None:
    ds = tasks(5, m, n, seed=1)
    assert rel(ref.iso_cts(ds, common_space_fraction=1.0), ref.iso_c(ds)) < 1e-12


@pytest.mark.parametrize(("m", "n"), [(30, 20), (20, 30)])
def test_iso_cts_structure(m: int, n: int) -> None:
    ds = tasks(4, m, n, seed=2)
    out = ref.iso_cts(ds)
    r = min(m, n)
    k, s = ref.iso_cts_sizes(r, 4)
    assert (k, s) == (16, 1) or r == 20  # r=20: k0=16, (20-16)/4 = 1 -> k=16, s=1
    sv = svals(out)
    # Full-rank inputs: r flat singular values, sigma_bar from the common and task blocks.
    d = sum(ds)
    sigma_d = svals(d)
    task_top = []
    for dt in ds:
        u_k = np.linalg.svd(d, full_matrices=False)[0][:, :k]
        task_top.append(svals(dt - u_k @ (u_k.T @ dt))[:s])
    sigma_bar = (sigma_d[:k].sum() + np.sum(task_top)) / r
    np.testing.assert_allclose(sv, sigma_bar, rtol=1e-10)


# ----------------------------------------------------------------------------- TSV-M


@pytest.mark.parametrize(("m", "n"), [(12, 8), (8, 12)])
def test_tsv_m_single_task_is_identity(m: int, n: int) -> None:
    (d,) = tasks(1, m, n, seed=3)
    assert rel(ref.tsv_m([d]), d) < 1e-12


def test_tsv_m_keeps_task_singular_values() -> None:
    # Two tasks with orthogonal left and right supports: the stacked factors are already
    # orthonormal, so M = sum of each task's rank-d truncation.
    rng = np.random.default_rng(4)
    q_left = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    q_right = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    s1, s2 = np.array([5.0, 4.0, 1.0, 0.5]), np.array([3.0, 2.0, 0.7, 0.1])
    u1, u2 = q_left[:, :4], q_left[:, 4:8]
    v1, v2 = q_right[:, :4], q_right[:, 4:8]
    d1, d2 = (u1 * s1) @ v1.T, (u2 * s2) @ v2.T
    # r=16, T=2: d=8 >= rank 4 so nothing is cut; result is d1 + d2.
    assert rel(ref.tsv_m([d1, d2]), d1 + d2) < 1e-12


# ----------------------------------------------------------------------------- rank-deficient


def test_iso_c_rank_deficient() -> None:
    rng = np.random.default_rng(5)
    ds = [low_rank(20, 14, 1, rng) for _ in range(3)]  # sum has rank 3
    out = ref.iso_c(ds)
    sv = svals(out)
    sd = svals(sum(ds))
    assert np.count_nonzero(sv > 1e-10 * sv[0]) == 3
    np.testing.assert_allclose(sv[:3], sd[:3].mean(), rtol=1e-12)
    # Deterministic: range-restricted polar factor of the sum.
    u, _, vt = np.linalg.svd(sum(ds), full_matrices=False)
    assert rel(out, sd[:3].mean() * u[:, :3] @ vt[:3]) < 1e-12


def test_iso_cts_rank_deficient() -> None:
    rng = np.random.default_rng(6)
    ds = [low_rank(20, 14, 2, rng) for _ in range(3)]  # sum has rank 6, r = 14
    out = ref.iso_cts(ds)
    sv = svals(out)
    rank = np.count_nonzero(sv > 1e-10 * sv[0])
    # Sizes from the numerical rank q = 6 (not r = 14): k = 3 common directions and s = 1 per
    # task; the merged update has rank 6 with a flat spectrum.
    assert ref.iso_cts_sizes(6, 3, 0.8) == (3, 1)
    assert rank == 6
    np.testing.assert_allclose(sv[:6], sv[0], rtol=1e-10)
    # The rule of the paper's code (sizes from r: k = 12 > q) keeps only the range of D.
    assert rel(ref.iso_cts(ds, rank_aware=False), ref.iso_c(ds)) < 1e-10


def test_tsv_m_rank_deficient() -> None:
    rng = np.random.default_rng(7)
    ds = [low_rank(16, 12, 2, rng) for _ in range(2)]  # d = 6 > rank 2
    out = ref.tsv_m(ds)
    assert np.all(np.isfinite(out))
    assert np.count_nonzero(svals(out) > 1e-10 * svals(out)[0]) == 4


@pytest.mark.parametrize("fn", [ref.iso_c, ref.iso_cts, ref.tsv_m])
def test_all_zero_gives_zero(fn) -> None:
    out = fn([np.zeros((6, 4)), np.zeros((6, 4))])
    assert out.shape == (6, 4)
    assert not np.any(out)


def test_rank_tol_and_eps_cut() -> None:
    # Sum with spectrum {1, 1e-9}: kept in float64 (tol ~ 2e-15), cut with float32 eps.
    rng = np.random.default_rng(8)
    u = np.linalg.qr(rng.standard_normal((8, 2)))[0]
    v = np.linalg.qr(rng.standard_normal((6, 2)))[0]
    d = (u * np.array([1.0, 1e-9])) @ v.T
    assert np.count_nonzero(svals(ref.iso_c([d])) > 1e-12) == 2
    assert np.count_nonzero(svals(ref.iso_c([d], eps=F32_EPS)) > 1e-12) == 1
    assert np.count_nonzero(svals(ref.iso_c([d], rank_tol=1e-6)) > 1e-12) == 1


# ----------------------------------------------------------------------------- order invariance


def model_tasks(T: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.standard_normal((10, 7)),
            "b": rng.standard_normal(7),
            "s": rng.standard_normal(()),
        }
        for _ in range(T)
    ]


@pytest.mark.parametrize("fn", [ref.iso_c, ref.iso_cts])
def test_matrix_order_invariance(fn) -> None:
    ds = tasks(4, 18, 12, seed=9)
    base = fn(ds)
    for perm in [(3, 1, 0, 2), (1, 2, 3, 0)]:
        assert rel(fn([ds[i] for i in perm]), base) < 1e-10


@pytest.mark.parametrize("trim", ["global", "tensor"])
def test_ties_order_invariance(trim: str) -> None:
    ts = model_tasks(3, seed=10)
    base = ref.ties_model(ts, density=0.3, trim=trim)
    for perm in itertools.permutations(range(3)):
        out = ref.ties_model([ts[i] for i in perm], density=0.3, trim=trim)
        for n in base:
            np.testing.assert_allclose(out[n], base[n], rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- TIES


def test_ties_density1_single_task_is_ta() -> None:
    ts = model_tasks(1, seed=11)
    for trim, merge in itertools.product(["global", "tensor"], ["mean", "sum"]):
        out = ref.ties_model(ts, density=1.0, trim=trim, merge=merge)
        for n, x in ts[0].items():
            np.testing.assert_array_equal(out[n], x)


def test_ties_trim_rule() -> None:
    x = np.array([0.5, -3.0, 1.0, -1.0, 2.0])
    # n=5, density=0.4: kth = floor(5*0.6) = 3; 3rd smallest |x| = 1.0 (ties counted),
    # so |x| >= 1.0 is kept: 4 entries survive.
    out = ref.ties_model([{"x": x}], density=0.4)["x"]
    np.testing.assert_array_equal(out, [0.0, -3.0, 1.0, -1.0, 2.0])


def test_ties_elect_and_fallback() -> None:
    a = {"x": np.array([1.0, 2.0, -1.0, 3.0])}
    b = {"x": np.array([3.0, -4.0, 1.0, 1.0])}
    out = ref.ties_model([a, b], density=1.0)["x"]
    # Entry 0: both +, mean 2. Entry 1: sum -2 -> only b. Entry 2: sum 0 -> majority sign
    # over the vector: signs (+, -, 0, +) sum to +1, so +1 -> b's 1.0. Entry 3: mean 2.
    np.testing.assert_array_equal(out, [2.0, -4.0, 1.0, 2.0])
    out_sum = ref.ties_model([a, b], density=1.0, merge="sum")["x"]
    np.testing.assert_array_equal(out_sum, [4.0, -4.0, 1.0, 4.0])


def test_ties_global_vs_tensor_trim() -> None:
    # Global trim ranks the whole model: n=6, density=0.3, kth = floor(4.2) = 4, threshold
    # = 4th smallest |x| = 8.0, so "small" loses everything and "big" keeps all.
    # Per tensor: n=3, kth = floor(2.1) = 2, threshold = 2nd smallest of each tensor.
    t = {"big": np.array([10.0, 9.0, 8.0]), "small": np.array([0.1, 0.2, 0.3])}
    g = ref.ties_model([t], density=0.3, trim="global")
    p = ref.ties_model([t], density=0.3, trim="tensor")
    np.testing.assert_array_equal(g["big"], [10.0, 9.0, 8.0])
    np.testing.assert_array_equal(g["small"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(p["big"], [10.0, 9.0, 0.0])
    np.testing.assert_array_equal(p["small"], [0.0, 0.2, 0.3])


# ----------------------------------------------------------------------------- DARE


def test_dare_mask_reproducible_and_rate() -> None:
    shape = (200, 150)
    a = ref.dare_mask(0, "layer.weight", 1, shape, 0.3)
    b = ref.dare_mask(0, "layer.weight", 1, shape, 0.3)
    assert a.dtype == np.bool_ and a.shape == shape
    np.testing.assert_array_equal(a, b)
    # Binomial(30000, 0.7): sd ~ 0.0026, so 0.015 is about 6 sd.
    assert abs(a.mean() - 0.7) < 0.015
    # Seed, name and task index each change the stream.
    assert np.any(a != ref.dare_mask(1, "layer.weight", 1, shape, 0.3))
    assert np.any(a != ref.dare_mask(0, "layer.bias", 1, shape, 0.3))
    assert np.any(a != ref.dare_mask(0, "layer.weight", 0, shape, 0.3))
    # Row-major flat index: the mask depends only on the element count, not the shape.
    np.testing.assert_array_equal(a.ravel(), ref.dare_mask(0, "layer.weight", 1, 30000, 0.3))


def test_dare_mask_known_key() -> None:
    # Cross-check the splitmix/fnv1a pipeline with plain Python integers.
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    h = 0xCBF29CE484222325
    for byte in b"blocks.0.attn.w":
        h = ((h ^ byte) * 0x100000001B3) & mask
    key = mix(mix(mix(7) ^ h) ^ 2)
    u = [(mix((key + (i + 1) * 0x9E3779B97F4A7C15) & mask) >> 11) * 2.0**-53 for i in range(64)]
    expected = np.array(u) >= 0.5
    np.testing.assert_array_equal(
        ref.dare_mask(7, "blocks.0.attn.w", 2, (8, 8), 0.5).ravel(), expected
    )


def test_dare_rescale_and_linear() -> None:
    ts = model_tasks(2, seed=12)
    dared = ref.dare_model(ts, seed=3, drop_rate=0.25)
    for t, (orig, out) in enumerate(zip(ts, dared, strict=True)):
        for n, x in orig.items():
            keep = ref.dare_mask(3, n, t, x.shape, 0.25)
            np.testing.assert_allclose(out[n], np.where(keep, x / 0.75, 0.0), rtol=1e-15)
    lin = ref.dare_linear_model(ts, seed=3, drop_rate=0.25)
    for n in lin:
        np.testing.assert_allclose(lin[n], dared[0][n] + dared[1][n], rtol=1e-15)
    # drop_rate=0: identity, so dare_ties with density 1 is plain TIES.
    dt = ref.dare_ties_model(ts, seed=3, drop_rate=0.0)
    tt = ref.ties_model(ts, density=1.0)
    for n in dt:
        np.testing.assert_array_equal(dt[n], tt[n])


# ----------------------------------------------------------------------------- consensus


def test_consensus_min_agree_zero_is_ta() -> None:
    ts = model_tasks(3, seed=13)
    out = ref.consensus_model(ts, min_agree=0)
    for n in out:
        np.testing.assert_allclose(out[n], sum(t[n] for t in ts), rtol=1e-15)


def test_consensus_mask() -> None:
    a = {"x": np.array([1.0, 1.0, 0.0])}
    b = {"x": np.array([1.0, -0.9, 0.0])}
    # tau = (2, 0.1, 0). m_a = (1>=0.4, 1>=0.36, 0>=0) = (T, T, T); m_b = (T, 0.9>=0.4, T).
    out = ref.consensus_model([a, b], lam=0.4, min_agree=2)["x"]
    np.testing.assert_allclose(out, [2.0, 0.1, 0.0])
    # lam=2: m_a = (1>=2, 1>=3.8, T) and m_b = (F, F, T): only entry 2 agrees (value 0).
    np.testing.assert_array_equal(ref.consensus_model([a, b], lam=2.0)["x"], 0.0)


# ----------------------------------------------------------------------------- merge_model


def test_merge_model_kinds() -> None:
    rng = np.random.default_rng(14)
    base = {
        "enc.w": rng.standard_normal((12, 8)).astype(np.float32),
        "enc.b": rng.standard_normal(8),
        "text_projection": rng.standard_normal((8, 6)),
        "conv": rng.standard_normal((2, 3, 2, 2)),
        "ids": np.arange(5, dtype=np.int64),
        "flag": np.array([True, False]),
    }
    fts = []
    for _ in range(3):
        ft = {n: x.copy() for n, x in base.items()}
        for n in ("enc.w", "enc.b", "text_projection", "conv"):
            ft[n] = base[n] + rng.standard_normal(base[n].shape)
        ft["ids"] = ft["ids"] + 1  # must be ignored: copied from base
        fts.append(ft)
    deltas = [
        {n: np.asarray(ft[n], np.float64) - np.asarray(base[n], np.float64) for n in ft}
        for ft in fts
    ]
    out = ref.merge_model(base, fts, "iso_c", alpha=0.7)
    np.testing.assert_array_equal(out["ids"], base["ids"])
    assert out["ids"].dtype == np.int64
    np.testing.assert_array_equal(out["flag"], base["flag"])
    assert out["enc.w"].dtype == np.float64
    expect_w = base["enc.w"].astype(np.float64) + 0.7 * ref.iso_c([d["enc.w"] for d in deltas])
    assert rel(out["enc.w"], expect_w) < 1e-12
    for n in ("enc.b", "text_projection", "conv"):
        mean = np.mean([d[n] for d in deltas], axis=0)
        assert rel(out[n], base[n] + 0.7 * mean) < 1e-12

    wa = ref.merge_model(base, fts, "weight_average")
    for n in ("enc.w", "enc.b", "text_projection", "conv"):
        expected = np.mean([np.asarray(ft[n], np.float64) for ft in fts], axis=0)
        assert rel(wa[n], expected) < 1e-12

    ties = ref.merge_model(base, fts, "ties", alpha=0.5, density=0.3)
    tm = ref.ties_model([{n: d[n] for n in ties if n not in ("ids", "flag")} for d in deltas], 0.3)
    assert (
        rel(ties["text_projection"], base["text_projection"] + 0.5 * tm["text_projection"]) < 1e-15
    )

    with pytest.raises(ValueError, match="unknown method"):
        ref.merge_model(base, fts, "nope")
