"""GPU check and benchmark of normsvc's CUDA kernels, in one run (see shared gpu.md).

    python3 bench/cuda.py [--quick] [--skip-timing] [--skip-tests] [--budget SECONDS]

1. Correctness on fresh random inputs of realistic sizes: every norm x layout
   x dtype against a float64 reference computed with torch on the GPU, each
   op called twice (the second call takes the fast launch path), every launch
   plan forced where it applies, a |mean| = 1e4 * std check, inference mode,
   and the shared-memory reductions the simulator runs (a child process with
   NORMSVC_CUDA_SHUFFLE=0).
2. Types and copies: torch and CuPy inputs come back as the same type, on the
   same device, written in place of one fresh allocation (no copy of x, no
   copy of y), numba device arrays as numba device arrays.
3. Timing (float32, forward, CUDA-event medians after warm-up, runs
   interleaved): normsvc vs torch's CUDA kernels vs a device-to-device copy
   of the same bytes.  "gpu" times put a spin kernel before the start event,
   so the host's launch work is hidden and the events see only GPU time; the
   "call" times do not (what a caller waits for).
4. The small case (layer 32x256): per-call wall time of normsvc, torch, a
   bare numba launch through the dispatcher and through normsvc's launcher.
5. The test suite's GPU cases (pytest in child processes): tests/cuda on the
   hardware (NORMSVC_TEST_GPU=1), and normsvc.torch's sync mode on CUDA.

Prints a table and writes it to docs/cuda-bench-<date>-<gpu>.md (and to
$OUT/docs/ when $OUT is set, for a remote runner that copies $OUT back), rewritten
after every line so that a run cut short still leaves its results.  A case
that fails is reported and the rest still run; after --budget seconds
(default 480) the remaining cases are skipped and reported as such.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import io
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
# `python3 bench/cuda.py` puts bench/ first on sys.path, where this very file
# would be found as the top-level module `cuda` and shadow the `cuda` namespace
# package (cuda.bindings, cuda.core) that numba-cuda imports: `from numba import
# cuda` then fails with "__path__ attribute not found on 'cuda'".  Drop it.
_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or os.curdir).resolve() != _HERE]
sys.path.insert(0, str(ROOT))
# numba-cuda warns once per new launch configuration with < 128 blocks (most of the
# check cases): hundreds of stderr lines that would push the results out of the
# output tail a remote run brings back.  Set before numba is imported.
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

import numpy as np  # noqa: E402

# by dtype name; bfloat16: about 2 of its ulps (8 bits of mantissa), computed in float32 and rounded once
Y_RTOL = {"float64": 1e-11, "float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}
STAT_RTOL = {"float64": 1e-11, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
DTYPES = ("float16", "bfloat16", "float32", "float64")
# y's absolute floor: a result that rounds into float16's subnormal range (|y| < 6.1e-5, where a
# relative tolerance shrinks to nothing) is off by up to half its spacing, 2**-25
Y_ATOL = {"float16": 2.0**-24}
EPS = 1e-5

_buf = io.StringIO()
_report: list = []  # where the report goes (set by main; the child writes none)
#: Seconds the whole run may take before the remaining cases are skipped (the
#: device run is killed at 600 s, and then nothing would be written).
BUDGET_S = 480.0
_deadline = float("inf")


def out(line: str = "") -> None:
    print(line, flush=True)
    _buf.write(line + "\n")
    if _report:  # rewritten after every line: a run killed midway still leaves its rows
        write_report()


def err_text(exc: BaseException) -> str:
    """An exception on one short line (numba's messages span many: they would break the tables)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split()).replace("|", "/")
    return text if len(text) <= 300 else text[:297] + "..."


def time_left() -> float:
    return _deadline - time.monotonic()


def write_report() -> None:
    """Write what has been printed so far to docs/ and $OUT/docs/ (a killed run still leaves a report)."""
    text = _buf.getvalue()
    for path in _report:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            print(f"could not write {path}: {err_text(exc)}", file=sys.stderr, flush=True)


def free_gpu(torch) -> None:
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception:  # a sticky CUDA error: every later call reports it
        pass


# ----------------------------------------------------------------------------
# cases: (name, kind, shape, kwargs); "nhwc" shapes are channels-last


def check_cases(quick: bool):
    s = 2 if quick else 1
    return [
        ("batch CL", "batch", (32 // s, 28, 28, 256), dict(axis=-1)),
        ("batch CF", "batch", (32 // s, 256, 28, 28), dict(axis=1)),
        ("layer 1024", "layer", (8192 // s, 1024), dict(axis=-1)),
        ("layer 8192", "layer", (512 // s, 8192), dict(axis=-1)),
        ("layer 65536", "layer", (64 // s, 65536), dict(axis=-1)),
        ("layer mid-axis", "layer", (64 // s, 512, 64), dict(axis=1)),
        ("instance CL", "instance", (16 // s, 32, 32, 128), dict(axis=-1)),
        ("instance CF", "instance", (16 // s, 128, 32, 32), dict(axis=1)),
        ("instance CF 112", "instance", (8 // s, 64, 112, 112), dict(axis=1)),
        ("group CL", "group", (16 // s, 32, 32, 256), dict(axis=-1, groups=32)),
        ("group CF", "group", (16 // s, 256, 32, 32), dict(axis=1, groups=32)),
        ("group CF 56", "group", (8 // s, 256, 56, 56), dict(axis=1, groups=32)),
        ("rms 1024", "rms", (8192 // s, 1024), dict(axis=-1)),
        ("rms mid-axis", "rms", (64 // s, 512, 64), dict(axis=1)),
    ]


def view_of(kind, shape, kw) -> tuple:
    """The canonical view (A, B, C, D, E) normsvc uses for this norm."""
    from normsvc.plan import normalize_axes, plan_for

    axes = normalize_axes(kw["axis"], len(shape))
    if kind == "group":
        return plan_for(tuple(shape), "group", axes, kw["groups"]).view
    return plan_for(tuple(shape), kind, axes).view


def reference(torch, kind, x, kw, gamma=None, beta=None, mean=None, var=None):
    """float64 (y, mean, var, magnitude) on the GPU, from the Keras formulas."""
    x = x.double()
    nd = x.dim()
    ax = kw["axis"] % nd
    if kind == "group":
        C, G = x.shape[ax], kw["groups"]
        xg = x.reshape(x.shape[:ax] + (G, C // G) + x.shape[ax + 1 :])
        red = [a for a in range(xg.dim()) if a not in (0, ax)]
        aff = [ax, ax + 1]
        split = lambda t: None if t is None else t.double().reshape(G, C // G)  # noqa: E731
        y, mu, v, mag = _ref(torch, xg, red, aff, split(gamma), split(beta), mean, var, kind)
        stat = tuple(xg.shape[a] for a in (0, ax))
        return y.reshape(x.shape), mu.reshape(stat), v.reshape(stat), mag.reshape(x.shape)
    if kind == "batch":
        red = [a for a in range(nd) if a != ax]
        aff = [ax]
    elif kind in ("layer", "rms"):
        red = [ax]
        aff = [ax]
    else:  # instance
        red = [a for a in range(nd) if a not in (0, ax)]
        aff = [ax]
    y, mu, v, mag = _ref(torch, x, red, aff, gamma, beta, mean, var, kind)
    stat = tuple(x.shape[a] for a in range(nd) if a not in red)
    return y, mu.reshape(stat), v.reshape(stat), mag


def _ref(torch, x, red, aff, gamma, beta, mean, var, kind):
    nd = x.dim()

    def along(t, axes):
        shape = [1] * nd
        for a in axes:
            shape[a] = x.shape[a]
        return t.double().reshape(shape)

    stat_axes = [a for a in range(nd) if a not in red]
    if mean is None:
        mu = x.mean(dim=red, keepdim=True)
        v = x.var(dim=red, keepdim=True, unbiased=False)
    else:
        mu, v = along(mean, stat_axes), along(var, stat_axes)
    g = 1.0 if gamma is None else along(gamma, aff)
    b = 0.0 if beta is None else along(beta, aff)
    if kind == "rms":
        s = 1.0 / torch.sqrt((x * x).mean(dim=red, keepdim=True) + EPS)
        y = x * s * g
        mag = x.abs() * s * abs(g) + y.abs()
    else:
        s = 1.0 / torch.sqrt(v + EPS)
        y = (x - mu) * s * g + b
        mag = (x.abs() + mu.abs()) * s * abs(g) + abs(b) + y.abs()
    return y, mu, v, mag


def worst(got, want, tol):
    err = (got.double() - want).abs()
    bad = ~(err <= tol)
    return float((err / tol).max()), int(bad.sum())


def run_checks(torch, normsvc, K, quick: bool, dtypes) -> int:
    from numba import cuda

    failures = 0
    gen = torch.Generator(device="cuda").manual_seed(1234)
    out("## Correctness (float64 reference on the GPU; err = worst |error| / tolerance, must be <= 1)")
    out("")
    out("| case | shape | dtype | plan | y err | mean err | var err | 2nd call | result |")
    out("|---|---|---|---|---|---|---|---|---|")
    for name, kind, shape, kw in check_cases(quick):
        for dt in dtypes:
            plan = "?"
            if time_left() < 0:
                failures += 1
                out(f"| {name} | {shape} | {dt} | {plan} | skipped: time budget spent |||||")
                continue
            try:  # one failing case is reported and the rest still run
                plan = K._path(view_of(kind, shape, kw))
                tdt = getattr(torch, dt)
                x = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64) * 2 + 3).to(tdt)
                ax = kw["axis"] % len(shape)
                gamma = torch.rand(shape[ax], generator=gen, device="cuda", dtype=torch.float64) + 0.5
                beta = (None if kind == "rms"
                        else torch.randn(shape[ax], generator=gen, device="cuda", dtype=torch.float64))
                g_h = gamma.cpu().numpy()
                b_h = None if beta is None else beta.cpu().numpy()
                y_ref, mu_ref, v_ref, mag = reference(torch, kind, x, kw, gamma, beta)
                fn = getattr(normsvc, f"{kind}_norm")
                args = dict(kw, epsilon=EPS, gamma=g_h)
                if b_h is not None:
                    args["beta"] = b_h
                res = []
                for _ in range(2):
                    y, m = fn(x, **args)
                    torch.cuda.synchronize()
                    assert isinstance(y, torch.Tensor) and y.dtype == tdt and y.shape == x.shape, type(y)
                    ye, nbad = worst(y, y_ref, Y_RTOL[dt] * mag + Y_ATOL.get(dt, 0.0))
                    scale = float(x.double().abs().max())
                    me = float((torch.as_tensor(m.mean) - mu_ref.cpu()).abs().max()) / (STAT_RTOL[dt] * scale)
                    ve = float((torch.as_tensor(m.variance) - v_ref.cpu()).abs().max()) / (STAT_RTOL[dt] * scale**2)
                    res.append((ye, me, ve))
                ok = all(max(r) <= 1 for r in res)
                again = "same" if res[0] == res[1] else "differs"
                ye, me, ve = res[1]
                out(f"| {name} | {shape} | {dt} | {plan} | {ye:.2g} | {me:.2g} | {ve:.2g} | {again} "
                    f"| {'ok' if ok else 'FAIL'} |")
                failures += not ok
            except Exception as exc:  # report and go on
                failures += 1
                out(f"| {name} | {shape} | {dt} | {plan} | error: {err_text(exc)} |||||")
                traceback.print_exc()
            x = y = y_ref = mag = None  # free the GPU memory before the next case
    out("")

    # every plan forced wherever it applies (float32, one shape per kind/layout)
    out("### Every launch plan, forced (float32)")
    out("")
    out("| case | plan | y err | var err | result |")
    out("|---|---|---|---|---|")
    for name, kind, shape, kw in check_cases(True):
        if name.endswith(("112", "56", "65536")):
            continue
        if time_left() < 0:
            failures += 1
            out(f"| {name} | all | skipped: time budget spent |||")
            continue
        try:
            x = torch.randn(shape, generator=gen, device="cuda") * 3 - 1
            y_ref, mu_ref, v_ref, mag = reference(torch, kind, x, kw)
            view = view_of(kind, shape, kw)
        except Exception as exc:
            failures += 1
            out(f"| {name} | all | error: {err_text(exc)} |||")
            traceback.print_exc()
            continue
        for path in ("fused", "rows", "columns"):
            K.FORCE_PATH = path
            try:
                used = K._path(view)
                if used != path:
                    continue
                y, m = getattr(normsvc, f"{kind}_norm")(x, epsilon=EPS, **kw)
                torch.cuda.synchronize()
                ye, _ = worst(y, y_ref, 1e-5 * mag)
                scale = float(x.abs().max())
                ve = float((torch.as_tensor(m.variance) - v_ref.cpu()).abs().max()) / (1e-5 * scale**2)
                ok = max(ye, ve) <= 1
                failures += not ok
                out(f"| {name} | {path} | {ye:.2g} | {ve:.2g} | {'ok' if ok else 'FAIL'} |")
            except Exception as exc:
                failures += 1
                out(f"| {name} | {path} | error: {err_text(exc)} |||")
                traceback.print_exc()
            finally:
                K.FORCE_PATH = None
        x = y = y_ref = mag = None
    out("")

    # |mean| = 1e4 * std in float32: the variance to 1e-5 relative
    out("### Large mean (|mean| = 1e4 * std, float32): variance relative error, must be <= 1e-5")
    out("")
    for name, kind, shape, kw in (
        ("batch CL", "batch", (32, 28, 28, 256), dict(axis=-1)),
        ("batch CF", "batch", (32, 256, 28, 28), dict(axis=1)),
        ("layer 1024", "layer", (8192, 1024), dict(axis=-1)),
        ("group CF 56", "group", (8, 256, 56, 56), dict(axis=1, groups=32)),
    ):
        try:
            x = (1e4 + torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64)).float()
            _, _, v_ref, _ = reference(torch, kind, x, kw)
            _, m = getattr(normsvc, f"{kind}_norm")(x, epsilon=EPS, **kw)
            rel = float(((torch.as_tensor(m.variance) - v_ref.cpu()).abs() / v_ref.cpu()).max())
            failures += not rel <= 1e-5
            out(f"- {name}: {rel:.2g} {'ok' if rel <= 1e-5 else 'FAIL'}")
        except Exception as exc:
            failures += 1
            out(f"- {name}: error: {err_text(exc)} FAIL")
            traceback.print_exc()
        x = None
    out("")

    # inference mode, numba device arrays in and out; each check on its own
    def inference():
        x = torch.randn((16, 64, 32, 32), generator=gen, device="cuda")
        mean = np.random.default_rng(0).standard_normal(64)
        var = np.random.default_rng(1).uniform(0.5, 2, 64)
        y, m = normsvc.batch_norm(x, axis=1, epsilon=EPS, mean=mean, variance=var)
        y_ref, *_ , mag = reference(torch, "batch", x, dict(axis=1), mean=torch.as_tensor(mean, device="cuda"),
                                     var=torch.as_tensor(var, device="cuda"))
        ye, _ = worst(y, y_ref, 1e-5 * mag)
        ok = ye <= 1 and m is None
        out(f"- inference mode (batch CF, given statistics): y err {ye:.2g} {'ok' if ok else 'FAIL'}")
        return ok

    def numba_in():
        x = torch.randn((16, 64, 32, 32), generator=gen, device="cuda")
        xd = cuda.as_cuda_array(x)
        y, m = normsvc.layer_norm(xd, axis=-1, epsilon=EPS)
        y_ref, *_ , mag = reference(torch, "layer", x, dict(axis=-1))
        ok = isinstance(y, type(xd)) and y.shape == xd.shape
        ye, _ = worst(torch.as_tensor(y, device="cuda"), y_ref, 1e-5 * mag)
        ok = ok and ye <= 1 and m.mean.dtype == np.float64 and isinstance(m.mean, np.ndarray)
        out(f"- numba device array in -> {type(y).__name__} out, host float64 moments: y err {ye:.2g} "
            f"{'ok' if ok else 'FAIL'}")
        return ok

    def host_in():
        x = torch.randn((16, 64, 32, 32), generator=gen, device="cuda")
        xh = x.cpu().numpy()
        y, m = normsvc.group_norm(xh, axis=1, groups=16, epsilon=EPS, device="cuda")
        y_ref, *_ , mag = reference(torch, "group", x, dict(axis=1, groups=16))
        ye, _ = worst(torch.as_tensor(y, device="cuda"), y_ref, 1e-5 * mag)
        ok = type(y) is np.ndarray and ye <= 1
        out(f"- numpy array with device='cuda' -> {type(y).__name__}: y err {ye:.2g} {'ok' if ok else 'FAIL'}")
        return ok

    def host_bf16():
        import ml_dtypes

        x = torch.randn((16, 64, 32, 32), generator=gen, device="cuda").to(torch.bfloat16)
        xh = x.float().cpu().numpy().astype(ml_dtypes.bfloat16)
        y, m = normsvc.batch_norm(xh, axis=1, epsilon=EPS, device="cuda")
        y_ref, *_ , mag = reference(torch, "batch", x, dict(axis=1))
        ye, _ = worst(torch.as_tensor(y.astype(np.float32), device="cuda"), y_ref, Y_RTOL["bfloat16"] * mag)
        ok = type(y) is np.ndarray and y.dtype == xh.dtype and ye <= 1
        out(f"- bfloat16 numpy (ml_dtypes) array with device='cuda' -> {type(y).__name__} {y.dtype}: "
            f"y err {ye:.2g} {'ok' if ok else 'FAIL'}")
        return ok

    def channels_last():
        x = torch.randn((16, 64, 32, 32), generator=gen, device="cuda")
        xcl = x.to(memory_format=torch.channels_last)
        y, m = normsvc.batch_norm(xcl, axis=1, epsilon=EPS)
        y_ref, *_ , mag = reference(torch, "batch", x, dict(axis=1))
        ye, _ = worst(y, y_ref, 1e-5 * mag)
        ok = isinstance(y, torch.Tensor) and ye <= 1
        out(f"- torch channels_last tensor (non-contiguous, gathered once): y err {ye:.2g} {'ok' if ok else 'FAIL'}")
        return ok

    for label, check in (("inference mode", inference), ("numba device array in", numba_in),
                         ("numpy array with device='cuda'", host_in), ("bfloat16 numpy array", host_bf16),
                         ("torch channels_last tensor", channels_last)):
        try:
            failures += not check()
        except Exception as exc:
            failures += 1
            out(f"- {label}: error: {err_text(exc)} FAIL")
            traceback.print_exc()
    out("")
    return failures


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def run_no_shuffle_child() -> int:
    """The simulator's shared-memory reductions, run on the GPU in a child process."""
    env = dict(os.environ, NORMSVC_CUDA_SHUFFLE="0")
    timeout = max(60.0, min(300.0, time_left() - 120))  # leave time for the rest; never hang the run
    out("### Shared-memory reductions (NORMSVC_CUDA_SHUFFLE=0, the simulator's path) on the GPU")
    out("")
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-no-shuffle"], env=env,
                           capture_output=True, text=True, timeout=timeout)
        stdout, stderr, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, rc = _text(exc.stdout), _text(exc.stderr), f"killed after {timeout:.0f} s"
    except Exception as exc:
        stdout, stderr, rc = "", err_text(exc), "not started"
    for ln in _text(stdout).splitlines():
        if ln.startswith(("|", "-", "#")):
            out(ln)
    if rc != 0:
        tail = " ".join(_text(stderr)[-2000:].split())
        out(f"child failed (rc {rc}): {tail}")
    out("")
    return 0 if rc == 0 else 1


def run_types(torch, normsvc, K) -> int:
    """torch/CuPy in -> same type out; x not copied; y written in one fresh allocation."""
    failures = 0
    out("## Types and copies")
    out("")
    x = y = None
    # float32, and bfloat16 (its uint16 bits are wrapped in place, y is one fresh bfloat16 tensor)
    for dtype in (torch.float32, torch.bfloat16):
        label = "torch" if dtype == torch.float32 else "torch bfloat16"
        try:
            xt = torch.randn((64, 4096), device="cuda").to(dtype)
            normsvc.layer_norm(xt)  # warm up: compile, scratch, tables
            torch.cuda.synchronize()
            same_ptr = K.wrap(xt).arr.device_ctypes_pointer.value == xt.data_ptr()
            before = torch.cuda.memory_allocated()
            yt, _ = normsvc.layer_norm(xt)
            torch.cuda.synchronize()
            grew = torch.cuda.memory_allocated() - before
            nbytes = yt.numel() * yt.element_size()
            ok = (isinstance(yt, torch.Tensor) and yt.device == xt.device and yt.dtype == dtype and same_ptr
                  and grew == nbytes and yt.is_contiguous())
            failures += not ok
            out(f"- {label}: in {type(xt).__name__} {xt.dtype} -> out {type(yt).__name__} {yt.dtype}; input wrapped "
                f"in place: {same_ptr}; torch memory grew by {grew} B for a {nbytes} B result: {'ok' if ok else 'FAIL'}")
            if dtype == torch.float32:
                x, y = xt, yt
        except Exception as exc:
            failures += 1
            out(f"- {label}: error: {err_text(exc)} FAIL")
            traceback.print_exc()
    try:
        import cupy as cp
    except Exception as exc:
        out(f"- cupy: not importable ({err_text(exc)}); skipped")
        out("")
        return failures
    try:
        if y is None:
            raise RuntimeError("no torch result to compare with (the torch check failed)")
        xc = cp.asarray(x)
        normsvc.layer_norm(xc)
        cp.cuda.Device().synchronize()
        same_ptr = K.wrap(xc).arr.device_ctypes_pointer.value == xc.data.ptr
        pool = cp.get_default_memory_pool()
        before = pool.used_bytes()
        yc, _ = normsvc.layer_norm(xc)
        cp.cuda.Device().synchronize()
        grew = pool.used_bytes() - before
        ok = isinstance(yc, cp.ndarray) and same_ptr and grew == yc.nbytes and yc.shape == xc.shape
        ok = ok and bool(cp.allclose(yc, cp.asarray(y), atol=1e-6))
        failures += not ok
        out(f"- cupy: in {type(xc).__name__} -> out {type(yc).__name__}; input wrapped in place: {same_ptr}; "
            f"pool grew by {grew} B for a {yc.nbytes} B result: {'ok' if ok else 'FAIL'}")
    except Exception as exc:
        failures += 1
        out(f"- cupy: error: {err_text(exc)} FAIL")
        traceback.print_exc()
    out("")
    return failures


# ----------------------------------------------------------------------------
# timing


def bench_cases(torch):
    F = torch.nn.functional
    N, H, W, C = 64, 56, 56, 256

    def nhwc():
        x = torch.randn((N, H, W, C), device="cuda")
        return x, x.permute(0, 3, 1, 2)  # (ours: NHWC contiguous, torch: NCHW channels_last view)

    def nchw():
        x = torch.randn((N, C, H, W), device="cuda")
        return x, x

    def rows(m, k, dtype=torch.float32):
        def make():
            x = torch.randn((m, k), device="cuda").to(dtype)
            return x, x
        return make

    return [
        ("batch CL 64x56x56x256", "batch", 0.60, nhwc, dict(axis=-1),
         lambda t: F.batch_norm(t, None, None, training=True, eps=EPS)),
        ("batch CF 64x256x56x56", "batch", 0.60, nchw, dict(axis=1),
         lambda t: F.batch_norm(t, None, None, training=True, eps=EPS)),
        ("layer 65536x1024", "layer", 0.75, rows(65536, 1024), dict(axis=-1),
         lambda t: F.layer_norm(t, (t.shape[-1],), eps=EPS)),
        ("layer 16384x8192", "layer", 0.75, rows(16384, 8192), dict(axis=-1),
         lambda t: F.layer_norm(t, (t.shape[-1],), eps=EPS)),
        ("group32 CL 64x56x56x256", "group", 0.75, nhwc, dict(axis=-1, groups=32),
         lambda t: F.group_norm(t, 32, eps=EPS)),
        ("group32 CF 64x256x56x56", "group", 0.75, nchw, dict(axis=1, groups=32),
         lambda t: F.group_norm(t, 32, eps=EPS)),
        ("instance CL 64x56x56x256", "instance", 0.75, nhwc, dict(axis=-1),
         lambda t: F.instance_norm(t, eps=EPS)),
        ("instance CF 64x256x56x56", "instance", 0.75, nchw, dict(axis=1),
         lambda t: F.instance_norm(t, eps=EPS)),
        ("rms 65536x1024 (extra)", "rms", 0.75, rows(65536, 1024), dict(axis=-1),
         lambda t: F.rms_norm(t, (t.shape[-1],), eps=EPS)),
        ("layer 65536x1024 bfloat16 (extra)", "layer", 0.75, rows(65536, 1024, torch.bfloat16), dict(axis=-1),
         lambda t: F.layer_norm(t, (t.shape[-1],), eps=EPS)),
    ]


def time_events(torch, fn, reps: int, spin: bool):
    """Median ms of fn() between two CUDA events; with spin, a busy kernel first hides host work."""
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if spin:
            torch.cuda._sleep(2_000_000)  # ~1 ms of spinning: launches queue up behind it
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def run_timing(torch, normsvc, quick: bool) -> int:
    reps = 10 if quick else 30
    misses = 0
    out("## Timing (float32 forward; medians of CUDA-event times, runs interleaved)")
    out("")
    out("effective GB/s = 2 x tensor bytes / time. gpu = spin kernel before the start event (GPU time only);")
    out("call = plain events around one call (includes the host-side launch work the GPU waits for).")
    out("")
    out("| case | bytes | copy GB/s | torch gpu us | normsvc gpu us | normsvc call us | vs torch (gpu) | of copy (gpu) | target | result |")
    out("|---|---|---|---|---|---|---|---|---|---|")
    for name, kind, frac, make, kw, tfn in bench_cases(torch):
        if time_left() < 0:
            misses += "extra" not in name
            out(f"| {name} | skipped: time budget spent |||||||||")
            continue
        try:  # one failing case is reported and the rest still run
            row, ok = _time_case(torch, normsvc, reps, name, kind, frac, make, kw, tfn)
            misses += not ok and "extra" not in name
            out(row)
        except Exception as exc:
            misses += "extra" not in name
            out(f"| {name} | error: {err_text(exc)} |||||||||")
            traceback.print_exc()
        free_gpu(torch)  # the case's tensors are gone with _time_case's frame
    out("")
    return misses


def _time_case(torch, normsvc, reps, name, kind, frac, make, kw, tfn):
    x_ours, x_torch = make()
    fn = getattr(normsvc, f"{kind}_norm")
    nbytes = x_ours.numel() * x_ours.element_size()
    dst = torch.empty_like(x_ours)
    ours = lambda x=x_ours: fn(x, epsilon=EPS, **kw)  # noqa: E731
    theirs = lambda x=x_torch: tfn(x)  # noqa: E731
    copy = lambda x=x_ours, d=dst: d.copy_(x)  # noqa: E731
    for f in (ours, theirs, copy):
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    t = {"ours": [], "theirs": [], "copy": [], "call": []}
    for _ in range(reps):
        t["ours"].append(time_events(torch, ours, 1, True))
        t["theirs"].append(time_events(torch, theirs, 1, True))
        t["copy"].append(time_events(torch, copy, 1, True))
        t["call"].append(time_events(torch, ours, 1, False))
    med = {k: statistics.median(v) for k, v in t.items()}
    copy_gbs = 2 * nbytes / med["copy"] / 1e6
    vs_torch = med["theirs"] / med["ours"]
    of_copy = med["copy"] / med["ours"]
    ok = vs_torch >= 1.0 and of_copy >= frac
    row = (f"| {name} | {nbytes / 2**20:.0f} MiB | {copy_gbs:.0f} | {med['theirs'] * 1e3:.0f} | {med['ours'] * 1e3:.0f} "
           f"| {med['call'] * 1e3:.0f} | {vs_torch:.2f}x | {of_copy:.2f} | >= 1x torch, >= {frac:.2f} copy "
           f"| {'met' if ok else 'MISSED'} |")
    return row, ok


def run_small(torch, normsvc, K, quick: bool) -> None:
    """Per-call wall time on layer 32x256: normsvc, torch, bare numba launches."""
    from numba import cuda

    n = 300 if quick else 2000
    F = torch.nn.functional
    out("## Small case: layer 32x256 float32, per-call wall time (median of %d calls)" % n)
    out("")
    try:
        x = torch.randn((32, 256), device="cuda")
        xd = cuda.as_cuda_array(x)

        @cuda.jit
        def empty(a):
            pass

        launcher = K._Launcher(empty)
    except Exception as exc:
        out(f"- setup failed: {err_text(exc)}")
        traceback.print_exc()
        out("")
        return

    def wall(fn):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return statistics.median(ts) * 1e6

    rows = [
        ("normsvc.layer_norm(torch tensor) (returns host moments: synchronizes)", lambda: normsvc.layer_norm(x)),
        ("normsvc.layer_norm(numba device array)", lambda: normsvc.layer_norm(xd)),
        ("normsvc.layer_norm(torch, mean/variance given: 1 launch + 1 upload)",
         lambda: normsvc.layer_norm(x, mean=np.zeros(32), variance=np.ones(32))),
        ("torch F.layer_norm (asynchronous)", lambda: F.layer_norm(x, (256,))),
        ("torch F.layer_norm + torch.cuda.synchronize()", lambda: (F.layer_norm(x, (256,)), torch.cuda.synchronize())),
        ("bare numba launch, dispatcher: empty[1, 32](device array)", lambda: empty[1, 32](xd)),
        ("bare numba launch, dispatcher: empty[1, 32](torch tensor)", lambda: empty[1, 32](x)),
        ("bare numba launch, normsvc launcher (compiled kernel .launch)",
         lambda: launcher("k", (1, 1, 1), (32, 1, 1), xd)),
        ("cuda.as_cuda_array(torch tensor)", lambda: cuda.as_cuda_array(x, sync=False)),
    ]
    out("| call | us |")
    out("|---|---|")
    for label, fn in rows:
        if time_left() < 0:
            out(f"| {label} | skipped: time budget spent |")
            continue
        try:
            out(f"| {label} | {wall(fn):.1f} |")
        except Exception as exc:
            out(f"| {label} | error: {err_text(exc)} |")
            traceback.print_exc()
    out("")


# ----------------------------------------------------------------------------
# the test suite's GPU cases

#: (label, pytest arguments, environment): the simulator's kernel tests on the hardware, and the
#: torch integration's sync mode on CUDA tensors (outputs, gradients, host transfers).
GPU_TESTS = (
    ("tests/cuda on the GPU (NORMSVC_TEST_GPU=1)", ["tests/cuda"], {"NORMSVC_TEST_GPU": "1"}),
    ("normsvc.torch sync mode on CUDA", ["tests/test_torch.py", "-k", "cuda"], {}),
)


def run_gpu_tests() -> int:
    """pytest on the suite's GPU cases, in child processes; a line per run with its counts."""
    failures = 0
    out("## The test suite's GPU cases")
    out("")
    for label, args, env in GPU_TESTS:
        timeout = min(240.0, time_left() + 60)
        if timeout < 30:
            failures += 1
            out(f"- {label}: skipped: time budget spent")
            continue
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *args]
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True,
                               timeout=timeout)
            lines = r.stdout.strip().splitlines()
            summary = lines[-1] if lines else "(no output)"
            ok = r.returncode == 0
        except subprocess.TimeoutExpired as exc:
            lines, summary, ok = _text(exc.stdout).splitlines(), f"killed after {timeout:.0f} s", False
        failures += not ok
        out(f"- {label}: {summary} {'ok' if ok else 'FAIL'}")
        if not ok:  # the failures' short summary lines, and the end of the log on stderr
            for ln in lines:
                if ln.startswith(("FAILED", "ERROR")):
                    out(f"  - {ln[:300]}")
            print("\n".join(lines[-80:]), file=sys.stderr, flush=True)
    out("")
    return failures


def _section(what: str, fn, *args) -> int:
    """Run one section; an exception there is reported (as one failure) and the run goes on."""
    try:
        return fn(*args) or 0
    except Exception as exc:
        out(f"{what} stopped: {err_text(exc)}")
        out("")
        traceback.print_exc()
        return 1
    finally:
        write_report()


def main() -> int:
    global _deadline
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the test suite's GPU cases")
    ap.add_argument("--budget", type=float, default=BUDGET_S,
                    help="seconds after which the remaining cases are skipped (default %(default)s)")
    ap.add_argument("--child-no-shuffle", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    _deadline = time.monotonic() + args.budget
    # if something hangs anyway, say where before the device run is killed at 600 s
    faulthandler.dump_traceback_later(args.budget + 60, exit=False)

    import torch

    import normsvc
    from normsvc.kernels import cuda as K

    if args.child_no_shuffle:
        assert not K.SHUFFLE
        # an exit status, not a count (256 failures would read as success)
        return 1 if run_checks(torch, normsvc, K, True, ("float32", "bfloat16")) else 0

    if not torch.cuda.is_available() or not normsvc.cuda_available():
        print("no usable CUDA GPU (torch: %s, numba: %s)" % (torch.cuda.is_available(), normsvc.cuda_available()))
        return 2
    gpu = torch.cuda.get_device_name()
    today = datetime.date.today().isoformat()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    name = f"cuda-bench-{today}-{slug}.md"
    _report.append(ROOT / "docs" / name)
    if os.environ.get("OUT"):
        _report.append(pathlib.Path(os.environ["OUT"]) / "docs" / name)
    import numba

    try:
        import numba_cuda

        ncv = numba_cuda.__version__
    except Exception:
        ncv = "built-in numba.cuda"
    out(f"# normsvc CUDA check and benchmark: {gpu}, {today}")
    out("")
    out(f"torch {torch.__version__} (CUDA {torch.version.cuda}), numba {numba.__version__}, numba-cuda {ncv}, "
        f"numpy {np.__version__}, python {sys.version.split()[0]}; fast launch: {K.FAST_LAUNCH}, shuffles: {K.SHUFFLE}")
    out("")
    write_report()
    t0 = time.time()
    failures = _section("correctness checks", run_checks, torch, normsvc, K, args.quick, DTYPES)
    free_gpu(torch)
    failures += _section("types and copies", run_types, torch, normsvc, K)
    free_gpu(torch)
    out(f"checks: {failures} failure(s), {time.time() - t0:.0f} s")
    out("")
    misses = 0
    if not args.skip_timing:
        misses = _section("timing", run_timing, torch, normsvc, args.quick)
        free_gpu(torch)
        _section("small case", run_small, torch, normsvc, K, args.quick)
    if not args.skip_tests:
        failures += _section("test suite's GPU cases", run_gpu_tests)
    failures += _section("shared-memory child", run_no_shuffle_child)
    out(f"summary: {failures} check failure(s), {misses} benchmark target(s) missed")
    write_report()
    print(f"wrote docs/{name}" + (f" and $OUT/docs/{name}" if len(_report) > 1 else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
