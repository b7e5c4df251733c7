"""Device buffers kept between calls: scratch accumulators, result buffers, affine tables.

Allocations and synchronous host-to-device copies stall the launches queued
behind them, so what calls need again is kept.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import cuda

_lock = threading.Lock()


class Scratch:
    """Zeroed float64 accumulators and int32 counters the finishing blocks leave zeroed again."""

    def __init__(self):
        self.acc = None
        self.cnt = None

    def get(self, groups: int, units: int):
        with _lock:
            if self.acc is None or self.acc.size < 2 * groups:
                self.acc = cuda.to_device(np.zeros(max(2 * groups, 1024)))
            if self.cnt is None or self.cnt.size < units:
                self.cnt = cuda.to_device(np.zeros(max(units, 1024), np.int32))
            return self.acc, self.cnt


class Results:
    """Per-call result buffers, reused: a device float64 buffer and a pinned host twin.

    A call checks a pair out and returns it after its copy to the host, so
    concurrent calls never share one; reuse saves an allocation and makes the
    one device-to-host copy a pinned (fast) one.
    """

    def __init__(self):
        self.free: dict = {}

    def take(self, n: int):
        with _lock:
            stack = self.free.get(n)
            if stack:
                return stack.pop()
        return cuda.device_array(n, np.float64), cuda.pinned_array(n, np.float64)

    def give(self, n: int, pair) -> None:
        with _lock:
            stack = self.free.setdefault(n, [])
            if len(stack) < 4:
                stack.append(pair)
            if len(self.free) > 256:
                self.free.clear()

    def moments(self, n: int, pair, A: int, C: int):
        """Copy the moments back (waits for the launches) and release the pair."""
        dev, host_buf = pair
        dev.copy_to_host(host_buf)
        o = host_buf[: 2 * A * C].reshape(A, C, 2)
        mean, m2 = o[..., 0].copy(), o[..., 1].copy()
        self.give(n, pair)
        return mean, m2


scratch = Scratch()
results = Results()
_TABLES: dict = {}


def tables(g: np.ndarray, h: np.ndarray, ct):
    """gamma and beta tables packed as one flat device array [g.ravel(), h.ravel()] of compute type.

    Tables are never written once built (ops builds fresh ones from gamma and
    beta, and caches the unit tables), so a device copy is reused for as long
    as the very same host objects come back: the unit tables are uploaded
    once per (C, D), and a call without gamma/beta makes no host-to-device
    copy (a synchronous one would stall the launches behind it).
    """
    key = (id(g), id(h), ct)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is g and hit[1] is h:
        return hit[2]
    packed = np.concatenate((g.ravel(), h.ravel())).astype(ct)
    dev = cuda.to_device(packed)
    with _lock:
        if len(_TABLES) >= 64:
            _TABLES.clear()
        _TABLES[key] = (g, h, dev)
    return dev
