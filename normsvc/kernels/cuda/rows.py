"""The rows plan (2 launches): large groups whose elements come in runs of F >= 32.

Channels-first batch/group norm and long rows.  Both passes use the grid
(group, split): the ``Sb * Sf`` blocks of a group share its B runs (``Sb``
slices of runs) and each run (``Sf`` slices of it).  Moments: each block
reduces its slice and adds its sums into the group's float64 accumulator;
the last block of a group (atomic counter) finishes it.  Apply: one
scale/shift per run of E elements.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from . import group
from .group import deposit, team_sum, withdraw
from .launcher import Launcher, grid
from .tuning import BLOCK_ELEMS, MAX_GRID_Y, TPB


@cuda.jit(device=True)
def _block_slice(B, C, F, Sb, Sf):
    """(grp, c, base, b0, b1, f0, f1): this block's group, and runs b0..b1, elements f0..f1 of each."""
    grp = cuda.blockIdx.x
    s = cuda.blockIdx.y
    sb = s // Sf
    sf = s - sb * Sf
    b0 = sb * B // Sb
    b1 = (sb + 1) * B // Sb
    f0 = sf * F // Sf
    f1 = (sf + 1) * F // Sf
    a = grp // C
    c = grp - a * C
    base = (a * B * C + c) * F
    return grp, c, base, b0, b1, f0, f1


def build(CT, BF16: bool):
    """{"row_moments", "row_apply"} launchers for compute type ``CT`` (bfloat16 bits with ``BF16``)."""
    finish, add_run, scale_run = group.build(CT, BF16)
    load, store = group.codec(CT, BF16)

    @cuda.jit
    def row_moments(x, acc, cnt, out, A, B, C, F, Sb, Sf, eps, rms):
        """Grid (A*C, Sb*Sf): block (grp, s) reduces its slice of the group's runs."""
        tid = cuda.threadIdx.x
        grp, c, base, b0, b1, f0, f1 = _block_slice(B, C, F, Sb, Sf)
        S = Sb * Sf
        CF = C * F
        k0 = np.float64(load(x, base))
        s1 = 0.0
        s2 = 0.0
        for b in range(b0, b1):
            row = base + b * CF
            s1, s2 = add_run(x, row + f0 + tid, row + f1, TPB, k0, s1, s2)
        s1, s2 = team_sum(s1, s2, tid, 0, TPB)
        nf = np.float64(B * F)
        if S == 1:
            if tid == 0:
                finish(out, grp, A * C, k0, s1, s2, nf, eps, rms)
            return
        if tid == 0:
            deposit(acc, grp, s1, s2)
            old = cuda.atomic.add(cnt, grp, 1)
            if old == S - 1:  # the group's last block: all others' sums are in
                t1, t2 = withdraw(acc, grp)
                cnt[grp] = 0
                finish(out, grp, A * C, k0, t1, t2, nf, eps, rms)

    @cuda.jit
    def row_apply(x, gh, out, y, A, B, C, D, E, Sb, Sf):
        """Grid (A*C, Sb*Sf) like row_moments: y = ((x - hi) - lo) * (p * g) + h over the block's runs."""
        tid = cuda.threadIdx.x
        F = D * E
        grp, c, base, b0, b1, f0, f1 = _block_slice(B, C, F, Sb, Sf)
        CF = C * F
        CD = C * D
        j = 2 * A * C + 3 * grp
        hi = CT(out[j])
        lo = CT(out[j + 1])
        p = CT(out[j + 2])
        if E == 1:
            # the affine parameters change with every element (layer norm)
            for b in range(b0, b1):
                row = base + b * CF
                for f in range(f0 + tid, f1, TPB):
                    gi = c * D + f
                    store(y, row + f, ((load(x, row + f) - hi) - lo) * (p * CT(gh[gi])) + CT(gh[CD + gi]))
            return
        for d in range(f0 // E, (f1 + E - 1) // E):
            lo_f = max(f0, d * E)
            hi_f = min(f1, d * E + E)
            gi = c * D + d
            sc = p * CT(gh[gi])
            sh = CT(gh[CD + gi])
            for b in range(b0, b1):
                row = base + b * CF
                scale_run(x, y, row + lo_f + tid, row + hi_f, TPB, hi, lo, sc, sh)

    return {"row_moments": Launcher(row_moments), "row_apply": Launcher(row_apply)}


def split(B: int, F: int) -> tuple:
    """(Sb, Sf): how many blocks share one group's runs (Sb) and each run (Sf)."""
    want = min(max(1, -(-(B * F) // BLOCK_ELEMS)), MAX_GRID_Y)
    if want == 1:
        return 1, 1
    if B >= want:
        return want, 1
    sb = B
    sf = max(1, min(-(-want // sb), -(-F // TPB)))
    return sb, sf


def moments(kernels, key, x1, scratch, out, view, eps: float, rms: int) -> None:
    """Moments and apply parameters of every group into ``out``."""
    A, B, C, D, E = view
    F = D * E
    sb, sf = split(B, F)
    acc, cnt = scratch.get(A * C, A * C)
    kernels["row_moments"](key, grid(A * C, sb * sf), grid(TPB), x1, acc, cnt, out, A, B, C, F, sb, sf, eps, rms)


def apply(kernels, key, x1, gh, out, y1, view) -> None:
    """y from x and the apply parameters in ``out``."""
    A, B, C, D, E = view
    sb, sf = split(B, D * E)
    kernels["row_apply"](key, grid(A * C, sb * sf), grid(TPB), x1, gh, out, y1, A, B, C, D, E, sb, sf)
