"""Numba CPU kernels over the canonical view (see normsvc.plan).

Two passes cover every norm:

* ``moments(x)`` with ``x`` viewed as ``[A, B, C, F]`` (F = D*E merged):
  per-(a, c) mean and m2 over b and f.
* ``apply(x, p, q, g, h, out)`` with ``x`` viewed as ``[A, B, C, D, E]``:
  ``out = (x * p[a, c] + q[a, c]) * g[c, d] + h[c, d]``, folded per task into
  one scale and one shift per (c, d).

Numerics: sums are shifted by the first element of each group and
accumulated in float64, so float32 data with |mean| = 1e4 * std still gives
the variance to ~1e-7 relative; partial sums from parallel tasks share the
shift and simply add.

Threading: numba's default ``workqueue`` layer aborts when two threads call a
parallel function at once, and the gRPC server does exactly that, so this
module selects a thread-safe layer (TBB if installed, else OpenMP) unless
``NUMBA_THREADING_LAYER`` says otherwise.  Inputs below ``SERIAL_BELOW``
elements take the serial variants: thread start-up costs more than they do.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from numba import njit, prange

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"

__all__ = ["moments", "apply", "SERIAL_BELOW", "threading_layer"]

#: Inputs with fewer elements than this run single-threaded (see docs/benchmarks.md).
SERIAL_BELOW = 1 << 16
#: Parallel tasks per thread: a little over-decomposition evens out the load.
TASKS_PER_THREAD = 4

_FASTMATH = {"reassoc", "contract"}  # vectorised reductions; NaN/Inf still propagate
_OPTS = dict(cache=True, nogil=True, fastmath=_FASTMATH)


@njit(**_OPTS)
def _moments_task(x, shift, a, b0, b1, s1, s2):
    """Shifted sums of x[a, b0:b1, :, :] into s1[c], s2[c] (float64)."""
    C, F = x.shape[2], x.shape[3]
    if F == 1:
        # channels-last: the contiguous axis is c, so vectorise across groups
        for c in range(C):
            s1[c] = 0.0
            s2[c] = 0.0
        for b in range(b0, b1):
            row = x[a, b, :, 0]
            for c in range(C):
                v = np.float64(row[c]) - shift[a, c]
                s1[c] += v
                s2[c] += v * v
    else:
        for c in range(C):
            k = shift[a, c]
            t1 = 0.0
            t2 = 0.0
            for b in range(b0, b1):
                seg = x[a, b, c, :]
                for f in range(F):
                    v = np.float64(seg[f]) - k
                    t1 += v
                    t2 += v * v
            s1[c] = t1
            s2[c] = t2


@njit(**_OPTS)
def _moments_serial(x, shift, nb, s1, s2):
    B = x.shape[1]
    for t in range(x.shape[0] * nb):
        a, j = t // nb, t % nb
        _moments_task(x, shift, a, j * B // nb, (j + 1) * B // nb, s1[a, j], s2[a, j])


@njit(parallel=True, **_OPTS)
def _moments_parallel(x, shift, nb, s1, s2):
    B = x.shape[1]
    for t in prange(x.shape[0] * nb):
        a, j = t // nb, t % nb
        _moments_task(x, shift, a, j * B // nb, (j + 1) * B // nb, s1[a, j], s2[a, j])


@njit(**_OPTS)
def _finish_moments(x, shift, s1, s2, mean, m2):
    """Sum the per-task partials and turn shifted sums into mean and m2."""
    A, nb, C = s1.shape
    n = np.float64(x.shape[1] * x.shape[3])
    for a in range(A):
        for c in range(C):
            t1 = 0.0
            t2 = 0.0
            for j in range(nb):
                t1 += s1[a, j, c]
                t2 += s2[a, j, c]
            mean[a, c] = shift[a, c] + t1 / n
            m2[a, c] = max(t2 - t1 * t1 / n, 0.0)


@njit(**_OPTS)
def _apply_task(x, p, q, g, h, a, b0, b1, out, s, t):
    """out[a, b0:b1] = x * s + t with s, t folded per (c, d) for this a."""
    C, D, E = x.shape[2], x.shape[3], x.shape[4]
    for c in range(C):
        for d in range(D):
            s[c * D + d] = p[a, c] * g[c, d]
            t[c * D + d] = q[a, c] * g[c, d] + h[c, d]
    if E == 1:
        CD = C * D
        for b in range(b0, b1):
            xr = x[a, b].reshape(CD)
            yr = out[a, b].reshape(CD)
            for k in range(CD):
                yr[k] = np.float64(xr[k]) * s[k] + t[k]
    else:
        for b in range(b0, b1):
            for c in range(C):
                for d in range(D):
                    sk = s[c * D + d]
                    tk = t[c * D + d]
                    xr = x[a, b, c, d]
                    yr = out[a, b, c, d]
                    for e in range(E):
                        yr[e] = np.float64(xr[e]) * sk + tk


@njit(**_OPTS)
def _apply_serial(x, p, q, g, h, nb, out):
    B = x.shape[1]
    CD = x.shape[2] * x.shape[3]
    s = np.empty(CD)
    t = np.empty(CD)
    for k in range(x.shape[0] * nb):
        a, j = k // nb, k % nb
        _apply_task(x, p, q, g, h, a, j * B // nb, (j + 1) * B // nb, out, s, t)


@njit(parallel=True, **_OPTS)
def _apply_parallel(x, p, q, g, h, nb, out):
    B = x.shape[1]
    CD = x.shape[2] * x.shape[3]
    for k in prange(x.shape[0] * nb):
        a, j = k // nb, k % nb
        s = np.empty(CD)
        t = np.empty(CD)
        _apply_task(x, p, q, g, h, a, j * B // nb, (j + 1) * B // nb, out, s, t)


def _chunks(A: int, B: int, parallel: bool) -> int:
    """How many b-chunks per a, so that A * chunks gives every thread enough tasks."""
    if not parallel:
        return 1
    want = numba.get_num_threads() * TASKS_PER_THREAD
    return max(1, min(B, -(-want // A)))


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-(a, c) mean and m2 (float64, shape (A, C)) of a C-contiguous x[A, B, C, F]."""
    A, B, C, _ = x.shape
    parallel = x.size >= SERIAL_BELOW
    nb = _chunks(A, B, parallel)
    shift = np.ascontiguousarray(x[:, 0, :, 0], dtype=np.float64)
    s1 = np.empty((A, nb, C))
    s2 = np.empty((A, nb, C))
    (_moments_parallel if parallel else _moments_serial)(x, shift, nb, s1, s2)
    mean = np.empty((A, C))
    m2 = np.empty((A, C))
    _finish_moments(x, shift, s1, s2, mean, m2)
    return mean, m2


def apply(x, p, q, g, h, out=None) -> np.ndarray:
    """``out = (x * p[a, c] + q[a, c]) * g[c, d] + h[c, d]`` for a C-contiguous x[A, B, C, D, E].

    p, q: float64 (A, C); g, h: float64 (C, D).  ``out`` has x's shape and
    dtype (allocated when None).
    """
    if out is None:
        out = np.empty_like(x)
    parallel = x.size >= SERIAL_BELOW
    nb = _chunks(x.shape[0], x.shape[1], parallel)
    (_apply_parallel if parallel else _apply_serial)(x, p, q, g, h, nb, out)
    return out


def threading_layer() -> str:
    """The numba threading layer in use (after the first parallel call)."""
    try:
        return numba.threading_layer()
    except ValueError:
        return "not yet started"
