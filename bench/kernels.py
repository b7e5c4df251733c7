"""CPU kernel benchmark: normsvc against PyTorch, numpy and a plain copy.

Run with ``make bench`` (or ``python bench/kernels.py [--rounds N]``).
Every case is float32, forward, training mode (batch statistics).  The
implementations are interleaved round by round, in a shuffled order each
round (a case that follows a large plain-store write pays for writing that
output back, so no implementation always follows the same one), and the
tables report medians, because the machines this runs on are shared and
noisy.

By default the suite runs twice, each time in a fresh process: once with
torch imported before normsvc (as most users import it) and once with
normsvc imported, and its parallel kernels started, before torch.  The order
decides which OpenMP runtime the process ends up with and how long its idle
threads spin (see docs/benchmarks.md); the table gives both runs side by
side and, per case, the worse torch/normsvc ratio of the two.
``--import-first torch|normsvc`` runs one order only, in this process.

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
``--stream`` times the channels-last cases with y written by streaming
stores and by plain stores, alone and followed by a read of y (what the
next layer does), which is how ``cpu.STREAM_ABOVE`` was chosen.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import numpy as np

# imported by _import_in_order, in the order the run asks for
normsvc = cpu = torch = F = None
ORDERS = ("torch", "normsvc")


def _import_in_order(first: str) -> dict:
    """Import torch and normsvc, ``first`` first; returns what decided the OpenMP runtime.

    normsvc first also makes one parallel call before torch is imported, so
    that numba's OpenMP layer is loaded first (the other way round from
    torch first); either way one libgomp ends up serving both libraries.
    """
    global normsvc, cpu
    spin_env = {k: os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}

    def import_torch():
        global torch, F
        try:
            import torch
            import torch.nn.functional as F
        except ImportError:  # the table still runs, without the torch column
            torch = None

    if first == "torch":
        import_torch()
        seen = spin_env  # torch's libgomp read the environment as it was before normsvc
    import normsvc
    from normsvc.kernels import cpu

    if first == "normsvc":
        seen = {k: os.environ.get(k) for k in spin_env}  # normsvc may have set GOMP_SPINCOUNT
        normsvc.batch_norm(np.ones((64, 64, 64), np.float32))  # starts numba's OpenMP layer
        import_torch()
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
    runtimes = sorted({line.split()[-1] for line in maps.splitlines() if "libgomp" in line})
    return {"first": first, "openmp_env_at_load": seen, "libgomp": runtimes}


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


def _busy_ticks() -> tuple[int, int]:
    """(CPU ticks all processes spent busy, ticks this process spent), from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except OSError:
        return 0, 0
    t = os.times()
    return v[0] + v[1] + v[2] + v[5] + v[6], round((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


def other_load(start: tuple[int, int], wall: float) -> float:
    """Cores' worth of CPU other processes used since ``start`` (what makes a shared machine noisy)."""
    end = _busy_ticks()
    return ((end[0] - start[0]) - (end[1] - start[1])) / os.sysconf("SC_CLK_TCK") / max(wall, 1e-9)


def measure(rounds: int) -> list[dict]:
    """Per case: the median ms of each implementation (normsvc, torch, numpy, copy)."""
    rng = np.random.default_rng(0)
    order = random.Random(0)
    threads = cpu.numba.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    rows = []
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
        keys = list(impls)
        for _ in range(rounds):
            order.shuffle(keys)
            for key in keys:
                fn, arg = impls[key]
                samples[key].append(_timer(fn, arg, inner))
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        rows.append({"case": name, "bytes": x.nbytes, **med})
    return rows


def _ratio(row: dict) -> float:
    return row["torch"] / row["normsvc"] if "torch" in row else float("nan")


def _geomean(values) -> float:
    good = [v for v in values if not math.isnan(v)]
    return math.exp(sum(math.log(v) for v in good) / len(good)) if good else float("nan")


def format_table(rows: list[dict]) -> str:
    head = ("| case | normsvc ms | torch ms | numpy ms | copy ms | torch/normsvc | copy/normsvc | normsvc GB/s |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        gbs = 2 * r["bytes"] / (r["normsvc"] * 1e-3) / 1e9
        lines.append(f"| {r['case']} | {r['normsvc']:.3f} | {r.get('torch', float('nan')):.3f} | {r['numpy']:.3f} | "
                     f"{r['copy']:.3f} | {_ratio(r):.2f} | {r['copy'] / r['normsvc']:.2f} | {gbs:.1f} |")
    lines.append(f"\ngeometric-mean speed-up over torch: {_geomean(_ratio(r) for r in rows):.2f}x")
    return "\n".join(lines)


def run_table(rounds: int) -> str:
    return format_table(measure(rounds))


def _child(first: str, rounds: int) -> dict:
    """One import order in a fresh process (the environment passed on unchanged)."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--import-first", first, "--rounds",
                           str(rounds), "--json"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the run with {first} imported first failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_both_orders(rounds: int) -> str:
    """The suite once per import order (fresh processes); per case the worse torch/normsvc ratio."""
    runs = {first: _child(first, rounds) for first in ORDERS}
    lines = []
    for first, run in runs.items():
        info = run["info"]
        env = ", ".join(f"{k}={v}" for k, v in info["openmp_env_at_load"].items() if v is not None) or "unset"
        lines.append(f"# {first} imported first: OpenMP runtime {' + '.join(info['libgomp']) or 'none'}; "
                     f"GOMP_SPINCOUNT/OMP_WAIT_POLICY when it loaded: {env}; other processes used "
                     f"{info['other_load']:.2f} cores during the run")
    lines += ["",
              "| case | torch first: normsvc ms | torch ms | torch/normsvc | normsvc first: normsvc ms | torch ms | "
              "torch/normsvc | worse torch/normsvc | copy/normsvc (worse run) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    worst = []
    by_case = [{first: row for first, row in zip(ORDERS, rows)} for rows in zip(*(runs[f]["rows"] for f in ORDERS))]
    for case in by_case:
        a, b = case["torch"], case["normsvc"]
        ratios = {first: _ratio(case[first]) for first in ORDERS}
        worse = min(ORDERS, key=lambda f: ratios[f] if not math.isnan(ratios[f]) else math.inf)
        worst.append((a["case"], ratios[worse]))
        nan = float("nan")
        lines.append(f"| {a['case']} | {a['normsvc']:.3f} | {a.get('torch', nan):.3f} | {ratios['torch']:.2f} | "
                     f"{b['normsvc']:.3f} | {b.get('torch', nan):.3f} | {ratios['normsvc']:.2f} | "
                     f"**{ratios[worse]:.2f}** | {case[worse]['copy'] / case[worse]['normsvc']:.2f} |")
    lines.append(f"\ngeometric-mean speed-up over torch, worse order per case: {_geomean(r for _, r in worst):.2f}x")
    slower = [f"{name} ({r:.2f}x)" for name, r in worst if r < 1.0]
    lines.append("slower than torch in some order: " + (", ".join(slower) if slower else "none"))
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


def run_stream(rounds: int) -> str:
    """Channels-last norms with y streamed out and with plain stores, alone and followed by a read of y."""
    rng = np.random.default_rng(0)
    limit = cpu.STREAM_ABOVE
    lines = ["| case | MiB | plain ms | streamed ms | plain + read of y ms | streamed + read of y ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    order = random.Random(0)
    try:
        for kind in ("batch", "group(32)"):
            for n in (8, 16, 20, 24, 32):
                x = rng.standard_normal((n, 56, 56, 64), dtype=np.float32)
                if kind == "batch":
                    norm = lambda: normsvc.batch_norm(x, axis=-1)  # noqa: E731
                else:
                    norm = lambda: normsvc.group_norm(x, groups=32, axis=-1)  # noqa: E731

                def variant(streamed, read, norm=norm):
                    def call():
                        cpu.STREAM_ABOVE = 0 if streamed else 1 << 62
                        y = norm()[0]
                        if read:
                            y.sum()
                    return call

                impls = {(s_, r_): variant(s_, r_) for s_ in (False, True) for r_ in (False, True)}
                for fn in impls.values():
                    fn()
                samples = {k: [] for k in impls}
                keys = list(impls)
                for _ in range(rounds):
                    order.shuffle(keys)
                    for key in keys:
                        samples[key].append(_timer(lambda _: impls[key](), None, 1))
                med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
                lines.append(f"| {kind} {n}x56x56x64 | {x.nbytes / 2**20:.1f} | {med[False, False]:.3f} | "
                             f"{med[True, False]:.3f} | {med[False, True]:.3f} | {med[True, True]:.3f} |")
    finally:
        cpu.STREAM_ABOVE = limit
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case (median reported)")
    ap.add_argument("--import-first", choices=ORDERS,
                    help="one run in this process with this import order (default: both, in fresh processes)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a child's rows, for the parent
    ap.add_argument("--threshold", action="store_true", help="time serial vs parallel kernels instead")
    ap.add_argument("--fusion", action="store_true", help="time one-pass vs two-pass kernels instead")
    ap.add_argument("--stream", action="store_true", help="time streamed vs plain stores of y instead")
    args = ap.parse_args(argv)
    both = args.import_first is None and not (args.threshold or args.fusion or args.stream)
    info = None if both else _import_in_order(args.import_first or "torch")
    if args.json:
        start, t0 = _busy_ticks(), time.perf_counter()
        rows = measure(args.rounds)
        info["other_load"] = other_load(start, time.perf_counter() - t0)
        print(json.dumps({"info": info, "rows": rows}))
        return 0
    import numba  # for the header; normsvc is not imported here when the children do the work

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"Python {platform.python_version()}, numba {numba.__version__}, numpy {np.__version__}"
    try:
        from importlib.metadata import version

        versions += f", torch {version('torch')}"
    except Exception:  # noqa: BLE001 - torch is optional
        versions += ", torch absent"
    print(f"# {now} | {platform.machine()}, {os.cpu_count()} cores, {versions}, threads {numba.get_num_threads()}")
    if both:
        print(run_both_orders(args.rounds))
        return 0
    run = run_threshold if args.threshold else run_fusion if args.fusion else run_stream if args.stream else run_table
    print(f"# {info['first']} imported first; OpenMP runtime {' + '.join(info['libgomp']) or 'none'}")
    print(run(args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
