"""numba.cuda kernels over the canonical view (see normsvc.plan), and the device-array plumbing.

Imported lazily by :mod:`normsvc.ops` (``import normsvc`` never imports
numba.cuda).  The view ``x[A, B, C, D, E]`` has statistics per group
``(a, c)`` reduced over ``b, d, e`` (F = D*E), affine tables per ``(c, d)``.
Three launch plans cover every norm and layout:

* **fused** (1 launch): a group of at most ``PER * MAX_TEAM`` elements is
  owned by one team of threads (a warp up to a whole block; several teams per
  block for small groups).  The team loads its group into registers, reduces
  the shifted sums, writes the moments and normalizes from the registers:
  x is read once and y written once.  Layer/RMS norm, and instance/group norm
  channels-first at moderate sizes, take this path.
* **rows** (2 launches): large groups whose elements come in runs of F >= 32
  (channels-first batch/group norm, long rows).  Moments: grid (group, split),
  each block reduces a slice of runs and adds its sums into the group's
  float64 accumulator; the last block of a group (atomic counter) finishes it.
  Apply: the same grid, one scale/shift per run of E elements.
* **columns** (2 launches): groups made of many short runs (F < 32, the
  channels-last norms).  Threads own columns of the [A, B, C*F] slab and walk
  rows, so every warp reads whole rows; partial sums meet as in rows.

Finishing a group (in whichever block finishes it) writes the moments
(mean, m2) and the apply parameters (mean split into hi + lo parts, and
p = rsqrt(var + eps)) into one small float64 buffer, so the apply pass needs
no host round trip; the moments reach the host in one copy at the end.

Numerics: each group's sums are shifted by its first element, as on the CPU,
and accumulated in float64 from the first add (shifted values are formed in
the compute type: float32 for float16/float32 data, float64 for float64).  On
an H100 float64 adds run at half the float32 rate, far above what a
memory-bound pass needs (3 adds per 4 bytes read).  The apply pass computes
``((x - mean_hi) - mean_lo) * (p * gamma) + beta`` in the compute type: with
mean_hi the mean rounded to it, ``x - mean_hi`` is exact where it matters
(|mean| >> std), so float32 output keeps ~1e-7 relative accuracy there too.
Partial sums meet through float64 atomics, so the rows/columns paths are
reproducible to float64 round-off, not bit for bit (the fused path is).

Launches go to the legacy default stream, which orders them with work on
PyTorch's and CuPy's default streams (work on other streams: synchronize
first).  Device memory lives on numba's current device (device 0 unless
``numba.cuda.select_device`` says otherwise): inputs on another GPU are not
supported yet.  Each kernel compiles on first use per input dtype (about a
second each on an H100); ``NORMSVC_CUDA_FASTLAUNCH=0`` turns off the direct
launch path (see ``_Launcher``) if a numba-cuda upgrade breaks it.
"""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np
from numba import cuda
from numba.core import config

__all__ = [
    "available",
    "require",
    "DeviceInput",
    "wrap",
    "host",
    "to_host",
    "normalize",
    "moments",
    "SIM",
]

#: Running under the numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
SIM = bool(config.ENABLE_CUDASIM)
#: The simulator has no warp shuffles: reductions there go through shared memory
#: (NORMSVC_CUDA_SHUFFLE=0 selects that path on a GPU too, to check it there).
SHUFFLE = not SIM and os.environ.get("NORMSVC_CUDA_SHUFFLE", "1") != "0"
#: Threads per block of the rows/columns kernels (a power of two).
TPB = 64 if SIM else 256
#: Values per thread held in registers by the fused kernel.
PER = 4 if SIM else 16
#: Most threads per group in the fused kernel (a power of two, >= 32).
MAX_TEAM = 64 if SIM else 512
#: Fused blocks hold at least this many threads (several teams when groups are small).
FUSED_BLOCK = 64 if SIM else 256
#: Runs shorter than this are read column-wise (the channels-last layouts).
MIN_RUN = 32
#: Elements each block of the rows/columns kernels aims to cover.
BLOCK_ELEMS = TPB * 4 if SIM else TPB * 32
#: Blocks the row chunks of one column tile are spread over, at most.
MAX_ROW_CHUNKS = 8 if SIM else 1024
#: Set NORMSVC_CUDA_FASTLAUNCH=0 to launch through the numba dispatcher every time.
FAST_LAUNCH = not SIM and os.environ.get("NORMSVC_CUDA_FASTLAUNCH", "1") != "0"

_SH = max(TPB, MAX_TEAM, FUSED_BLOCK)  # threads in any block we launch
_MAX_GRID_Y = 65535
_NW = _SH // 32
_FULL = 0xFFFFFFFF
_F64 = np.dtype(np.float64)


# ----------------------------------------------------------------------------
# device functions


@cuda.jit(device=True)
def _team_sum(s1, s2, lane, team, tx):
    """Sum (s1, s2) over the ``tx`` threads (a power of two) of each team; all get the totals.

    Every thread of the block must call this (it may synchronize the block).
    """
    if SHUFFLE:
        off = 16
        while off > 0:
            s1 += cuda.shfl_xor_sync(_FULL, s1, off)
            s2 += cuda.shfl_xor_sync(_FULL, s2, off)
            off //= 2
        if tx > 32:
            w1 = cuda.shared.array(_NW, np.float64)
            w2 = cuda.shared.array(_NW, np.float64)
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
    sh1 = cuda.shared.array(_SH, np.float64)
    sh2 = cuda.shared.array(_SH, np.float64)
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


# ----------------------------------------------------------------------------
# kernels, built once per compute type (float32 for float16/float32 data, float64 for float64)


def _build(CT):
    """The kernels for compute type ``CT`` (np.float32 or np.float64)."""

    @cuda.jit(device=True)
    def finish(out, grp, AC, k0, s1, s2, n, eps, rms):
        """Moments and apply parameters of one group from its shifted sums.

        out[2*grp:2*grp+2] = mean, m2; out[2*AC + 3*grp:...+3] = mean_hi, mean_lo, p.
        """
        mean = k0 + s1 / n
        m2 = max(s2 - s1 * s1 / n, 0.0)
        out[2 * grp] = mean
        out[2 * grp + 1] = m2
        var = m2 / n
        if rms:
            mc = 0.0
            p = _inv_sqrt(var + mean * mean + eps)
        else:
            mc = mean
            p = _inv_sqrt(var + eps)
        hi = np.float64(CT(mc))
        j = 2 * AC + 3 * grp
        out[j] = hi
        out[j + 1] = mc - hi
        out[j + 2] = p

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
        k0 = CT(0.0)
        if active:
            k0 = CT(x[base])
        s1 = 0.0
        s2 = 0.0
        for k in range(PER):
            j = lane + k * tx
            if active and j < n:
                if B == 1:
                    off = base + j
                else:
                    b = j // F
                    off = base + b * CF + (j - b * F)
                v = CT(x[off])
                vals[k] = v
                t = np.float64(v - k0)
                s1 += t
                s2 += t * t
        s1, s2 = _team_sum(s1, s2, lane, team, tx)
        if not active:
            return
        nf = np.float64(n)
        mean = np.float64(k0) + s1 / nf
        m2 = max(s2 - s1 * s1 / nf, 0.0)
        if lane == 0:
            out[2 * grp] = mean
            out[2 * grp + 1] = m2
        var = m2 / nf
        if rms:
            mc = 0.0
            p = CT(_inv_sqrt(var + mean * mean + eps))
        else:
            mc = mean
            p = CT(_inv_sqrt(var + eps))
        hi = CT(mc)
        lo = CT(mc - np.float64(hi))
        for k in range(PER):
            j = lane + k * tx
            if j < n:
                if B == 1:
                    f = j
                    off = base + j
                else:
                    b = j // F
                    f = j - b * F
                    off = base + b * CF + f
                if E == 1:
                    d = f
                elif D == 1:
                    d = 0
                else:
                    d = f // E
                gi = c * D + d
                y[off] = ((vals[k] - hi) - lo) * (p * CT(gh[gi])) + CT(gh[CD + gi])

    @cuda.jit
    def row_moments(x, acc, cnt, out, A, B, C, F, Sb, Sf, eps, rms):
        """Grid (A*C, Sb*Sf): block (grp, s) reduces runs b0..b1, elements f0..f1 of its group."""
        tid = cuda.threadIdx.x
        grp = cuda.blockIdx.x
        s = cuda.blockIdx.y
        S = Sb * Sf
        sb = s // Sf
        sf = s - sb * Sf
        b0 = sb * B // Sb
        b1 = (sb + 1) * B // Sb
        f0 = sf * F // Sf
        f1 = (sf + 1) * F // Sf
        a = grp // C
        c = grp - a * C
        CF = C * F
        base = (a * B * C + c) * F
        k0 = CT(x[base])
        s1 = 0.0
        s2 = 0.0
        for b in range(b0, b1):
            row = base + b * CF
            f = f0 + tid
            while f + 3 * TPB < f1:
                t0 = np.float64(CT(x[row + f]) - k0)
                t1 = np.float64(CT(x[row + f + TPB]) - k0)
                t2 = np.float64(CT(x[row + f + 2 * TPB]) - k0)
                t3 = np.float64(CT(x[row + f + 3 * TPB]) - k0)
                s1 += (t0 + t1) + (t2 + t3)
                s2 += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)
                f += 4 * TPB
            while f < f1:
                t0 = np.float64(CT(x[row + f]) - k0)
                s1 += t0
                s2 += t0 * t0
                f += TPB
        s1, s2 = _team_sum(s1, s2, tid, 0, TPB)
        nf = np.float64(B * F)
        if S == 1:
            if tid == 0:
                finish(out, grp, A * C, np.float64(k0), s1, s2, nf, eps, rms)
            return
        if tid == 0:
            cuda.atomic.add(acc, 2 * grp, s1)
            cuda.atomic.add(acc, 2 * grp + 1, s2)
            cuda.threadfence()
            old = cuda.atomic.add(cnt, grp, 1)
            if old == S - 1:
                t1 = cuda.atomic.add(acc, 2 * grp, 0.0)
                t2 = cuda.atomic.add(acc, 2 * grp + 1, 0.0)
                acc[2 * grp] = 0.0
                acc[2 * grp + 1] = 0.0
                cnt[grp] = 0
                finish(out, grp, A * C, np.float64(k0), t1, t2, nf, eps, rms)

    @cuda.jit
    def row_apply(x, gh, out, y, A, B, C, D, E, Sb, Sf):
        """Grid (A*C, Sb*Sf) like row_moments: y = ((x - hi) - lo) * (p * g) + h over the block's runs."""
        tid = cuda.threadIdx.x
        grp = cuda.blockIdx.x
        s = cuda.blockIdx.y
        sb = s // Sf
        sf = s - sb * Sf
        F = D * E
        b0 = sb * B // Sb
        b1 = (sb + 1) * B // Sb
        f0 = sf * F // Sf
        f1 = (sf + 1) * F // Sf
        a = grp // C
        c = grp - a * C
        CF = C * F
        CD = C * D
        base = (a * B * C + c) * F
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
                    y[row + f] = ((CT(x[row + f]) - hi) - lo) * (p * CT(gh[gi])) + CT(gh[CD + gi])
            return
        for d in range(f0 // E, (f1 + E - 1) // E):
            lo_f = max(f0, d * E)
            hi_f = min(f1, d * E + E)
            gi = c * D + d
            sc = p * CT(gh[gi])
            sh = CT(gh[CD + gi])
            for b in range(b0, b1):
                row = base + b * CF
                f = lo_f + tid
                while f + 3 * TPB < hi_f:
                    v0 = CT(x[row + f])
                    v1 = CT(x[row + f + TPB])
                    v2 = CT(x[row + f + 2 * TPB])
                    v3 = CT(x[row + f + 3 * TPB])
                    y[row + f] = ((v0 - hi) - lo) * sc + sh
                    y[row + f + TPB] = ((v1 - hi) - lo) * sc + sh
                    y[row + f + 2 * TPB] = ((v2 - hi) - lo) * sc + sh
                    y[row + f + 3 * TPB] = ((v3 - hi) - lo) * sc + sh
                    f += 4 * TPB
                while f < hi_f:
                    y[row + f] = ((CT(x[row + f]) - hi) - lo) * sc + sh
                    f += TPB

    @cuda.jit
    def col_moments(x, acc, cnt, out, A, B, C, F, TW, R, eps, rms):
        """Grid (A * tiles, R): threads own columns of a tile of TW columns, RL = TPB // TW row lanes."""
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
        slab = a * B * W
        b0 = r * B // R
        b1 = (r + 1) * B // R
        s1 = 0.0
        s2 = 0.0
        if ty < RL and w < W:
            c = w // F
            k0 = CT(x[slab + c * F])
            b = b0 + ty
            while b + 3 * RL < b1:
                o = slab + b * W + w
                t0 = np.float64(CT(x[o]) - k0)
                t1 = np.float64(CT(x[o + RL * W]) - k0)
                t2 = np.float64(CT(x[o + 2 * RL * W]) - k0)
                t3 = np.float64(CT(x[o + 3 * RL * W]) - k0)
                s1 += (t0 + t1) + (t2 + t3)
                s2 += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3)
                b += 4 * RL
            while b < b1:
                t0 = np.float64(CT(x[slab + b * W + w]) - k0)
                s1 += t0
                s2 += t0 * t0
                b += RL
        sh1 = cuda.shared.array(TPB, np.float64)
        sh2 = cuda.shared.array(TPB, np.float64)
        sh1[tid] = s1
        sh2[tid] = s2
        cuda.syncthreads()
        GT = TW // F
        g0 = tile * GT
        ng = min(GT, C - g0)
        grp = -1
        nf = np.float64(B * F)
        if tid < ng:
            t1 = 0.0
            t2 = 0.0
            for ly in range(RL):
                for ff in range(F):
                    t1 += sh1[ly * TW + tid * F + ff]
                    t2 += sh2[ly * TW + tid * F + ff]
            grp = a * C + g0 + tid
            if R == 1:
                k0 = np.float64(CT(x[slab + (g0 + tid) * F]))
                finish(out, grp, A * C, k0, t1, t2, nf, eps, rms)
            else:
                cuda.atomic.add(acc, 2 * grp, t1)
                cuda.atomic.add(acc, 2 * grp + 1, t2)
                cuda.threadfence()
        if R == 1:
            return
        flag = cuda.shared.array(1, np.int32)
        cuda.syncthreads()
        if tid == 0:
            old = cuda.atomic.add(cnt, unit, 1)
            flag[0] = 1 if old == R - 1 else 0
            if old == R - 1:
                cnt[unit] = 0
        cuda.syncthreads()
        if flag[0] == 1 and tid < ng:
            t1 = cuda.atomic.add(acc, 2 * grp, 0.0)
            t2 = cuda.atomic.add(acc, 2 * grp + 1, 0.0)
            acc[2 * grp] = 0.0
            acc[2 * grp + 1] = 0.0
            k0 = np.float64(CT(x[slab + (g0 + tid) * F]))
            finish(out, grp, A * C, k0, t1, t2, nf, eps, rms)

    @cuda.jit
    def col_apply(x, gh, out, y, A, B, C, D, E, TW, R):
        """Grid (A * tiles, R) like col_moments: each thread's column has one scale and shift."""
        tid = cuda.threadIdx.x
        F = D * E
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
        b = r * B // R + ty
        b1 = (r + 1) * B // R
        while b + 3 * RL < b1:
            o = slab + b * W + w
            v0 = CT(x[o])
            v1 = CT(x[o + RL * W])
            v2 = CT(x[o + 2 * RL * W])
            v3 = CT(x[o + 3 * RL * W])
            y[o] = ((v0 - hi) - lo) * sc + sh
            y[o + RL * W] = ((v1 - hi) - lo) * sc + sh
            y[o + 2 * RL * W] = ((v2 - hi) - lo) * sc + sh
            y[o + 3 * RL * W] = ((v3 - hi) - lo) * sc + sh
            b += 4 * RL
        while b < b1:
            o = slab + b * W + w
            y[o] = ((CT(x[o]) - hi) - lo) * sc + sh
            b += RL

    return {
        "fused": _Launcher(fused),
        "row_moments": _Launcher(row_moments),
        "row_apply": _Launcher(row_apply),
        "col_moments": _Launcher(col_moments),
        "col_apply": _Launcher(col_apply),
    }


@cuda.jit
def _gather(src, dst, shape, sstr, dstr, n):
    """dst[offset_d(i)] = src[offset_s(i)] over the multi-index i of ``shape`` (strides in elements)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nd = len(shape)
    while i < n:
        rem = i
        so = 0
        do = 0
        for k in range(nd - 1, -1, -1):
            q = rem // shape[k]
            idx = rem - q * shape[k]
            rem = q
            so += idx * sstr[k]
            do += idx * dstr[k]
        dst[do] = src[so]
        i += step


# ----------------------------------------------------------------------------
# launching


class _Launcher:
    """Launch a kernel with little Python work once it is compiled for a key.

    The first launch for a key goes through the numba dispatcher (typing and
    compiling); later ones call the compiled kernel's ``launch`` directly,
    skipping argument typing and overload lookup, with the arguments the
    dispatcher passes it: the same 3-D grid and block, and the stream object
    the launch configuration made of the default stream (numba-cuda 0.30
    launches through cuda.core, which takes a Stream, not the integer 0).
    The caller's key must determine every argument type (here: the input
    dtype and the rank of the gather's shape tuples; all arrays are 1-D and
    C-contiguous).
    """

    __slots__ = ("dispatcher", "compiled")

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.compiled = {}  # key -> (compiled kernel, stream)

    def __call__(self, key, grid, block, *args):
        hit = self.compiled.get(key)
        if hit is not None:
            hit[0].launch(args, grid, block, hit[1], 0)
            return
        configured = self.dispatcher[grid, block]
        configured(*args)
        if FAST_LAUNCH:
            try:
                types = tuple(self.dispatcher.typeof_pyval(a) for a in args)
                kernel = self.dispatcher.overloads.get(types)
                stream = configured.stream
            except Exception:  # an internal API changed: keep the dispatcher path
                kernel = None
            if kernel is not None and hasattr(kernel, "launch"):
                self.compiled[key] = (kernel, stream)


_KERNELS: dict = {}
_gather_launch = _Launcher(_gather)
_lock = threading.Lock()


def _kernels(ct):
    k = _KERNELS.get(ct)
    if k is None:
        with _lock:
            k = _KERNELS.get(ct)
            if k is None:
                k = _KERNELS[ct] = _build(ct.type)
    return k


def _grid(x: int, y: int = 1) -> tuple:
    return (int(x), int(y), 1)


# ----------------------------------------------------------------------------
# availability


_AVAILABLE = None


def available() -> bool:
    """Whether numba.cuda sees a usable GPU (or the simulator is on)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _AVAILABLE = bool(cuda.is_available())
        except Exception:
            _AVAILABLE = False
    return _AVAILABLE


def require(what: str = "device='cuda'") -> None:
    """Raise RuntimeError naming the problem when no usable GPU is present."""
    if available():
        return
    reason = ""
    try:
        err = cuda.cuda_error()
        reason = " (" + " ".join(str(err).split()) + ")" if err else ""
    except Exception:
        pass
    raise RuntimeError(
        f"{what} needs a usable CUDA GPU, but numba.cuda found none{reason}: "
        "check the NVIDIA driver and that the numba-cuda package is installed, "
        "or use device='cpu'"
    )


# ----------------------------------------------------------------------------
# device arrays


def _is_device_ndarray(obj) -> bool:
    return bool(getattr(obj, "__cuda_ndarray__", False))


class DeviceInput:
    """A validated CUDA (or host-to-CUDA) input: what ops needs to plan, and how to answer.

    ``kind`` is "numba", "torch", "cupy" (y comes back as that type) or "host"
    (a numpy array normalized on the GPU because device="cuda"; y comes back
    as numpy).  ``arr`` is the numba device array (None for host inputs).
    """

    __slots__ = ("obj", "arr", "kind", "shape", "ndim", "dtype", "size")

    def __init__(self, obj, arr, kind, shape, dtype):
        self.obj, self.arr, self.kind = obj, arr, kind
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)
        self.size = math.prod(self.shape)


def wrap(obj) -> DeviceInput:
    """Wrap a CUDA array (numba device array or anything with __cuda_array_interface__), zero-copy."""
    require("a CUDA array input")
    if _is_device_ndarray(obj):
        arr, kind = obj, "numba"
    else:
        mod = type(obj).__module__.split(".")[0]
        kind = mod if mod in ("torch", "cupy") else "numba"
        # The producer's stream is not waited on: launches go to the legacy
        # default stream, which orders with torch's and CuPy's default streams.
        arr = cuda.as_cuda_array(obj, sync=False)
    return DeviceInput(obj, arr, kind, arr.shape, arr.dtype)


def host(x: np.ndarray) -> DeviceInput:
    """A host array to normalize on the GPU (device='cuda')."""
    require()
    return DeviceInput(x, None, "host", x.shape, x.dtype)


def to_host(obj) -> np.ndarray:
    """A small CUDA array (gamma, beta, statistics) copied to the host."""
    if not _is_device_ndarray(obj):
        obj = cuda.as_cuda_array(obj, sync=False)
    return obj.copy_to_host()


def _strides(arr) -> tuple:
    """Element strides of a device array; refuses negative strides."""
    item = arr.dtype.itemsize
    st = tuple(int(s) // item for s in arr.strides)
    if any(s < 0 for s in st):
        raise ValueError(
            f"x has negative strides {tuple(arr.strides)}: expected a device array with non-negative strides "
            "(make a contiguous copy first)"
        )
    return st


def _flat_base(arr, strides: tuple):
    """A 1-D view over the memory a strided device array spans (from its first element)."""
    extent = 1 + sum((s - 1) * st for s, st in zip(arr.shape, strides))
    item = arr.dtype.itemsize
    if SIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        base = np.lib.stride_tricks.as_strided(arr._ary, (extent,), (item,))
        return FakeCUDAArray(base)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray((extent,), (item,), arr.dtype, gpu_data=arr.gpu_data)


def _expanded_strides(shape: tuple, strides: tuple, expanded: tuple) -> list:
    """Strides of ``expanded`` (``shape`` with one axis split in two) for an array with ``strides``."""
    out, i = [], 0
    j = 0
    while j < len(expanded):
        if i < len(shape) and expanded[j] == shape[i]:
            out.append(strides[i])
            i += 1
            j += 1
        elif expanded[j] == 1:
            out.append(0)
            j += 1
        else:
            out.append(strides[i] * expanded[j + 1])
            out.append(strides[i])
            i += 1
            j += 2
    return out


def _c_strides(shape) -> list:
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= s
    return st[::-1]


def _copy(src_flat, dst_flat, shape, sstr, dstr) -> None:
    n = math.prod(shape)
    if n == 0:
        return
    shape, sstr, dstr = tuple(int(s) for s in shape), tuple(int(s) for s in sstr), tuple(int(s) for s in dstr)
    blocks = min(-(-n // TPB), 4096)
    key = (src_flat.dtype.char, len(shape))
    _gather_launch(key, _grid(blocks), _grid(TPB), src_flat, dst_flat, shape, sstr, dstr, n)


def _to_view(xin: DeviceInput, plan):
    """The input as a flat, C-contiguous device array in view order (a copy only if needed)."""
    if xin.kind == "host":
        return cuda.to_device(plan.to_view(xin.obj).reshape(-1))
    arr = xin.arr
    if plan.perm is None and arr.is_c_contiguous():
        return arr.reshape(xin.size)
    strides = _strides(arr)
    exp = plan.expanded
    est = _expanded_strides(xin.shape, strides, exp)
    perm = plan.perm if plan.perm is not None else tuple(range(len(exp)))
    shape = [exp[p] for p in perm]
    dst = cuda.device_array(xin.size, xin.dtype)
    _copy(_flat_base(arr, strides), dst, shape, [est[p] for p in perm], _c_strides(shape))
    return dst


def _new_output(xin: DeviceInput):
    """(y as the caller gets it, flat C-contiguous device array of y in the input's shape)."""
    if xin.kind == "torch":
        y = xin.obj.new_empty(xin.shape)
        return y, cuda.as_cuda_array(y.view(-1), sync=False)
    if xin.kind == "cupy":
        cp = sys.modules["cupy"]
        with xin.obj.device:
            y = cp.empty(xin.size, dtype=xin.dtype)
        return y.reshape(xin.shape), cuda.as_cuda_array(y, sync=False)
    y = cuda.device_array(xin.size, xin.dtype)
    return y, y


def _finish_output(xin: DeviceInput, plan, yv):
    """Turn the view-ordered flat result ``yv`` into the caller's y."""
    if xin.kind == "host":
        return plan.from_view(yv.copy_to_host().reshape(plan.view))
    y, flat = _new_output(xin)
    perm = plan.perm
    shape = [plan.expanded[p] for p in perm]
    dst = _c_strides(plan.expanded)
    _copy(yv, flat, shape, _c_strides(shape), [dst[p] for p in perm])
    return _shaped(xin, y)


def _shaped(xin: DeviceInput, y):
    if xin.kind == "numba":
        return y.reshape(xin.shape)
    return y


# ----------------------------------------------------------------------------
# scratch buffers and tables


class _Scratch:
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


_scratch = _Scratch()


class _Results:
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


_results = _Results()
_TABLES: dict = {}


def _tables(g: np.ndarray, h: np.ndarray, ct):
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


def _compute_dtype(dtype) -> np.dtype:
    return _F64 if np.dtype(dtype) == _F64 else np.dtype(np.float32)


# ----------------------------------------------------------------------------
# launch plans


def _split(n_groups: int, B: int, F: int) -> tuple:
    """(Sb, Sf): how many blocks share one group's runs (Sb) and each run (Sf)."""
    want = min(max(1, -(-(B * F) // BLOCK_ELEMS)), _MAX_GRID_Y)
    if want == 1:
        return 1, 1
    if B >= want:
        return want, 1
    sb = B
    sf = max(1, min(-(-want // sb), -(-F // TPB)))
    return sb, sf


def _tile(W: int, F: int) -> int:
    """Columns per tile: all of them when W <= TPB, else whole groups filling TPB."""
    return W if W <= TPB else (TPB // F) * F


def _path(view: tuple) -> str:
    A, B, C, D, E = view
    F = D * E
    if FORCE_PATH is not None and (FORCE_PATH != "columns" or F <= TPB):
        if FORCE_PATH != "fused" or B * F <= PER * MAX_TEAM:
            return FORCE_PATH
    if B * F <= PER * MAX_TEAM and (B == 1 or F >= MIN_RUN):
        return "fused"
    if F >= MIN_RUN or B == 1:
        return "rows"
    return "columns"


#: Tests set this to "fused", "rows" or "columns" to run one plan wherever it applies.
FORCE_PATH = None


def _team(n: int) -> int:
    tx = 32
    while tx * PER < n:
        tx *= 2
    return tx


def _moments_pass(K, key, x1, out, view, eps: float, rms: int) -> str:
    """Launch the moments pass (or the fused kernel's caller decides); returns the path used."""
    A, B, C, D, E = view
    F = D * E
    path = _path(view)
    if path == "columns":
        W = C * F
        TW = _tile(W, F)
        tiles = -(-W // TW)
        RL = TPB // TW
        rows_per_block = max(RL, BLOCK_ELEMS // TW)
        R = max(1, min(-(-B // rows_per_block), MAX_ROW_CHUNKS))
        acc, cnt = _scratch.get(A * C, A * tiles)
        K["col_moments"](key, _grid(A * tiles, R), _grid(TPB), x1, acc, cnt, out, A, B, C, F, TW, R, eps, rms)
        return path
    sb, sf = _split(A * C, B, F)
    acc, cnt = _scratch.get(A * C, A * C)
    K["row_moments"](key, _grid(A * C, sb * sf), _grid(TPB), x1, acc, cnt, out, A, B, C, F, sb, sf, eps, rms)
    return "rows"


def _apply_pass(K, key, x1, gh, out, y1, view, path: str) -> None:
    A, B, C, D, E = view
    F = D * E
    if path == "columns":
        W = C * F
        TW = _tile(W, F)
        tiles = -(-W // TW)
        RL = TPB // TW
        rows_per_block = max(RL, BLOCK_ELEMS // TW)
        R = min(-(-B // rows_per_block), _MAX_GRID_Y)
        K["col_apply"](key, _grid(A * tiles, R), _grid(TPB), x1, gh, out, y1, A, B, C, D, E, TW, R)
        return
    sb, sf = _split(A * C, B, F)
    K["row_apply"](key, _grid(A * C, sb * sf), _grid(TPB), x1, gh, out, y1, A, B, C, D, E, sb, sf)


def _host_params(mu: np.ndarray, var: np.ndarray, eps: float, rms: bool, ct) -> np.ndarray:
    """The float64 buffer finish() would write, from host statistics (inference mode)."""
    mu = np.asarray(mu, np.float64).ravel()
    var = np.asarray(var, np.float64).ravel()
    AC = mu.size
    buf = np.zeros(5 * AC)
    with np.errstate(divide="ignore", invalid="ignore"):
        if rms:
            mc = np.zeros(AC)
            p = 1.0 / np.sqrt(var + mu * mu + eps)
        else:
            mc = mu
            p = 1.0 / np.sqrt(var + eps)
    hi = mc.astype(ct).astype(np.float64)
    prm = buf[2 * AC :].reshape(AC, 3)
    prm[:, 0] = hi
    prm[:, 1] = mc - hi
    prm[:, 2] = p
    return buf


def normalize(xin: DeviceInput, plan, g: np.ndarray, h: np.ndarray, *, eps: float, rms: bool = False,
              stats=None):
    """Normalize on the GPU over ``plan``; returns (y, (mean, m2) or None).

    g, h: float64 (C, D) affine tables.  ``stats`` = (mean, var) float64
    (A, C) tables for inference mode, else the moments are computed and
    returned as host float64 (A, C) arrays.  y is the caller's array type
    (numpy for host inputs).
    """
    view = plan.view
    A, B, C, D, E = view
    AC = A * C
    ct = _compute_dtype(xin.dtype)
    K = _kernels(ct)
    key = xin.dtype.char
    x1 = _to_view(xin, plan)
    gh = _tables(g, h, ct)
    direct = xin.kind != "host" and plan.perm is None
    if direct:
        y, y1 = _new_output(xin)
    else:
        y, y1 = None, cuda.device_array(xin.size, xin.dtype)
    rms_i = 1 if rms else 0
    if stats is None:
        pair = _results.take(5 * AC)
        out = pair[0]
        path = _path(view)
        if path == "fused":
            tx = _team(B * D * E)
            teams = max(1, FUSED_BLOCK // tx)
            K["fused"](key, _grid(-(-AC // teams)), _grid(tx * teams), x1, gh, out, y1, A, B, C, D, E, tx,
                       float(eps), rms_i)
        else:
            path = _moments_pass(K, key, x1, out, view, float(eps), rms_i)
            _apply_pass(K, key, x1, gh, out, y1, view, path)
    else:
        out = cuda.to_device(_host_params(stats[0], stats[1], eps, rms, ct))
        path = _path(view)
        _apply_pass(K, key, x1, gh, out, y1, view, "columns" if path == "columns" else "rows")
    if direct:
        y = _shaped(xin, y)
    else:
        y = _finish_output(xin, plan, y1)
    if stats is not None:
        return y, None
    return y, _results.moments(5 * AC, pair, A, C)


def moments(xin: DeviceInput, plan):
    """Per-(a, c) mean and m2 (host float64, shape (A, C)) over the plan's view."""
    view = plan.view
    A, B, C, D, E = view
    ct = _compute_dtype(xin.dtype)
    K = _kernels(ct)
    x1 = _to_view(xin, plan)
    pair = _results.take(5 * A * C)
    _moments_pass(K, xin.dtype.char, x1, pair[0], view, 0.0, 0)
    return _results.moments(5 * A * C, pair, A, C)
