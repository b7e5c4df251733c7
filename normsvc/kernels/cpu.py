"""Numba CPU kernels over the canonical view (see normsvc.plan).

Two passes cover every norm:

* ``moments(x)`` with ``x`` viewed as ``[A, B, C, F]`` (F = D*E merged):
  per-(a, c) mean and m2 over b and f.
* ``apply(x, center, p, g, h, out)`` with ``x`` viewed as ``[A, B, C, D, E]``:
  ``out = (x - center[a, c]) * (p[a, c] * g[c, d]) + h[c, d]``, in x's dtype,
  the center split in two so that large offsets keep their precision.

Training mode runs the two passes back to back, except where a group can
be read from memory once: contiguous groups (layer and RMS norm,
channels-first instance and group norm) up to ``FUSED_SEGMENT_BYTES`` are
reduced and normalized in one pass while in cache (``_normalize_segments``),
and channels-last instance and group norm with enough samples run both
passes per sample, from cache (``_normalize_slabs``); small inputs take one
serial call (``_normalize_serial``).

Memory traffic, channels-last (batch, instance and group norm over NHWC):
an output of ``STREAM_ABOVE`` bytes or more is written with streaming
(non-temporal) stores (``_apply_rows_streamed``).  A plain store first
reads the line it writes, so a pass that reads x and writes y moved 1.5x
its bytes; that, and the float64 moments loop (now four rows per step),
is where batch and group norm NHWC lost to torch (docs/benchmarks.md).

Numerics: sums are shifted by the first element of each group and
accumulated in float64, so float32 data with |mean| = 1e4 * std still gives
the variance to ~1e-7 relative; partial sums from parallel tasks share the
shift and simply add.

Threading: numba's default ``workqueue`` layer aborts when two threads call a
parallel function at once, and the gRPC server does exactly that, so this
module selects a thread-safe layer (TBB if installed, else OpenMP) unless
``NUMBA_THREADING_LAYER`` says otherwise.  Inputs below ``SERIAL_BELOW``
elements take the serial variants: thread start-up costs more than they do.

Idle workers: GNU OpenMP's threads spin 300,000 times (when neither
``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT`` is set) before they sleep after a
parallel region.  Measured here, that burnt 8 ms of a core after every call,
CPU a server shares with gRPC and its clients.  Unless the environment says
otherwise, this module sets ``GOMP_SPINCOUNT`` to ``SPIN_COUNT`` (about 0.4 ms
of spinning), which keeps back-to-back calls as fast (docs/benchmarks.md);
``OMP_WAIT_POLICY=passive`` instead sleeps at once, but costs each later
call a wake-up (+100 us per call measured at 1K to 1M elements).  With
torch in the process there is still one OpenMP runtime, whichever libgomp
was loaded first (numba's binds to torch's, or torch's to the system's);
when torch was imported first it read the environment before this module
set anything, so its spin count (libgomp's default) applies to both.
"""

from __future__ import annotations

import os
import platform

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic

if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"

#: Spins before an idle OpenMP worker sleeps (GOMP_SPINCOUNT), unless the environment chose.
SPIN_COUNT = 10_000
# read by libgomp when numba loads its OpenMP layer, at the first parallel call
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)

__all__ = ["moments", "normalize", "apply", "SERIAL_BELOW", "SPIN_COUNT", "STREAM_ABOVE", "threading_layer"]

#: Inputs with fewer elements than this run single-threaded (see docs/benchmarks.md).
SERIAL_BELOW = 1 << 15
#: Groups shorter than this along the contiguous axis are summed row-wise.
ROW_MODE_BELOW = 16
#: Contiguous groups up to this size (bytes) are normalized in one pass, from cache (see normalize).
FUSED_SEGMENT_BYTES = 256 << 10
#: Channels-last slabs (one a's [B, C*D]) up to this size (bytes) take the moments and apply
#: passes back to back per a, from cache (see normalize).
FUSED_SLAB_BYTES = 4 << 20
#: Parallel tasks per thread: a little over-decomposition evens out the load.
TASKS_PER_THREAD = 4
#: Channels-last outputs from this size (bytes) up are written with streaming stores, around the
#: caches: such a y would not stay in cache for the next reader anyway, and a plain store reads each
#: line of y before writing it.  Smaller outputs stay in cache for whoever reads them next: with an
#: immediate read of y after the norm, streaming lost below ~16 MiB and broke even above, on a 2-core
#: VM (docs/benchmarks.md, "channels-last, both import orders").
STREAM_ABOVE = 16 << 20
# streaming stores need x86's store fence; elsewhere _stream_apply_line stores plainly
_X86 = platform.machine().lower() in ("x86_64", "amd64")

# Reductions may be reassociated (vectorised sums); NaN/Inf still propagate.
# The apply pass must not be: ((x - hi) - lo) would fold into x - (hi + lo).
_FASTMATH = {"reassoc", "contract"}
# error_model="numpy": x/0 gives inf/nan as in numpy (epsilon=0 on a constant group), no exception
_OPTS = dict(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
_APPLY_OPTS = dict(_OPTS, fastmath={"contract"})


@intrinsic
def _address(typingctx, arr):
    """The address of ``arr``'s first element, as an integer."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, context.get_value_type(types.intp))

    return types.intp(arr), codegen


@intrinsic
def _stream_apply_line(typingctx, y, x, i, hi, lo, s, t, k):
    """One 64-byte line of the channels-last apply, stored around the caches:
    ``y[i:i+n] = ((x[i:i+n] - hi[k:k+n]) - lo[k:k+n]) * s[k:k+n] + t[k:k+n]``
    (flat indices, n elements of 64 bytes), the arithmetic of _apply_rows on
    one vector.

    The caller guarantees that ``y[i]`` starts a 64-byte line: a streaming
    (non-temporal) store needs its vector aligned.  Off x86 the store is a
    plain one.  Computing the line in registers matters: staging it through
    a buffer in memory and streaming that out ran at half the speed.
    """

    if not all(isinstance(a, types.Array) and a.dtype == x.dtype for a in (y, x, hi, lo, s, t)):
        return None  # one element type throughout: the vectors are x's

    def codegen(context, builder, signature, args):
        yty, xty, _, tty = signature.args[:4]
        elem = context.get_value_type(xty.dtype)
        size = context.get_abi_sizeof(elem)
        vec = ir.VectorType(elem, 64 // size)

        def pointer(aryty, ary, index):
            data = context.make_array(aryty)(context, builder, ary).data
            return builder.bitcast(builder.gep(data, [index]), vec.as_pointer())

        xv = builder.load(pointer(xty, args[1], args[2]), align=size)
        hv, lv, sv, tv = (builder.load(pointer(tty, a, args[7]), align=size) for a in args[3:7])
        f = ("contract",)  # as _APPLY_OPTS: a fused multiply-add, but no reassociation
        v = builder.fadd(builder.fmul(builder.fsub(builder.fsub(xv, hv, flags=f), lv, flags=f), sv, flags=f), tv,
                         flags=f)
        store = builder.store(v, pointer(yty, args[0], args[2]), align=64)
        if _X86:
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return types.void(y, x, types.intp, hi, lo, s, t, types.intp), codegen


@intrinsic
def _store_fence(typingctx):
    """sfence on x86: streaming stores are weakly ordered, so each thread fences its own
    before the parallel region's join hands y to the caller.  A no-op elsewhere."""

    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse.sfence")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(**_OPTS)
def _moments_rows(x2, shift, dims, a, b0, b1, s1, s2):
    """Shifted sums of x[a, b0:b1] into s1[c], s2[c] (float64), over a 2-D row view.

    x2 is x[A, B, C, F] reshaped by the caller, once per call, to
    (A*B, C*F) for short groups or (A*B*C, F) for long ones.
    """
    A, B, C, F = dims
    if F < ROW_MODE_BELOW:
        # Short groups along the contiguous axis (channels-last): sum whole
        # rows of C*F elements into per-element accumulators, vectorised
        # across the row, then fold the F entries of each group.  Four rows
        # per step: the accumulators live in memory (one load and one store
        # per element and step), and that traffic, not the arithmetic, bound
        # the one-row loop (1.5x slower per sample in L2, docs/benchmarks.md).
        CF = C * F
        k = np.empty(CF)
        acc1 = np.zeros(CF)
        acc2 = np.zeros(CF)
        for i in range(CF):
            k[i] = shift[a, i // F]
        b = a * B + b0
        end = a * B + b1
        while b + 4 <= end:
            r0 = x2[b]
            r1 = x2[b + 1]
            r2 = x2[b + 2]
            r3 = x2[b + 3]
            for i in range(CF):
                ki = k[i]
                v0 = np.float64(r0[i]) - ki
                v1 = np.float64(r1[i]) - ki
                v2 = np.float64(r2[i]) - ki
                v3 = np.float64(r3[i]) - ki
                acc1[i] += (v0 + v1) + (v2 + v3)
                acc2[i] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
            b += 4
        for b in range(b, end):
            row = x2[b]
            for i in range(CF):
                v = np.float64(row[i]) - k[i]
                acc1[i] += v
                acc2[i] += v * v
        for c in range(C):
            t1 = 0.0
            t2 = 0.0
            for f in range(F):
                t1 += acc1[c * F + f]
                t2 += acc2[c * F + f]
            s1[c] = t1
            s2[c] = t2
    else:
        # Long contiguous groups: one scalar reduction per group.
        for c in range(C):
            k0 = shift[a, c]
            t1 = 0.0
            t2 = 0.0
            for b in range(b0, b1):
                seg = x2[(a * B + b) * C + c]
                for f in range(F):
                    v = np.float64(seg[f]) - k0
                    t1 += v
                    t2 += v * v
            s1[c] = t1
            s2[c] = t2


@njit(**_OPTS)
def _group_view(x):
    A, B, C, F = x.shape
    if F < ROW_MODE_BELOW:
        return x.reshape(A * B, C * F)
    return x.reshape(A * B * C, F)


@njit(**_OPTS)
def _moments_serial(x, shift, nb, s1, s2):
    B = x.shape[1]
    x2 = _group_view(x)
    for t in range(x.shape[0] * nb):
        a, j = t // nb, t % nb
        _moments_rows(x2, shift, x.shape, a, j * B // nb, (j + 1) * B // nb, s1[a, j], s2[a, j])


@njit(parallel=True, **_OPTS)
def _moments_parallel(x, shift, nb, s1, s2):
    B = x.shape[1]
    x2 = _group_view(x)
    for t in prange(x.shape[0] * nb):
        a, j = t // nb, t % nb
        _moments_rows(x2, shift, x.shape, a, j * B // nb, (j + 1) * B // nb, s1[a, j], s2[a, j])


@njit(**_OPTS)
def _shift(x):
    """The first element of each (a, c) group: the shift of the sums."""
    A, C = x.shape[0], x.shape[2]
    shift = np.empty((A, C))
    for a in range(A):
        for c in range(C):
            shift[a, c] = x[a, 0, c, 0]
    return shift


@njit(**_OPTS)
def _scale(n, mu, m, eps, rms):
    """(p, center) for ``(x - center) * p`` from a group's mean and m2.

    center = mean and p = rsqrt(var + eps); for RMS norm center = 0 and
    p = rsqrt(mean(x^2) + eps).
    """
    if rms:
        return 1.0 / np.sqrt(m / n + mu * mu + eps), 0.0
    return 1.0 / np.sqrt(m / n + eps), mu


@njit(**_OPTS)
def _finish(n, shift, s1, s2, eps, rms):
    """Sum the per-task partials; return (A, C) arrays mean, m2, p, center."""
    A, nb, C = s1.shape
    mean = np.empty((A, C))
    m2 = np.empty((A, C))
    p = np.empty((A, C))
    center = np.empty((A, C))
    for a in range(A):
        for c in range(C):
            t1 = 0.0
            t2 = 0.0
            for j in range(nb):
                t1 += s1[a, j, c]
                t2 += s2[a, j, c]
            mu = shift[a, c] + t1 / n
            mean[a, c] = mu
            m2[a, c] = max(t2 - t1 * t1 / n, 0.0)
            p[a, c], center[a, c] = _scale(n, mu, m2[a, c], eps, rms)
    return mean, m2, p, center


@njit(**_APPLY_OPTS)
def _apply_rows(x2, y2, center, p, g, h, dims, a, b0, b1, stream):
    """y[a, b0:b1] = (x - center[a, c]) * p[a, c] * g[c, d] + h[c, d] over 2-D row views.

    Arithmetic runs in x's dtype (float32 vectorises twice as wide as
    float64) with the center split into hi + lo parts: x - hi is exact for x
    near the mean, so the |mean| >> std case keeps its precision.  g, h come
    in x's dtype.  The caller reshapes the 5-D view once per call to (rows,
    contiguous run) for the layout; slicing per row would cost more than
    the arithmetic on a short row.  ``stream``: write y with streaming
    stores where rows share the statistics (channels-last, see
    STREAM_ABOVE).
    """
    A, B, C, D, E = dims
    dt = x2.dtype.type
    if E > 1:
        # channels-first: one scale and shift per (c, d), contiguous e loop; x2 is (A*B*C*D, E)
        for b in range(b0, b1):
            for c in range(C):
                hi = dt(center[a, c])
                lo = dt(center[a, c] - hi)
                pc = dt(p[a, c])
                r0 = ((a * B + b) * C + c) * D
                for d in range(D):
                    sk = pc * g[c, d]
                    tk = h[c, d]
                    xe = x2[r0 + d]
                    ye = y2[r0 + d]
                    for e in range(E):
                        ye[e] = ((xe[e] - hi) - lo) * sk + tk
    elif b1 - b0 == 1:
        # one row per statistic (layer norm): vectorise over d; x2 is (A*B*C, D)
        for c in range(C):
            r = (a * B + b0) * C + c
            xd = x2[r]
            yd = y2[r]
            gc = g[c]
            hc = h[c]
            hi = dt(center[a, c])
            lo = dt(center[a, c] - hi)
            pc = dt(p[a, c])
            for d in range(D):
                yd[d] = ((xd[d] - hi) - lo) * (pc * gc[d]) + hc[d]
    else:
        # many rows share the statistics (channels-last batch/group/instance):
        # per row element one center (hi, lo), one scale, one shift; x2 is (A*B, C*D)
        CD = C * D
        sh = np.empty(CD, x2.dtype)
        sl = np.empty(CD, x2.dtype)
        sk = np.empty(CD, x2.dtype)
        tk = np.empty(CD, x2.dtype)
        for c in range(C):
            hi = dt(center[a, c])
            lo = dt(center[a, c] - hi)
            pc = dt(p[a, c])
            for d in range(D):
                sh[c * D + d] = hi
                sl[c * D + d] = lo
                sk[c * D + d] = pc * g[c, d]
                tk[c * D + d] = h[c, d]
        if stream:
            _apply_rows_streamed(x2, y2, sh, sl, sk, tk, a * B + b0, a * B + b1)
            return
        for b in range(a * B + b0, a * B + b1):
            xb = x2[b]
            yb = y2[b]
            for k in range(CD):
                yb[k] = ((xb[k] - sh[k]) - sl[k]) * sk[k] + tk[k]


@njit(**_APPLY_OPTS)
def _apply_rows_streamed(x2, y2, sh, sl, sk, tk, r0, r1):
    """The channels-last loop of _apply_rows over rows [r0, r1) of x2, y2 (tables sh, sl, sk, tk
    per row element), with y written by streaming stores, which skip reading y's lines from
    memory first and leave the caches to x.  Whole aligned 64-byte lines of y go through
    _stream_apply_line; the partial lines at the ends of the range (which a neighbouring task
    may share) take plain stores."""
    CD = x2.shape[1]
    size = x2.itemsize
    n = 64 // size
    # the tables repeated to CD + n entries: a line that starts at row element k reads k..k+n-1
    hi = np.empty(CD + n, x2.dtype)
    lo = np.empty(CD + n, x2.dtype)
    s = np.empty(CD + n, x2.dtype)
    t = np.empty(CD + n, x2.dtype)
    for j in range(CD + n):
        hi[j] = sh[j % CD]
        lo[j] = sl[j % CD]
        s[j] = sk[j % CD]
        t[j] = tk[j % CD]
    xf = x2.reshape(x2.size)
    yf = y2.reshape(y2.size)
    i0 = r0 * CD
    i1 = r1 * CD
    address = _address(yf) + i0 * size
    head = i1 - i0 if address % size else min(i1 - i0, ((-address) % 64) // size)
    for i in range(i0, i0 + head):
        k = i % CD
        yf[i] = ((xf[i] - sh[k]) - sl[k]) * sk[k] + tk[k]
    i = i0 + head
    k = i % CD
    while i + n <= i1:
        _stream_apply_line(yf, xf, i, hi, lo, s, t, k)
        i += n
        k += n
        while k >= CD:
            k -= CD
    for i in range(i, i1):
        k = i % CD
        yf[i] = ((xf[i] - sh[k]) - sl[k]) * sk[k] + tk[k]
    _store_fence()


@njit(**_OPTS)
def _row_view(x, nb):
    """The 2-D reshape that _apply_rows expects for this layout and chunking."""
    A, B, C, D, E = x.shape
    if E > 1:
        return x.reshape(A * B * C * D, E)
    if nb == B:
        return x.reshape(A * B * C, D)
    return x.reshape(A * B, C * D)


@njit(**_OPTS)
def _apply_serial(x, center, p, g, h, nb, out, stream):
    B = x.shape[1]
    x2 = _row_view(x, nb)
    y2 = _row_view(out, nb)
    for k in range(x.shape[0] * nb):
        a, j = k // nb, k % nb
        _apply_rows(x2, y2, center, p, g, h, x.shape, a, j * B // nb, (j + 1) * B // nb, stream)


@njit(parallel=True, **_OPTS)
def _apply_parallel(x, center, p, g, h, nb, out, stream):
    B = x.shape[1]
    x2 = _row_view(x, nb)
    y2 = _row_view(out, nb)
    for k in prange(x.shape[0] * nb):
        a, j = k // nb, k % nb
        _apply_rows(x2, y2, center, p, g, h, x.shape, a, j * B // nb, (j + 1) * B // nb, stream)


def _chunks(A: int, B: int, parallel: bool) -> int:
    """How many b-chunks per a, so that A * chunks gives every thread enough tasks."""
    if not parallel:
        return 1
    want = numba.get_num_threads() * TASKS_PER_THREAD
    return max(1, min(B, -(-want // A)))


@njit(**_OPTS)
def _segment_sums(seg):
    """Mean and m2 of one contiguous segment (shifted float64 sums)."""
    n = np.float64(seg.shape[0])
    k0 = np.float64(seg[0])
    t1 = 0.0
    t2 = 0.0
    for f in range(seg.shape[0]):
        v = np.float64(seg[f]) - k0
        t1 += v
        t2 += v * v
    return k0 + t1 / n, max(t2 - t1 * t1 / n, 0.0)


@njit(**_APPLY_OPTS)
def _segment_apply(seg, ys, gc, hc, E, center, p):
    """ys = (seg - center) * p * g[d] + h[d] for one contiguous group (d = position // E).

    The arithmetic of _apply_rows: x's dtype, center split into hi + lo.
    """
    dt = seg.dtype.type
    hi = dt(center)
    lo = dt(center - hi)
    pc = dt(p)
    if E == 1:
        for d in range(seg.shape[0]):
            ys[d] = ((seg[d] - hi) - lo) * (pc * gc[d]) + hc[d]
    else:
        D = seg.shape[0] // E
        xs2 = seg.reshape(D, E)
        ys2 = ys.reshape(D, E)
        for d in range(D):
            sk = pc * gc[d]
            tk = hc[d]
            xe = xs2[d]
            ye = ys2[d]
            for e in range(E):
                ye[e] = ((xe[e] - hi) - lo) * sk + tk


@njit(**_OPTS)
def _segment(x2, y2, a, c, C, E, eps, rms, g, h, mean, m2):
    """Reduce contiguous group (a, c) (row a * C + c of x2), then normalize it while it is in cache."""
    r = a * C + c
    seg = x2[r]
    mu, m = _segment_sums(seg)
    mean[a, c] = mu
    m2[a, c] = m
    p, center = _scale(np.float64(seg.shape[0]), mu, m, eps, rms)
    _segment_apply(seg, y2[r], g[c], h[c], E, center, p)


@njit(parallel=True, **_OPTS)
def _normalize_segments(x2, y2, C, E, eps, rms, g, h, mean, m2):
    """_segment for every row of x2 (A*C contiguous groups), rows spread over the threads."""
    for r in prange(x2.shape[0]):
        _segment(x2, y2, r // C, r % C, C, E, eps, rms, g, h, mean, m2)


@njit(parallel=True, **_OPTS)
def _normalize_slabs(x, shift, eps, rms, g, h, out, mean, m2, center, p, stream):
    """Channels-last groups (E == 1): for each a, the moments pass and then the apply pass over
    its [B, C*D] slab while the slab is still in cache; the a's spread over the threads."""
    A, B, C, D, _ = x.shape
    x4 = x.reshape(A, B, C, D)
    xm = _group_view(x4)
    xa = x.reshape(A * B, C * D)
    ya = out.reshape(A * B, C * D)
    n = np.float64(B * D)
    for a in prange(A):
        s1 = np.empty(C)
        s2 = np.empty(C)
        _moments_rows(xm, shift, x4.shape, a, 0, B, s1, s2)
        for c in range(C):
            mu = shift[a, c] + s1[c] / n
            mean[a, c] = mu
            m2[a, c] = max(s2[c] - s1[c] * s1[c] / n, 0.0)
            p[a, c], center[a, c] = _scale(n, mu, m2[a, c], eps, rms)
        _apply_rows(xa, ya, center, p, g, h, x.shape, a, 0, B, stream)


@njit(**_OPTS)
def _normalize_serial(x, eps, rms, g, h, out, mean, m2):
    """The whole training-mode norm in one call, for small inputs: y into ``out``, the
    moments into ``mean`` and ``m2`` (allocated by the caller: arrays a kernel returns
    cost ~0.5 us each to hand back to Python, a third of a small call).

    When each statistic group is one contiguous segment (B == 1: layer norm,
    channels-first instance and group norm) the segment is reduced and then
    normalized while it is still in cache; otherwise the two passes run
    back to back.
    """
    A, B, C, D, E = x.shape
    if B == 1:
        x2 = x.reshape(A * C, D * E)
        y2 = out.reshape(A * C, D * E)
        for a in range(A):
            for c in range(C):
                _segment(x2, y2, a, c, C, E, eps, rms, g, h, mean, m2)
        return
    x4 = x.reshape(A, B, C, D * E)
    shift = _shift(x4)
    s1 = np.empty((A, 1, C))
    s2 = np.empty((A, 1, C))
    _moments_serial(x4, shift, 1, s1, s2)
    mu, mm, p, center = _finish(np.float64(B * D * E), shift, s1, s2, eps, rms)
    mean[:, :] = mu
    m2[:, :] = mm
    _apply_serial(x, center, p, g, h, 1, out, False)


def _moments(x4, parallel):
    A, B, C, F = x4.shape
    nb = _chunks(A, B, parallel)
    shift = _shift(x4)
    s1 = np.empty((A, nb, C))
    s2 = np.empty((A, nb, C))
    (_moments_parallel if parallel else _moments_serial)(x4, shift, nb, s1, s2)
    return shift, s1, s2


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-(a, c) mean and m2 (float64, shape (A, C)) of a C-contiguous x[A, B, C, D, E]."""
    A, B, C, D, E = x.shape
    x4 = x.reshape(A, B, C, D * E)
    shift, s1, s2 = _moments(x4, x.size >= SERIAL_BELOW)
    mean, m2, _, _ = _finish(np.float64(B * D * E), shift, s1, s2, 0.0, False)
    return mean, m2


def normalize(x: np.ndarray, epsilon: float, rms: bool, g: np.ndarray, h: np.ndarray):
    """Training-mode norm of a C-contiguous x[A, B, C, D, E]: returns (y, mean, m2).

    Statistics per (a, c) over b, d, e; ``y = (x - mean) * rsqrt(var + eps) * g + h``
    (RMS: ``y = x * rsqrt(mean(x^2) + eps) * g``); g, h: (C, D) in x's dtype.
    """
    # outputs come from numpy, not from inside the kernels: numpy asks for
    # huge pages on large arrays, numba's allocator does not, and first-touch
    # page faults on 4 KiB pages can cost more than the norm itself
    A, B, C, D, E = x.shape
    out, mean, m2 = np.empty_like(x), np.empty((A, C)), np.empty((A, C))
    if x.size < SERIAL_BELOW:
        _normalize_serial(x, epsilon, rms, g, h, out, mean, m2)
        return out, mean, m2
    if B == 1 and D * E * x.itemsize <= FUSED_SEGMENT_BYTES:
        # one pass: each contiguous group is read from memory once, normalized from cache
        _normalize_segments(x.reshape(A * C, D * E), out.reshape(A * C, D * E), C, E, epsilon, rms, g, h, mean, m2)
        return out, mean, m2
    if E == 1 and B > 1 and A >= 2 * numba.get_num_threads() and B * C * D * x.itemsize <= FUSED_SLAB_BYTES:
        # channels-last with enough samples: one parallel pass over the samples, each read from cache twice
        shift = _shift(x.reshape(A, B, C, D))
        _normalize_slabs(x, shift, epsilon, rms, g, h, out, mean, m2, np.empty((A, C)), np.empty((A, C)),
                         out.nbytes >= STREAM_ABOVE)
        return out, mean, m2
    shift, s1, s2 = _moments(x.reshape(A, B, C, D * E), True)
    mean, m2, p, center = _finish(np.float64(B * D * E), shift, s1, s2, epsilon, rms)
    return apply(x, center, p, g, h, out), mean, m2


def apply(x, center, p, g, h, out=None) -> np.ndarray:
    """``out = (x - center[a, c]) * p[a, c] * g[c, d] + h[c, d]`` for a C-contiguous x[A, B, C, D, E].

    center, p: float64 (A, C); g, h: (C, D) in x's dtype.  ``out`` has x's
    shape and dtype (allocated when None).
    """
    if out is None:
        out = np.empty_like(x)
    parallel = x.size >= SERIAL_BELOW
    nb = _chunks(x.shape[0], x.shape[1], parallel)
    (_apply_parallel if parallel else _apply_serial)(x, center, p, g, h, nb, out, out.nbytes >= STREAM_ABOVE)
    return out


def threading_layer() -> str:
    """The numba threading layer in use (after the first parallel call)."""
    try:
        return numba.threading_layer()
    except ValueError:
        return "not yet started"
