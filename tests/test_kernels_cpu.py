"""The numba CPU kernels: direct checks around the serial threshold, and threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest

from normsvc import ops
from normsvc.kernels import cpu
from reference import REFERENCES, assert_stats_close, assert_y_close

THREAD_SAFE_LAYERS = ("omp", "tbb")
AROUND = [cpu.SERIAL_BELOW - 1, cpu.SERIAL_BELOW, 4 * cpu.SERIAL_BELOW]


def _view_shapes(size: int):
    """[A, B, C, D, E] views of exactly ``size`` elements in each kernel branch."""
    # size - 1 is odd, so build odd and even shapes separately
    if size % 2:
        return [(1, size, 1, 1, 1), (size, 1, 1, 1, 1), (1, 1, 1, 1, size)]
    return [
        (1, size // 64, 64, 1, 1),  # channels-last batch norm
        (1, size // 256, 8, 1, 32),  # channels-first batch norm
        (size // 128, 1, 1, 128, 1),  # layer norm rows
        (4, size // 64, 4, 4, 1),  # channels-last group norm
        (2, 1, 4, 2, size // 16),  # channels-first group norm
        (2, 2, 2, size // 8, 1),  # long D, short rows
    ]


CASES = [(shape, dt) for size in AROUND for shape in _view_shapes(size) for dt in (np.float32, np.float64)]


@pytest.mark.parametrize("shape, dtype", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_moments_kernel_matches_numpy(shape, dtype, rng):
    x = rng.normal(rng.uniform(-50, 50), 2.0, size=shape).astype(dtype)
    mean, m2 = cpu.moments(x)
    xs = x.astype(np.float64)
    want_mean = xs.mean(axis=(1, 3, 4))
    want_m2 = ((xs - want_mean[:, None, :, None, None]) ** 2).sum(axis=(1, 3, 4))
    assert mean.shape == m2.shape == (shape[0], shape[2])
    # float64 accumulation of shifted values: a few ulps of the data scale
    # (|x| <= ~60), far tighter than any wrong grouping or chunk split
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(m2, want_m2, rtol=1e-9)


@pytest.mark.parametrize("shape, dtype", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_apply_kernel_matches_the_formula(shape, dtype, rng):
    A, _, C, D, _ = shape
    x = rng.normal(size=shape).astype(dtype)
    center, p = rng.normal(size=(A, C)), rng.uniform(0.5, 2, size=(A, C))
    g, h = rng.normal(size=(C, D)).astype(dtype), rng.normal(size=(C, D)).astype(dtype)
    out = np.full_like(x, np.nan)
    y = cpu.apply(x, center, p, g, h, out=out)
    assert y is out and y.dtype == x.dtype
    want = (x.astype(np.float64) - center[:, None, :, None, None]) * p[:, None, :, None, None] * g[
        None, None, :, :, None
    ] + h[None, None, :, :, None]
    # magnitudes are O(10) and float32 runs in float32: a few ulps, ~1e-5; float64 ~1e-15
    atol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, want, rtol=0, atol=atol)


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_apply_keeps_precision_far_from_zero(offset, rng):
    """float32 x = offset + noise, centered on its float64 mean: y is accurate to ~ulp(x)."""
    x = (offset + rng.normal(size=(1, 4096, 8, 1, 1))).astype(np.float32)
    x64 = x.astype(np.float64)
    center = x64.mean(axis=1).reshape(1, 8)
    p = 1 / x64.std(axis=1).reshape(1, 8)
    ones, zeros = np.ones((8, 1), np.float32), np.zeros((8, 1), np.float32)
    y = cpu.apply(x, center, p, ones, zeros)
    want = (x64 - center[:, None, :, None, None]) * p[:, None, :, None, None]
    # x itself is exact; a folded x*s + t in float32 would be off by ~ulp(offset) = 1e-3 .. 1e-2
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the serial/parallel kernels called from Python, in order."""
    calls = []
    for name in ("_moments_parallel", "_apply_parallel", "_moments_serial", "_apply_serial", "_normalize_segments",
                 "_normalize_slabs"):
        kernel = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])
    return calls


@pytest.mark.parametrize("size", AROUND)
def test_dispatch_switches_to_the_parallel_kernels_at_the_threshold(size, rng, kernel_calls):
    calls = kernel_calls
    x = rng.normal(size=(1, size, 1, 1, 1))
    cpu.moments(x)
    cpu.apply(x, np.zeros((1, 1)), np.ones((1, 1)), np.ones((1, 1)), np.zeros((1, 1)))
    expected = "parallel" if size >= cpu.SERIAL_BELOW else "serial"
    assert calls == [f"_moments_{expected}", f"_apply_{expected}"]


def test_large_norms_run_the_parallel_kernels(rng, kernel_calls):
    """The explicit large cases in test_ops only prove something if they run in parallel."""
    ops.batch_norm(rng.normal(size=(32, 16, 16, 64)).astype(np.float32))
    assert kernel_calls == ["_moments_parallel", "_apply_parallel"]
    # contiguous groups (layer, rms, channels-first instance and group norm): the one-pass kernel
    ops.layer_norm(rng.normal(size=(2048, 256)).astype(np.float32))
    ops.instance_norm(rng.normal(size=(32, 64, 16, 16)).astype(np.float32), axis=1)
    assert kernel_calls[2:] == ["_normalize_segments", "_normalize_segments"]
    # channels-last with several samples per thread: the moments and apply passes per sample
    ops.instance_norm(rng.normal(size=(32, 16, 16, 64)).astype(np.float32), axis=-1)
    assert kernel_calls[4:] == ["_normalize_slabs"]


@pytest.mark.parametrize("view, kernel, knob", [
    ((64, 1, 1, 4096, 1), "_normalize_segments", "FUSED_SEGMENT_BYTES"),  # layer norm rows
    ((4, 1, 8, 4, 300), "_normalize_segments", "FUSED_SEGMENT_BYTES"),  # channels-first group norm
    ((16, 1, 32, 1, 100), "_normalize_segments", "FUSED_SEGMENT_BYTES"),  # channels-first instance norm
    ((8, 64, 16, 4, 1), "_normalize_slabs", "FUSED_SLAB_BYTES"),  # channels-last group norm (row mode)
    ((8, 64, 2, 32, 1), "_normalize_slabs", "FUSED_SLAB_BYTES"),  # channels-last, long groups (D >= 16)
    ((8, 128, 32, 1, 1), "_normalize_slabs", "FUSED_SLAB_BYTES"),  # channels-last instance norm
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_pass_and_two_pass_kernels_agree(view, kernel, knob, dtype, rng, kernel_calls, monkeypatch):
    """Groups up to the knob's size take the fused kernel; larger ones the two passes."""
    A, B, C, D, E = view
    threads = numba.get_num_threads()
    numba.set_num_threads(min(2, threads))  # the slab kernel wants 2 samples per thread: A = 8 is enough
    try:
        _check_one_and_two_pass(view, kernel, knob, dtype, rng, kernel_calls, monkeypatch)
    finally:
        numba.set_num_threads(threads)


def _check_one_and_two_pass(view, kernel, knob, dtype, rng, kernel_calls, monkeypatch):
    A, B, C, D, E = view
    x = rng.normal(rng.uniform(-50, 50), 3.0, size=view).astype(dtype)
    g, h = rng.normal(size=(C, D)).astype(dtype), rng.normal(size=(C, D)).astype(dtype)
    one = cpu.normalize(x, 1e-3, False, g, h)
    per_unit = (D * E if kernel == "_normalize_segments" else B * C * D) * x.itemsize
    monkeypatch.setattr(cpu, knob, per_unit - 1)  # just too large now
    two = cpu.normalize(x, 1e-3, False, g, h)
    assert kernel_calls == [kernel, "_moments_parallel", "_apply_parallel"]
    xs = x.astype(np.float64)
    mean = xs.mean(axis=(1, 3, 4))
    m2 = ((xs - mean[:, None, :, None, None]) ** 2).sum(axis=(1, 3, 4))
    want = (xs - mean[:, None, :, None, None]) / np.sqrt(m2 / (B * D * E) + 1e-3)[:, None, :, None, None]
    want = want * g[None, None, :, :, None] + h[None, None, :, :, None]
    atol = 1e-4 if dtype == np.float32 else 1e-10
    for y, got_mean, got_m2 in (one, two):
        np.testing.assert_allclose(got_mean, mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(got_m2, m2, rtol=1e-9)
        np.testing.assert_allclose(y, want, rtol=0, atol=atol)


# ---------------------------------------------------------------------------
# Channels-last: the four-row moments loop and the streamed apply pass


def _reference(x, g, h, eps=1e-3):
    """float64 training-mode norm of a view x[A, B, C, D, E]: (y, mean, m2)."""
    B, D, E = x.shape[1], x.shape[3], x.shape[4]
    xs = x.astype(np.float64)
    mean = xs.mean(axis=(1, 3, 4))
    m2 = ((xs - mean[:, None, :, None, None]) ** 2).sum(axis=(1, 3, 4))
    y = (xs - mean[:, None, :, None, None]) / np.sqrt(m2 / (B * D * E) + eps)[:, None, :, None, None]
    y = y * g.astype(np.float64)[None, None, :, :, None] + h.astype(np.float64)[None, None, :, :, None]
    return y, mean, m2


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 13])
@pytest.mark.parametrize("C, F", [(1, 1), (3, 1), (64, 1), (5, 3), (32, 2)])
def test_row_moments_any_row_count(rows, C, F, rng):
    """The channels-last moments loop takes four rows per step and the rest one by one."""
    x = rng.normal(rng.uniform(-1e3, 1e3), 1.0, size=(2, rows, C, F)).astype(np.float32)
    shift = cpu._shift(x)
    s1, s2 = np.empty((2, 1, C)), np.empty((2, 1, C))
    cpu._moments_serial(x, shift, 1, s1, s2)
    mean, m2, _, _ = cpu._finish(np.float64(rows * F), shift, s1, s2, 0.0, False)
    xs = x.astype(np.float64)
    np.testing.assert_allclose(mean, xs.mean(axis=(1, 3)), rtol=0, atol=1e-9)
    np.testing.assert_allclose(m2, ((xs - xs.mean(axis=(1, 3), keepdims=True)) ** 2).sum(axis=(1, 3)),
                               rtol=1e-9, atol=1e-12)


# [A, B, C, D, E] views with one statistic per (a, c) shared by many rows: row lengths C*D below,
# at and above one 64-byte line, odd and even, one and several samples
STREAM_VIEWS = [
    (1, 4099, 64, 1, 1),  # batch norm, NHWC
    (1, 3001, 37, 1, 1),  # odd channel count: lines straddle rows
    (1, 12007, 3, 1, 1),  # rows much shorter than a line
    (1, 257, 1030, 1, 1),  # rows longer than many lines
    (3, 1001, 8, 3, 1),  # group norm, NHWC, odd D
    (8, 509, 16, 4, 1),  # group norm with enough samples for the per-sample kernel
]


@pytest.mark.parametrize("view", STREAM_VIEWS, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_streamed_apply_equals_plain_stores(view, dtype, offset, rng, monkeypatch):
    """Streaming stores (large outputs) write exactly what plain stores write, wherever y starts
    relative to a 64-byte line (``offset`` elements into an allocation)."""
    A, B, C, D, E = view
    x = rng.normal(rng.uniform(-1e4, 1e4), 2.0, size=view).astype(dtype)
    center = x.astype(np.float64).mean(axis=(1, 3, 4))
    p = rng.uniform(0.5, 2, size=(A, C))
    g, h = rng.normal(size=(C, D)).astype(dtype), rng.normal(size=(C, D)).astype(dtype)
    monkeypatch.setattr(cpu, "STREAM_ABOVE", 1 << 62)
    plain = cpu.apply(x, center, p, g, h)
    monkeypatch.setattr(cpu, "STREAM_ABOVE", 0)
    out = np.full(x.size + 16, np.nan, dtype)[offset : offset + x.size].reshape(view)
    streamed = cpu.apply(x, center, p, g, h, out=out)
    assert streamed is out
    np.testing.assert_array_equal(streamed, plain)
    want = (x.astype(np.float64) - center[:, None, :, None, None]) * p[:, None, :, None, None]
    want = want * g[None, None, :, :, None] + h[None, None, :, :, None]
    # |x - center| = O(10), p <= 2, |g| = O(1): float32 ulps of O(100), float64 far below
    np.testing.assert_allclose(streamed, want, rtol=0, atol=1e-4 if dtype == np.float32 else 1e-10)


def test_streamed_apply_into_a_misaligned_output(rng, monkeypatch):
    """An output that does not even start on an element boundary takes plain stores throughout."""
    x = rng.normal(size=(1, 4000, 8, 1, 1)).astype(np.float32)
    out = np.ndarray(x.shape, np.float32, buffer=np.zeros(x.nbytes + 1, np.uint8), offset=1)
    assert not out.flags.aligned
    monkeypatch.setattr(cpu, "STREAM_ABOVE", 0)
    y = cpu.apply(x, np.zeros((1, 8)), np.ones((1, 8)), np.ones((8, 1), np.float32), np.zeros((8, 1), np.float32),
                  out=out)
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("view", STREAM_VIEWS, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_normalize_streamed_and_plain_match_the_reference(view, dtype, rng, monkeypatch):
    """Training mode on the channels-last paths (two parallel passes, or both passes per sample),
    with y streamed out and with plain stores, against float64; |mean| = 1e4 * std included."""
    A, B, C, D, E = view
    x = rng.normal(rng.uniform(-1e4, 1e4), 1.0, size=view).astype(dtype)
    g, h = rng.normal(size=(C, D)).astype(dtype), rng.normal(size=(C, D)).astype(dtype)
    want, mean, m2 = _reference(x, g, h)
    threads = numba.get_num_threads()
    numba.set_num_threads(min(2, threads))  # 8 samples: the per-sample kernel at 2 threads
    try:
        for limit in (1 << 62, 0):
            monkeypatch.setattr(cpu, "STREAM_ABOVE", limit)
            y, got_mean, got_m2 = cpu.normalize(x, 1e-3, False, g, h)
            np.testing.assert_allclose(got_mean, mean, rtol=1e-12, atol=0)
            np.testing.assert_allclose(got_m2, m2, rtol=1e-9)
            np.testing.assert_allclose(y, want, rtol=0, atol=2e-4 if dtype == np.float32 else 1e-9)
    finally:
        numba.set_num_threads(threads)


def test_large_channels_last_outputs_are_streamed(rng, monkeypatch):
    """The stream flag follows the output's size: STREAM_ABOVE bytes and up."""
    flags = []
    for name in ("_apply_parallel", "_normalize_slabs"):
        kernel = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _k=kernel: (flags.append(a[-1]), _k(*a))[1])
    x = rng.normal(size=(16, 8, 8, 64)).astype(np.float32)  # 256 KiB
    for limit, want in ((x.nbytes, True), (x.nbytes + 1, False)):
        monkeypatch.setattr(cpu, "STREAM_ABOVE", limit)
        ops.batch_norm(x)  # two passes
        ops.instance_norm(x)  # per sample
        assert flags[-2:] == [want, want]


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind, kwargs", [("batch", {"axis": -1}), ("group", {"axis": -1, "groups": 8})])
def test_half_inputs_on_the_streamed_path(dtype_name, kind, kwargs, rng, monkeypatch):
    """float16 and bfloat16 are computed in float32 (streamed there too) and returned in their dtype."""
    from reference import BFLOAT16

    dtype = BFLOAT16 if dtype_name == "bfloat16" else np.float16
    monkeypatch.setattr(cpu, "STREAM_ABOVE", 0)
    x = rng.normal(2.0, 3.0, size=(8, 16, 17, 32)).astype(dtype)  # parallel kernels (>= SERIAL_BELOW)
    y, m = ops.norm(kind, x, **kwargs)
    assert y.dtype == dtype
    ref = REFERENCES[kind](x.astype(np.float64), epsilon=1e-3, **kwargs)
    assert_y_close(y, ref, dtype)
    assert_stats_close(m.mean, m.variance, x.astype(np.float64), ref, dtype)


# ---------------------------------------------------------------------------
# Threads


def _thread_cases(rng):
    """Per thread: (call, check) pairs above and below the serial threshold."""
    small = rng.normal(1.0, 2.0, size=(8, 16, 24)).astype(np.float32)  # 3072 elements
    big = rng.normal(-2.0, 0.5, size=(16, 32, 8, 20)).astype(np.float32)  # 81920 elements
    gamma = rng.normal(size=20)
    return [
        (lambda: ops.layer_norm(small), REFERENCES["layer"](small), small),
        (lambda: ops.batch_norm(big, gamma=gamma), REFERENCES["batch"](big, gamma=gamma), big),
        (lambda: ops.group_norm(big, groups=4), REFERENCES["group"](big, groups=4), big),
        (lambda: ops.instance_norm(big, axis=1), REFERENCES["instance"](big, axis=1), big),
    ]


def test_concurrent_calls_from_eight_threads(rng):
    """8 threads normalize their own data at once, many times, and check every result.

    numba's default workqueue threading layer aborts the whole process when
    two threads enter a parallel region together; the kernels must run on a
    thread-safe layer instead.
    """
    seeds = rng.integers(0, 2**32, size=8)
    work = [_thread_cases(np.random.default_rng(s)) for s in seeds]
    errors, start = [], threading.Barrier(8)

    def worker(cases):
        try:
            start.wait(timeout=60)
            for _ in range(12):
                for call, ref, x in cases:
                    y, m = call()
                    assert_y_close(y, ref, x.dtype)
                    assert_stats_close(m.mean, m.variance, x, ref, x.dtype)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, f"{len(errors)} threads failed, first: {errors[0]!r}"
    assert cpu.threading_layer() in THREAD_SAFE_LAYERS


def test_a_fresh_process_picks_a_thread_safe_layer_by_itself():
    """Without NUMBA_THREADING_LAYER set, importing normsvc selects omp or tbb.

    Runs in a subprocess so that an abort there fails this test instead of
    killing the test run, and so that no earlier parallel call in this
    process has already fixed the layer.
    """
    script = textwrap.dedent(
        """
        import threading
        import numpy as np
        import normsvc
        from normsvc.kernels import cpu
        x = np.random.default_rng(0).normal(size=(64, 32, 64)).astype(np.float32)
        want = normsvc.batch_norm(x)[0]
        bad = []
        def work():
            for _ in range(10):
                if not np.array_equal(normsvc.batch_norm(x)[0], want):
                    bad.append(1)
        ts = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        print(cpu.threading_layer(), len(bad))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    layer, bad = done.stdout.split()
    assert layer in THREAD_SAFE_LAYERS
    assert bad == "0"


_IDLE_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time
    import numpy as np
    import normsvc
    from normsvc.kernels import cpu
    x = np.random.default_rng(0).normal(size=(4096, 256)).astype(np.float32)
    assert x.size >= cpu.SERIAL_BELOW  # the parallel kernels
    for _ in range(5):
        normsvc.batch_norm(x)
    burnt = 0.0
    for _ in range(20):
        time.sleep(0.02)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        normsvc.batch_norm(x)
        t1 = time.perf_counter()
        time.sleep(0.03)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        # CPU beyond the call's own wall time: the workers' share of the call, then their idling
        burnt += (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) - (t1 - t0)
    import numba
    print(cpu.threading_layer(), numba.get_num_threads(), burnt / 20)
    """
)


def _idle_cpu(env_changes: dict) -> tuple[str, int, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", _IDLE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    layer, threads, burnt = done.stdout.split()
    return layer, int(threads), float(burnt)


def test_idle_openmp_workers_do_not_keep_a_core_busy_after_a_call():
    """libgomp's default spin (300,000 iterations) burnt ~8 ms of a core after every call here;
    with normsvc's GOMP_SPINCOUNT the workers sleep within about 0.4 ms."""
    layer, threads, burnt = _idle_cpu({})
    if layer != "omp" or threads < 2:
        pytest.skip(f"needs the OpenMP layer with 2+ threads (have {layer}, {threads} threads)")
    assert burnt < 3e-3, f"{burnt * 1e3:.1f} ms of CPU burnt per call beyond its wall time"


def test_the_environment_keeps_its_openmp_wait_policy():
    script = "import os, normsvc.kernels.cpu; print(os.environ.get('GOMP_SPINCOUNT'))"
    for env, want in (({"OMP_WAIT_POLICY": "active"}, "None"), ({"GOMP_SPINCOUNT": "5"}, "5"), ({}, "10000")):
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        done = subprocess.run([sys.executable, "-c", script], env={**base, **env}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == want, env
