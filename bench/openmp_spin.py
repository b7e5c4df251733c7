"""How long idle OpenMP workers spin: call latency vs CPU burnt after each call.

    python bench/openmp_spin.py [--rounds N]

normsvc sets ``GOMP_SPINCOUNT`` (see normsvc.kernels.cpu.SPIN_COUNT) unless
the environment sets it or ``OMP_WAIT_POLICY``.  For each setting, a fresh
process times back-to-back calls at a few sizes (best of 5 repeats) and the
CPU burnt beyond each call's wall time when calls are 20 ms apart (what a
server between requests pays).  Settings run interleaved, ``--rounds`` times;
the table gives medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, timeit
import numpy as np
import normsvc
rng = np.random.default_rng(0)
cases = [("layer 256x256", normsvc.layer_norm, (256, 256)), ("layer 1024x256", normsvc.layer_norm, (1024, 256)),
         ("batch 4096x256", normsvc.batch_norm, (4096, 256)), ("batch 64x3136x64", normsvc.batch_norm, (64, 3136, 64))]
out = {}
for name, fn, shape in cases:
    x = rng.standard_normal(shape, dtype=np.float32)
    for _ in range(20):
        fn(x)
    n = max(20, int(0.3 / max(1e-6, timeit.timeit(lambda: fn(x), number=5) / 5)))
    out[name] = min(timeit.repeat(lambda: fn(x), number=n, repeat=5)) / n
x = rng.standard_normal((4096, 256), dtype=np.float32)
burnt = 0.0
for _ in range(30):
    time.sleep(0.02)
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    normsvc.batch_norm(x)
    t1 = time.perf_counter(); time.sleep(0.03); r1 = resource.getrusage(resource.RUSAGE_SELF)
    burnt += (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) - (t1 - t0)
out["idle CPU after a call"] = burnt / 30
print(json.dumps(out))
"""

SETTINGS = {
    "normsvc default (GOMP_SPINCOUNT=10000)": {},
    "libgomp default (GOMP_SPINCOUNT=300000)": {"GOMP_SPINCOUNT": "300000"},
    "OMP_WAIT_POLICY=passive": {"OMP_WAIT_POLICY": "passive"},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base["PYTHONPATH"] = root + os.pathsep + base.get("PYTHONPATH", "")
    results = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            done = subprocess.run([sys.executable, "-c", CHILD], env={**base, **env}, capture_output=True,
                                  text=True, check=True)
            results[name].append(json.loads(done.stdout))
    cols = list(results[next(iter(SETTINGS))][0])
    print("| setting | " + " | ".join(f"{c} (us)" for c in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for name, runs in results.items():
        cells = [f"{statistics.median(r[c] for r in runs) * 1e6:,.0f}" for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
