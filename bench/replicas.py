"""Scale-out benchmark: UpdateStats through one and two ``normsvc serve`` replicas on one Redis.

Run with ``python bench/replicas.py [--rounds N] [--seconds S] [--callers C]``
(needs ``redis-server`` on the PATH and the redis extra).

It starts a redis-server (appendonly yes, appendfsync everysec: the setting
deploy/compose.yaml uses) and two replicas (``normsvc serve --store
redis://...``) in subprocesses, then runs ``--callers`` closed-loop callers
(threads with one Client each) against:

* ``sqlite, 1 server``: the embedded default, for reference;
* ``redis, 1 replica``: every caller on replica A;
* ``redis, 2 replicas``: callers alternate between A and B;

each with every caller updating ONE shared layer (the worst case: every
commit conflicts with the others' and is retried) and with one layer per
caller (no conflicts).  Cases are interleaved round by round; the table
reports medians of requests per second.  On a 2-core machine the callers,
both replicas and Redis share the same two cores, so two replicas cannot
show their gain in throughput here: the figures say what one Redis costs
per update and how contention on one layer behaves.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import normsvc
from normsvc import Client, Moments


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(store: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "normsvc.cli", "serve", "--port", "0", "--store", store,
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("normsvc serving on "):
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, line.rsplit(" ", 1)[1]


def _closed_loop(addresses, callers: int, seconds: float, shared: bool, tag: str) -> float:
    clients = [Client(addresses[i % len(addresses)]) for i in range(callers)]
    rng = np.random.default_rng(0)
    m = Moments.from_samples(rng.normal(size=(32, 256)))
    names = [f"bench/{tag}/shared" if shared else f"bench/{tag}/{i}" for i in range(callers)]
    for name in set(names):
        clients[0].create_layer(name, num_features=256)
    counts = [0] * callers
    stop = threading.Event()

    def worker(i):
        layer = clients[i].layer(names[i])
        while not stop.is_set():
            layer.update(m)
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(callers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for c in clients:
        c.close()
    return sum(counts) / elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per case per round")
    p.add_argument("--callers", type=int, default=16)
    args = p.parse_args(argv)
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    tmp = tempfile.mkdtemp(prefix="normsvc-bench-")
    port = _free_port()
    redis_proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
                                   "--appendonly", "yes", "--appendfsync", "everysec"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    url = f"redis://127.0.0.1:{port}/0"
    procs = []
    try:
        a, addr_a = _serve(url)
        b, addr_b = _serve(url)
        s, addr_s = _serve(f"sqlite:///{tmp}/stats.db")
        procs = [a, b, s]
        cases = {"sqlite, 1 server": [addr_s], "redis, 1 replica": [addr_a], "redis, 2 replicas": [addr_a, addr_b]}
        results = {(case, shared): [] for case in cases for shared in (True, False)}
        for r in range(args.rounds):
            for (case, shared) in results:
                tag = f"r{r}{'s' if shared else 'd'}{case[0]}{len(cases[case])}"
                results[case, shared].append(_closed_loop(cases[case], args.callers, args.seconds, shared, tag))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, normsvc {normsvc.__version__}, "
          f"{args.callers} callers, {args.rounds} rounds x {args.seconds} s, medians (min to max)")
    print()
    print("| store and servers | one shared layer: updates/s | a layer per caller: updates/s |")
    print("| --- | ---: | ---: |")
    for case in cases:
        cells = []
        for shared in (True, False):
            values = results[case, shared]
            cells.append(f"{statistics.median(values):,.0f} ({min(values):,.0f} to {max(values):,.0f})")
        print(f"| {case} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
