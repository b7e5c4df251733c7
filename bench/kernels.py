"""CPU kernel benchmark: normsvc against PyTorch, numpy and a plain copy.

Run with ``make bench`` (or ``python bench/kernels.py [--rounds N]``).
Every case is float32, forward, training mode (batch statistics).  The
implementations are interleaved round by round and the table reports
medians, because the machines this runs on are shared and noisy.

Columns: milliseconds per call for normsvc, PyTorch (same thread count),
numpy (float32, the obvious expression) and a plain copy of the same bytes;
then torch/normsvc (>1: normsvc faster) and copy/normsvc (the fraction of
the memory-bandwidth limit reached: a norm reads x at least once and writes
y once, as the copy does).

``--threshold`` instead times the serial and parallel kernel variants on
growing inputs, which is how ``normsvc.kernels.cpu.SERIAL_BELOW`` was chosen.
``--fusion`` times the one-pass kernel for contiguous groups (layer and RMS
norm, channels-first instance and group norm, up to
``cpu.FUSED_SEGMENT_BYTES`` per group) against the two passes it replaced.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

import normsvc
from normsvc.kernels import cpu

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the table still runs, without the torch column
    torch = None


def _cases(rng):
    """(name, x, normsvc fn, torch fn or None, numpy fn)."""

    def t_cl(x):  # NHWC array -> NCHW tensor in channels_last memory (no copy)
        return torch.from_numpy(x).permute(0, 3, 1, 2)

    def np_norm(x, axes, eps=1e-3):
        m = x.mean(axis=axes, keepdims=True)
        v = x.var(axis=axes, keepdims=True)
        return (x - m) / np.sqrt(v + eps)

    def np_group_cl(x, g):
        n, h, w, c = x.shape
        return np_norm(x.reshape(n, h, w, g, c // g), (1, 2, 4)).reshape(x.shape)

    def np_group_cf(x, g):
        n, c, h, w = x.shape
        return np_norm(x.reshape(n, g, c // g, h, w), (2, 3, 4)).reshape(x.shape)

    def rnd(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    cases = []
    x = rnd(32, 56, 56, 64)
    cases.append(("batch NHWC 32x56x56x64", x, lambda x: normsvc.batch_norm(x, axis=-1),
                  torch and (lambda t: F.batch_norm(t, None, None, training=True, eps=1e-3)), t_cl,
                  lambda x: np_norm(x, (0, 1, 2))))
    x = rnd(32, 64, 56, 56)
    cases.append(("batch NCHW 32x64x56x56", x, lambda x: normsvc.batch_norm(x, axis=1),
                  torch and (lambda t: F.batch_norm(t, None, None, training=True, eps=1e-3)), None,
                  lambda x: np_norm(x, (0, 2, 3))))
    for m, k in ((8192, 1024), (2048, 8192)):
        x = rnd(m, k)
        cases.append((f"layer {m}x{k}", x, lambda x: normsvc.layer_norm(x, axis=-1),
                      torch and (lambda t, k=k: F.layer_norm(t, (k,), eps=1e-3)), None,
                      lambda x: np_norm(x, (1,))))
    x = rnd(32, 56, 56, 64)
    cases.append(("group(32) NHWC 32x56x56x64", x, lambda x: normsvc.group_norm(x, groups=32, axis=-1),
                  torch and (lambda t: F.group_norm(t, 32, eps=1e-3)), t_cl, lambda x: np_group_cl(x, 32)))
    x = rnd(32, 64, 56, 56)
    cases.append(("group(32) NCHW 32x64x56x56", x, lambda x: normsvc.group_norm(x, groups=32, axis=1),
                  torch and (lambda t: F.group_norm(t, 32, eps=1e-3)), None, lambda x: np_group_cf(x, 32)))
    x = rnd(32, 56, 56, 64)
    # torch's instance_norm has no channels-last kernel; group_norm with one group per channel does
    cases.append(("instance NHWC 32x56x56x64", x, lambda x: normsvc.instance_norm(x, axis=-1),
                  torch and (lambda t: F.group_norm(t, 64, eps=1e-3)), t_cl, lambda x: np_norm(x, (1, 2))))
    x = rnd(32, 64, 56, 56)
    cases.append(("instance NCHW 32x64x56x56", x, lambda x: normsvc.instance_norm(x, axis=1),
                  torch and (lambda t: F.instance_norm(t, eps=1e-3)), None, lambda x: np_norm(x, (2, 3))))
    x = rnd(8192, 1024)
    cases.append(("rms 8192x1024", x, lambda x: normsvc.rms_norm(x, axis=-1),
                  torch and (lambda t: F.rms_norm(t, (1024,), eps=1e-6)), None,
                  lambda x: x / np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-6)))
    x = rnd(32, 256)
    cases.append(("layer 32x256 (latency)", x, lambda x: normsvc.layer_norm(x, axis=-1),
                  torch and (lambda t: F.layer_norm(t, (256,), eps=1e-3)), None, lambda x: np_norm(x, (1,))))
    return cases


def _timer(fn, arg, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn(arg)
    return (time.perf_counter() - t0) / inner


def run_table(rounds: int) -> str:
    rng = np.random.default_rng(0)
    threads = cpu.numba.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    rows, ratios = [], []
    for name, x, ours, theirs, to_torch, ref in _cases(rng):
        dst = np.empty_like(x)
        impls = {"normsvc": (ours, x), "numpy": (ref, x), "copy": (lambda a: np.copyto(dst, a), x)}
        if theirs:
            impls["torch"] = (theirs, to_torch(x) if to_torch else torch.from_numpy(x))
        inner = max(1, int(2e6 // x.size))  # small cases: time many calls per sample
        for fn, arg in impls.values():  # warm-up (compilation, page faults)
            fn(arg)
            fn(arg)
        samples = {k: [] for k in impls}
        for _ in range(rounds):
            for key, (fn, arg) in impls.items():
                samples[key].append(_timer(fn, arg, inner))
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        t_ratio = med["torch"] / med["normsvc"] if "torch" in med else float("nan")
        ratios.append(t_ratio)
        gbs = 2 * x.nbytes / (med["normsvc"] * 1e-3) / 1e9
        rows.append((name, med["normsvc"], med.get("torch", float("nan")), med["numpy"], med["copy"],
                     t_ratio, med["copy"] / med["normsvc"], gbs))
    head = ("| case | normsvc ms | torch ms | numpy ms | copy ms | torch/normsvc | copy/normsvc | normsvc GB/s |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head] + [
        f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.1f} |"
        for r in rows
    ]
    good = [r for r in ratios if not math.isnan(r)]
    if good:
        geo = math.exp(sum(math.log(r) for r in good) / len(good))
        lines.append(f"\ngeometric-mean speed-up over torch: {geo:.2f}x")
    return "\n".join(lines)


def run_threshold(rounds: int) -> str:
    """Serial vs parallel kernel time on batch-norm-shaped inputs of growing size."""
    rng = np.random.default_rng(0)
    lines = ["| elements | serial us | parallel us | parallel/serial |", "| ---: | ---: | ---: | ---: |"]
    for log2 in range(10, 21, 2):
        n = 1 << log2
        x = rng.standard_normal((n // 64, 64), dtype=np.float32).reshape(1, n // 64, 64, 1)
        shift = np.ascontiguousarray(x[:, 0, :, 0], dtype=np.float64)
        nb = cpu._chunks(1, x.shape[1], True)
        ser = (lambda: cpu._moments_serial(x, shift, 1, np.empty((1, 1, 64)), np.empty((1, 1, 64))))
        par = (lambda: cpu._moments_parallel(x, shift, nb, np.empty((1, nb, 64)), np.empty((1, nb, 64))))
        ser(), par()
        inner = max(1, int(2e6 // n))
        ts, tp = [], []
        for _ in range(rounds):
            ts.append(_timer(lambda _: ser(), None, inner))
            tp.append(_timer(lambda _: par(), None, inner))
        s, p = statistics.median(ts) * 1e6, statistics.median(tp) * 1e6
        lines.append(f"| {n} | {s:.1f} | {p:.1f} | {p / s:.2f} |")
    return "\n".join(lines)


def run_fusion(rounds: int) -> str:
    """One pass per contiguous group (normalized from cache) vs the moments pass + apply pass."""
    rng = np.random.default_rng(0)
    cases = [
        ("layer 8192x1024", normsvc.layer_norm, (8192, 1024), {}),
        ("layer 2048x8192", normsvc.layer_norm, (2048, 8192), {}),
        ("rms 8192x1024", normsvc.rms_norm, (8192, 1024), {}),
        ("group(32) NCHW 32x64x56x56", normsvc.group_norm, (32, 64, 56, 56), dict(axis=1, groups=32)),
        ("instance NCHW 32x64x56x56", normsvc.instance_norm, (32, 64, 56, 56), dict(axis=1)),
        ("layer 256x256", normsvc.layer_norm, (256, 256), {}),
        ("instance NCHW 8x64x32x32", normsvc.instance_norm, (8, 64, 32, 32), dict(axis=1)),
        ("group(32) NHWC 32x56x56x64", normsvc.group_norm, (32, 56, 56, 64), dict(axis=-1, groups=32)),
        ("instance NHWC 32x56x56x64", normsvc.instance_norm, (32, 56, 56, 64), dict(axis=-1)),
        ("group(32) NHWC 8x32x32x256", normsvc.group_norm, (8, 32, 32, 256), dict(axis=-1, groups=32)),
    ]
    fused = (cpu.FUSED_SEGMENT_BYTES, cpu.FUSED_SLAB_BYTES)
    lines = ["| case | one pass ms | two passes ms | two / one |", "| --- | ---: | ---: | ---: |"]
    try:
        for name, fn, shape, kw in cases:
            x = rng.standard_normal(shape, dtype=np.float32)
            inner = max(1, int(2e6 // x.size))
            samples = {fused: [], (0, 0): []}
            for _ in range(rounds):
                for setting in samples:
                    cpu.FUSED_SEGMENT_BYTES, cpu.FUSED_SLAB_BYTES = setting
                    fn(x, **kw)  # warm-up: compilation, page faults
                    samples[setting].append(_timer(lambda a: fn(a, **kw), x, inner))
            one, two = (statistics.median(samples[k]) * 1e3 for k in (fused, (0, 0)))
            lines.append(f"| {name} | {one:.3f} | {two:.3f} | {two / one:.2f} |")
    finally:
        cpu.FUSED_SEGMENT_BYTES, cpu.FUSED_SLAB_BYTES = fused
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case (median reported)")
    ap.add_argument("--threshold", action="store_true", help="time serial vs parallel kernels instead")
    ap.add_argument("--fusion", action="store_true", help="time one-pass vs two-pass kernels instead")
    args = ap.parse_args(argv)
    print(f"# {datetime.date.today()} | {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, numba {cpu.numba.__version__}, numpy {np.__version__}, "
          f"torch {torch.__version__ if torch else 'absent'}, threads {cpu.numba.get_num_threads()}")
    run = run_threshold if args.threshold else run_fusion if args.fusion else run_table
    print(run(args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
