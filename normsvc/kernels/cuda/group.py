"""Device functions every launch plan uses on one group: sums, statistics, and scaling.

Sums are shifted by the group's first element k0 (float64), formed and
accumulated in float64 (see the package docstring).  Partial sums of
groups split over several blocks meet in a float64 accumulator ``acc``
(``acc[2*grp:2*grp+2]``); the block that finishes a group takes them out and
leaves the accumulator zeroed for the next launch.

Finishing a group writes one small float64 buffer ``out``: the moments
``out[2*grp:2*grp+2] = mean, m2`` and the apply parameters
``out[2*AC + 3*grp:...+3] = mean_hi, mean_lo, p`` (mean split into its value
in CT and the remainder, p = rsqrt(var + eps)), so the apply pass needs no
host round trip.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

from .tuning import FULL_MASK, MAX_BLOCK, MAX_WARPS, SHUFFLE, SIM

if SIM:  # the simulator runs device functions as Python, and has no libdevice

    @cuda.jit(device=True)
    def _bf16_to_float(u):
        return np.uint32(int(u) << 16).view(np.float32)

    @cuda.jit(device=True)
    def _float_bits(v):
        return int(np.float32(v).view(np.uint32))

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _bf16_to_float(u):
        return libdevice.int_as_float(np.int32(np.int64(u) << 16))

    @cuda.jit(device=True)
    def _float_bits(v):
        return np.int64(libdevice.float_as_int(v)) & 0xFFFFFFFF


@cuda.jit(device=True)
def _float_to_bf16(v):
    """float32 -> bfloat16 bits, rounded to nearest even (NaN stays NaN), as torch and ml_dtypes round."""
    b = _float_bits(v)
    if v != v:
        return np.uint16((b >> 16) | 0x40)
    return np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)


@functools.cache
def codec(CT, BF16: bool):
    """(load, store): read x[i] in the compute type ``CT``, write v into y[i] in y's own type.

    bfloat16 data travel as their uint16 bits (numba has no bfloat16 arrays):
    with ``BF16`` the bits are widened to float32 on load and rounded back on
    store; otherwise a plain conversion.
    """
    if BF16:

        @cuda.jit(device=True)
        def load(x, i):
            return _bf16_to_float(x[i])

        @cuda.jit(device=True)
        def store(y, i, v):
            y[i] = _float_to_bf16(v)

    else:

        @cuda.jit(device=True)
        def load(x, i):
            return CT(x[i])

        @cuda.jit(device=True)
        def store(y, i, v):
            y[i] = v

    return load, store


@cuda.jit(device=True)
def team_sum(s1, s2, lane, team, tx):
    """Sum (s1, s2) over the ``tx`` threads (a power of two) of each team; all get the totals.

    Every thread of the block must call this (it may synchronize the block).
    """
    if SHUFFLE:
        off = 16
        while off > 0:
            s1 += cuda.shfl_xor_sync(FULL_MASK, s1, off)
            s2 += cuda.shfl_xor_sync(FULL_MASK, s2, off)
            off //= 2
        if tx > 32:
            w1 = cuda.shared.array(MAX_WARPS, np.float64)
            w2 = cuda.shared.array(MAX_WARPS, np.float64)
            tid = cuda.threadIdx.x
            if tid % 32 == 0:
                w1[tid // 32] = s1
                w2[tid // 32] = s2
            cuda.syncthreads()
            nw = tx // 32
            first = team * nw
            s1 = 0.0
            s2 = 0.0
            for w in range(nw):
                s1 += w1[first + w]
                s2 += w2[first + w]
        return s1, s2
    sh1 = cuda.shared.array(MAX_BLOCK, np.float64)
    sh2 = cuda.shared.array(MAX_BLOCK, np.float64)
    tid = team * tx + lane
    sh1[tid] = s1
    sh2[tid] = s2
    cuda.syncthreads()
    st = tx // 2
    while st > 0:
        if lane < st:
            sh1[tid] += sh1[tid + st]
            sh2[tid] += sh2[tid + st]
        cuda.syncthreads()
        st //= 2
    return sh1[team * tx], sh2[team * tx]


@cuda.jit(device=True)
def _inv_sqrt(v):
    # 1/sqrt(0) is inf, as on the CPU path (and no division-by-zero branch).
    if v == 0.0:
        return math.inf
    return 1.0 / math.sqrt(v)


@cuda.jit(device=True)
def group_stats(k0, s1, s2, n, eps, rms):
    """(mean, m2, centre, p) in float64 from a group's sums shifted by k0 (centre: 0 for RMS norm)."""
    mean = k0 + s1 / n
    m2 = max(s2 - s1 * s1 / n, 0.0)
    var = m2 / n
    if rms:
        mc = 0.0
        p = _inv_sqrt(var + mean * mean + eps)
    else:
        mc = mean
        p = _inv_sqrt(var + eps)
    return mean, m2, mc, p


@cuda.jit(device=True)
def deposit(acc, grp, s1, s2):
    """Add a block's partial sums into the group's accumulator, visible before the block reports in."""
    cuda.atomic.add(acc, 2 * grp, s1)
    cuda.atomic.add(acc, 2 * grp + 1, s2)
    cuda.threadfence()


@cuda.jit(device=True)
def withdraw(acc, grp):
    """The group's accumulated sums (atomic reads: other blocks' adds are visible), leaving zeros."""
    t1 = cuda.atomic.add(acc, 2 * grp, 0.0)
    t2 = cuda.atomic.add(acc, 2 * grp + 1, 0.0)
    acc[2 * grp] = 0.0
    acc[2 * grp + 1] = 0.0
    return t1, t2


@functools.cache
def build(CT, BF16: bool):
    """(finish, add_run, scale_run): the device functions that depend on the compute type ``CT``
    (and on the data being bfloat16 bits, see :func:`codec`).

    Built once per type, so that every plan's kernels share them.
    """
    load, store = codec(CT, BF16)

    @cuda.jit(device=True)
    def finish(out, grp, AC, k0, s1, s2, n, eps, rms):
        """Write the group's moments and apply parameters into ``out`` from its shifted sums."""
        mean, m2, mc, p = group_stats(k0, s1, s2, n, eps, rms)
        out[2 * grp] = mean
        out[2 * grp + 1] = m2
        hi = np.float64(CT(mc))
        j = 2 * AC + 3 * grp
        out[j] = hi
        out[j + 1] = mc - hi
        out[j + 2] = p

    @cuda.jit(device=True)
    def add_run(x, o, end, step, k0, s1, s2):
        """(s1, s2) plus the sums of x[i] - k0 (and squares) for i = o, o + step, ... below ``end``.

        Unrolled by four so that each thread has four loads in flight.
        """
        while o + 3 * step < end:
            t0 = np.float64(load(x, o)) - k0
            t1 = np.float64(load(x, o + step)) - k0
            t2 = np.float64(load(x, o + 2 * step)) - k0
            t3 = np.float64(load(x, o + 3 * step)) - k0
            s1 += (t0 + t1) + (t2 + t3)
            s2 += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)
            o += 4 * step
        while o < end:
            t0 = np.float64(load(x, o)) - k0
            s1 += t0
            s2 += t0 * t0
            o += step
        return s1, s2

    @cuda.jit(device=True)
    def scale_run(x, y, o, end, step, hi, lo, sc, sh):
        """y[i] = ((x[i] - hi) - lo) * sc + sh for i = o, o + step, ... below ``end`` (four in flight)."""
        while o + 3 * step < end:
            v0 = load(x, o)
            v1 = load(x, o + step)
            v2 = load(x, o + 2 * step)
            v3 = load(x, o + 3 * step)
            store(y, o, ((v0 - hi) - lo) * sc + sh)
            store(y, o + step, ((v1 - hi) - lo) * sc + sh)
            store(y, o + 2 * step, ((v2 - hi) - lo) * sc + sh)
            store(y, o + 3 * step, ((v3 - hi) - lo) * sc + sh)
            o += 4 * step
        while o < end:
            store(y, o, ((load(x, o) - hi) - lo) * sc + sh)
            o += step

    return finish, add_run, scale_run
