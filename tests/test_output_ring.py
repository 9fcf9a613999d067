"""The ring that streamed merges carve their output arrays from."""

from __future__ import annotations

import numpy as np
import pytest

from isofast.arrays import Bf16Array
from isofast.output_ring import PAGE, OutputRing

SLOT = 2 * PAGE  # what a request of up to one page takes (page-phase padding included)


def test_outputs_reuse_the_same_memory_in_order() -> None:
    ring = OutputRing(3 * SLOT)
    a, ta = ring.empty((1024,), "float32")
    _, tb = ring.empty((512,), "float64")
    assert ta is not None and tb is not None
    ring.release(ta)
    c, tc = ring.empty((1024,), "float32")  # after b: still room at the end
    ring.release(tb)
    d, td = ring.empty((2048,), "bfloat16")  # wraps to the start, where a was
    assert isinstance(d, Bf16Array) and d.bits.dtype == np.uint16
    assert d.bits.ctypes.data == a.ctypes.data
    assert c.ctypes.data != a.ctypes.data
    ring.release(tc)
    ring.release(td)


@pytest.mark.parametrize(
    ("phase", "dtype", "want"),
    [(0, "uint8", 0), (100, "bfloat16", 100), (4092, "float32", 4092), (6, "float32", 4)],
)
def test_arrays_start_at_the_page_phase_asked_for(phase: int, dtype: str, want: int) -> None:
    ring = OutputRing(4 * SLOT)
    for _ in range(6):  # wrap around a few times
        arr, token = ring.empty((PAGE // 2,), dtype, phase)
        bits = arr.bits if isinstance(arr, Bf16Array) else arr
        assert token is not None and bits.ctypes.data % PAGE == want
        ring.release(token)


def test_a_request_that_does_not_fit_gets_its_own_array() -> None:
    ring = OutputRing(SLOT)
    _, ta = ring.empty((1000,), "float32")
    big, token = ring.empty((2000,), "float32")
    assert token is None and big.shape == (2000,)
    ring.release(token)  # a no-op
    ring.release(ta)


def test_live_arrays_never_overlap() -> None:
    rng = np.random.default_rng(0)
    ring = OutputRing(1 << 16)
    live: list[tuple[np.ndarray, object, int]] = []
    for step in range(500):
        if live and (len(live) > 3 or rng.random() < 0.4):
            arr, token, value = live.pop(0)
            assert (arr == value).all()  # nobody wrote over it
            ring.release(token)  # type: ignore[arg-type]
        n = int(rng.integers(1, 6000))
        arr, token = ring.empty((n,), "uint8", int(rng.integers(0, PAGE)))
        arr[:] = step % 251
        live.append((arr, token, step % 251))


def test_out_of_order_release_is_refused() -> None:
    ring = OutputRing(1 << 16)
    _, first = ring.empty((10,), "float32")
    _, second = ring.empty((10,), "float32")
    with pytest.raises(RuntimeError, match="out of order"):
        ring.release(second)
    ring.release(first)
