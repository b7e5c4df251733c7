"""The fused plan (1 launch): one team of threads owns a group and keeps it in registers.

A group of at most ``PER * MAX_TEAM`` elements is owned by one team of
threads (a warp up to a whole block; several teams per block for small
groups).  The team loads its group into registers, reduces the shifted sums,
writes the moments and normalizes from the registers: x is read once and y
written once, and the result is reproducible bit for bit.  Layer/RMS norm, and
instance/group norm channels-first at moderate sizes, take this path.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from .group import codec, group_stats, team_sum
from .launcher import Launcher, grid
from .tuning import FUSED_BLOCK, PER


@cuda.jit(device=True)
def _locate(j, base, B, F, CF):
    """(offset in x, position f in its run) of element j of the group that starts at ``base``."""
    if B == 1:
        return base + j, j
    b = j // F
    f = j - b * F
    return base + b * CF + f, f


def build(CT, BF16: bool):
    """{"fused": launcher} for compute type ``CT`` (bfloat16 bits with ``BF16``)."""
    load, store = codec(CT, BF16)

    @cuda.jit
    def fused(x, gh, out, y, A, B, C, D, E, tx, eps, rms):
        """One team of ``tx`` threads per group: moments and apply from registers."""
        tid = cuda.threadIdx.x
        lane = tid % tx
        team = tid // tx
        grp = cuda.blockIdx.x * (cuda.blockDim.x // tx) + team
        AC = A * C
        active = grp < AC
        a = grp // C
        c = grp - a * C
        F = D * E
        n = B * F
        CF = C * F
        CD = C * D
        base = (a * B * C + c) * F
        vals = cuda.local.array(PER, CT)
        k0 = 0.0
        if active:
            k0 = np.float64(load(x, base))
        s1 = 0.0
        s2 = 0.0
        for k in range(PER):
            j = lane + k * tx
            if active and j < n:
                off, f = _locate(j, base, B, F, CF)
                v = load(x, off)
                vals[k] = v
                t = np.float64(v) - k0
                s1 += t
                s2 += t * t
        # every thread takes part (the sum may synchronize the block), inactive teams too
        s1, s2 = team_sum(s1, s2, lane, team, tx)
        if not active:
            return
        mean, m2, mc, p64 = group_stats(k0, s1, s2, np.float64(n), eps, rms)
        if lane == 0:
            out[2 * grp] = mean
            out[2 * grp + 1] = m2
        p = CT(p64)
        hi = CT(mc)
        lo = CT(mc - np.float64(hi))
        for k in range(PER):
            j = lane + k * tx
            if j < n:
                off, f = _locate(j, base, B, F, CF)
                if E == 1:
                    d = f
                elif D == 1:
                    d = 0
                else:
                    d = f // E
                gi = c * D + d
                store(y, off, ((vals[k] - hi) - lo) * (p * CT(gh[gi])) + CT(gh[CD + gi]))

    return {"fused": Launcher(fused)}


def team(n: int) -> int:
    """Threads per team for a group of n elements: a power of two from a warp up, PER values each."""
    tx = 32
    while tx * PER < n:
        tx *= 2
    return tx


def launch(kernels, key, x1, gh, out, y1, view, eps: float, rms: int) -> None:
    """Moments into ``out`` and y into ``y1``, in one launch."""
    A, B, C, D, E = view
    AC = A * C
    tx = team(B * D * E)
    teams = max(1, FUSED_BLOCK // tx)
    kernels["fused"](key, grid(-(-AC // teams)), grid(tx * teams), x1, gh, out, y1, A, B, C, D, E, tx, eps, rms)
