"""Output arrays of a streamed merge, carved from one reused buffer.

A merged tensor lives only until the writer has copied it out, and tensors are written in
the order they are merged. Fresh arrays would cost a page fault and a zeroed page per 4 KiB of
output (about a tenth of a task-arithmetic merge); a ring reuses the same pages. Outputs are
released oldest first; a request that does not fit gets a plain new array instead of waiting.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

import numpy as np

from isofast import arrays
from isofast.io.dtypes import by_name

PAGE = 4096  # slots start page-aligned, then shift to the page phase asked for


RingToken = tuple[int, int] | None  # what releases a ring array (None: not from the ring)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class OutputRing:
    """First-in first-out allocator of output arrays over `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        self._buffer = np.empty(max(0, capacity) + PAGE, np.uint8)  # room to page-align
        self._address = int(self._buffer.ctypes.data)
        self._live: deque[tuple[int, int]] = deque()  # (begin, end), oldest first
        self._head = 0
        self._lock = threading.Lock()

    def empty(
        self, shape: tuple[int, ...], dtype: str, page_phase: int = 0
    ) -> tuple[Any, RingToken]:
        """An uninitialised array (Bf16Array for bfloat16) whose first byte lies `page_phase`
        bytes into a memory page, and the token that releases it (None: the array is not from
        the ring and needs no release)."""
        storage = by_name(dtype).storage
        nbytes = math.prod(shape) * storage.itemsize
        with self._lock:
            token = self._place(self.slot_bytes(nbytes))
        if token is None:
            raw = np.empty(shape, storage)
        else:
            # Slots start page-aligned in memory; shift to the phase (itemsize divides it
            # whenever it matters: the writer only asks for phases of its own file layout).
            shift = page_phase % PAGE
            shift -= shift % storage.itemsize
            begin = token[0] + (-self._address % PAGE) + shift
            raw = self._buffer[begin : begin + nbytes].view(storage).reshape(shape)
        return (arrays.Bf16Array(raw) if dtype == "bfloat16" else raw), token

    @staticmethod
    def slot_bytes(nbytes: int) -> int:
        """Ring bytes an array of `nbytes` takes: whole pages, with room for any page phase."""
        return _round_up(max(nbytes, 1) + PAGE, PAGE)

    def release(self, token: RingToken) -> None:
        """Give back the oldest outstanding array (tokens must come back in order)."""
        if token is None:
            return
        with self._lock:
            if not self._live or self._live[0] != token:
                raise RuntimeError("output ring: arrays released out of order")
            self._live.popleft()

    def _place(self, size: int) -> RingToken:
        capacity = len(self._buffer) - PAGE
        if not self._live:
            self._head = 0
        oldest = self._live[0][0] if self._live else capacity
        if self._live and self._head <= oldest:  # wrapped: free space is [head, oldest)
            begin = self._head if self._head + size <= oldest else None
        elif self._head + size <= capacity:  # free space is [head, capacity) and [0, oldest)
            begin = self._head
        else:
            begin = 0 if size <= oldest else None
        if begin is None:
            return None
        token = (begin, begin + size)
        self._live.append(token)
        self._head = begin + size
        return token
