"""The columns plan (2 launches): groups made of many short runs (F < 32, the channels-last norms).

Reading such runs one by one would waste most of each memory transaction, so
threads own columns of the ``[A, B, C*F]`` slab and walk its rows: every warp
reads whole rows.  A block covers a tile of TW columns (all of them, or whole
groups filling TPB) with ``RL = TPB // TW`` row lanes, over one of R chunks of
the rows; grid (A * tiles, R).  Moments: the block folds its columns' sums
into per-group sums, and partial sums of the R chunks meet as in the rows
plan (the last block of a tile finishes its groups).  Apply: each thread's
column has one scale and shift.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from . import group
from .group import deposit, withdraw
from .launcher import Launcher, grid
from .tuning import BLOCK_ELEMS, MAX_GRID_Y, MAX_ROW_CHUNKS, TPB


@cuda.jit(device=True)
def _block_tile(B, C, F, TW, R):
    """(unit, a, tile, RL, ty, w, b0, b1): this block's slab a and tile, this thread's row lane ty,
    column w, and the block's rows b0..b1."""
    tid = cuda.threadIdx.x
    W = C * F
    ntiles = (W + TW - 1) // TW
    unit = cuda.blockIdx.x
    r = cuda.blockIdx.y
    a = unit // ntiles
    tile = unit - a * ntiles
    RL = TPB // TW
    tx = tid % TW
    ty = tid // TW
    w = tile * TW + tx
    b0 = r * B // R
    b1 = (r + 1) * B // R
    return unit, a, tile, RL, ty, w, b0, b1


@cuda.jit(device=True)
def _fold(s1, s2, ng, TW, F, RL):
    """Thread g < ng gets the sums of the tile's group g over all row lanes (others get zeros).

    Every thread of the block must call this (it synchronizes the block).
    """
    tid = cuda.threadIdx.x
    sh1 = cuda.shared.array(TPB, np.float64)
    sh2 = cuda.shared.array(TPB, np.float64)
    sh1[tid] = s1
    sh2[tid] = s2
    cuda.syncthreads()
    t1 = 0.0
    t2 = 0.0
    if tid < ng:
        for ly in range(RL):
            for ff in range(F):
                t1 += sh1[ly * TW + tid * F + ff]
                t2 += sh2[ly * TW + tid * F + ff]
    return t1, t2


@cuda.jit(device=True)
def _last_to_arrive(cnt, unit, R):
    """Whether this block is the last of the R sharing its tile (it resets the counter); all threads call it."""
    flag = cuda.shared.array(1, np.int32)
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        old = cuda.atomic.add(cnt, unit, 1)
        flag[0] = 1 if old == R - 1 else 0
        if old == R - 1:
            cnt[unit] = 0
    cuda.syncthreads()
    return flag[0] == 1


def build(CT, BF16: bool):
    """{"col_moments", "col_apply"} launchers for compute type ``CT`` (bfloat16 bits with ``BF16``)."""
    finish, add_run, scale_run = group.build(CT, BF16)
    load, store = group.codec(CT, BF16)

    @cuda.jit
    def col_moments(x, acc, cnt, out, A, B, C, F, TW, R, eps, rms):
        """Grid (A * tiles, R): threads sum their columns, then thread g finishes (or deposits) group g."""
        tid = cuda.threadIdx.x
        unit, a, tile, RL, ty, w, b0, b1 = _block_tile(B, C, F, TW, R)
        W = C * F
        slab = a * B * W
        s1 = 0.0
        s2 = 0.0
        if ty < RL and w < W:
            c = w // F
            k0 = np.float64(load(x, slab + c * F))
            s1, s2 = add_run(x, slab + (b0 + ty) * W + w, slab + b1 * W + w, RL * W, k0, s1, s2)
        GT = TW // F
        g0 = tile * GT
        ng = min(GT, C - g0)  # the tile's groups: thread g < ng speaks for group g0 + g
        t1, t2 = _fold(s1, s2, ng, TW, F, RL)
        grp = a * C + g0 + tid
        nf = np.float64(B * F)
        if tid < ng:
            if R == 1:
                k0 = np.float64(load(x, slab + (g0 + tid) * F))
                finish(out, grp, A * C, k0, t1, t2, nf, eps, rms)
            else:
                deposit(acc, grp, t1, t2)
        if R == 1:
            return
        # every thread must arrive (the call synchronizes the block): tid < ng second
        if _last_to_arrive(cnt, unit, R) and tid < ng:
            t1, t2 = withdraw(acc, grp)
            k0 = np.float64(load(x, slab + (g0 + tid) * F))
            finish(out, grp, A * C, k0, t1, t2, nf, eps, rms)

    @cuda.jit
    def col_apply(x, gh, out, y, A, B, C, D, E, TW, R):
        """Grid (A * tiles, R) like col_moments: each thread's column has one scale and shift."""
        F = D * E
        unit, a, tile, RL, ty, w, b0, b1 = _block_tile(B, C, F, TW, R)
        W = C * F
        if ty >= RL or w >= W:
            return
        c = w // F
        d = (w - c * F) // E
        CD = C * D
        gi = c * D + d
        j = 2 * A * C + 3 * (a * C + c)
        hi = CT(out[j])
        lo = CT(out[j + 1])
        sc = CT(out[j + 2]) * CT(gh[gi])
        sh = CT(gh[CD + gi])
        slab = a * B * W
        scale_run(x, y, slab + (b0 + ty) * W + w, slab + b1 * W + w, RL * W, hi, lo, sc, sh)

    return {"col_moments": Launcher(col_moments), "col_apply": Launcher(col_apply)}


def _tiles(view) -> tuple:
    """(TW, tiles, rows per block): columns per tile (all of them when W <= TPB, else whole
    groups filling TPB), tiles per slab, and the rows a block aims to cover."""
    A, B, C, D, E = view
    F = D * E
    W = C * F
    TW = W if W <= TPB else (TPB // F) * F
    rows_per_block = max(TPB // TW, BLOCK_ELEMS // TW)
    return TW, -(-W // TW), rows_per_block


def moments(kernels, key, x1, scratch, out, view, eps: float, rms: int) -> None:
    """Moments and apply parameters of every group into ``out``."""
    A, B, C, D, E = view
    TW, tiles, rows_per_block = _tiles(view)
    R = max(1, min(-(-B // rows_per_block), MAX_ROW_CHUNKS))
    acc, cnt = scratch.get(A * C, A * tiles)
    kernels["col_moments"](key, grid(A * tiles, R), grid(TPB), x1, acc, cnt, out, A, B, C, D * E, TW, R, eps, rms)


def apply(kernels, key, x1, gh, out, y1, view) -> None:
    """y from x and the apply parameters in ``out``."""
    A, B, C, D, E = view
    TW, tiles, rows_per_block = _tiles(view)
    R = min(-(-B // rows_per_block), MAX_GRID_Y)
    kernels["col_apply"](key, grid(A * tiles, R), grid(TPB), x1, gh, out, y1, A, B, C, D, E, TW, R)
