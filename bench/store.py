"""Store benchmark: running-statistics updates per second, next to a bare SQLite write.

Run with ``python bench/store.py [--rounds N] [--channels C] [--seconds S]``.

Each case pushes the moments of one batch (count, mean and m2 of C float64
channels) to one layer, over and over, for about ``--seconds`` per round;
cases are interleaved round by round and the table reports medians, because
the machines this runs on are shared and noisy.

Cases:

* ``memory``: ``Layer.update`` on ``memory://``;
* ``sqlite``: ``Layer.update`` on ``sqlite:///...`` (WAL, synchronous=NORMAL),
  then with a ``request_id`` (one more row written per update), then with
  synchronous=FULL (an fsync per update: power-loss durability);
* ``update_many``: 16 such layers per ``Store.update_many`` call on sqlite
  (rate in layer updates per second);
* ``bare sqlite``: the floor: ``BEGIN IMMEDIATE; UPDATE`` one row with the
  same bytes (two C x float64 blobs and the counters)``; COMMIT`` on a plain
  connection with the same settings, nothing else.

The last column is the bare transaction's time over the case's: the share
of an update that is SQLite's own work (1.0: no overhead of ours).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time

import numpy as np

import normsvc
from normsvc import Moments


def _moments(rng, channels: int) -> Moments:
    x = rng.normal(size=(32, channels))
    return Moments(np.float64(32), x.mean(axis=0), x.var(axis=0) * 32)


def _rate(step, seconds: float) -> float:
    """Calls per second of ``step`` over about ``seconds`` (at least 20 calls)."""
    n, start = 0, time.perf_counter()
    while True:
        step()
        n += 1
        elapsed = time.perf_counter() - start
        if n >= 20 and elapsed >= seconds:
            return n / elapsed


class _Bare:
    """The floor: one plain SQLite transaction writing the same bytes as an update."""

    def __init__(self, path: str, channels: int):
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("CREATE TABLE t (name TEXT PRIMARY KEY, mean BLOB, variance BLOB, count REAL, "
                          "num_batches INTEGER, version INTEGER, updated_at REAL)")
        self.conn.execute("INSERT INTO t VALUES ('bn', NULL, NULL, 0, 0, 0, 0)")
        self.blob = np.random.default_rng(0).normal(size=channels).astype("<f8").tobytes()
        self.i = 0

    def step(self):
        self.i += 1
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("UPDATE t SET mean = ?, variance = ?, count = ?, num_batches = ?, version = ?, "
                          "updated_at = ? WHERE name = 'bn'",
                          (self.blob, self.blob, 32.0 * self.i, self.i, self.i, time.time()))
        self.conn.execute("COMMIT")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=0.5, help="per case per round")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    m = _moments(rng, args.channels)

    with tempfile.TemporaryDirectory(prefix="normsvc-bench-") as tmp:
        stores = {
            "memory": normsvc.Store.open("memory://"),
            "sqlite": normsvc.Store.open(f"sqlite:///{tmp}/normal.db"),
            "sqlite full": normsvc.Store.open(f"sqlite:///{tmp}/full.db", synchronous="full"),
        }
        layers = {k: s.create_layer("bn", momentum=0.99) for k, s in stores.items()}
        many_names = [f"net/bn{i}" for i in range(16)]
        for name in many_names:
            stores["sqlite"].create_layer(name, momentum=0.99)
        many = {name: m for name in many_names}
        bare = _Bare(f"{tmp}/bare.db", args.channels)
        counter = iter(range(10**12))

        cases = {
            "memory: Layer.update": (lambda: layers["memory"].update(m), 1),
            "sqlite: Layer.update": (lambda: layers["sqlite"].update(m), 1),
            "sqlite: Layer.update + request_id": (
                lambda: layers["sqlite"].update(m, request_id=f"r{next(counter)}"), 1),
            "sqlite FULL: Layer.update": (lambda: layers["sqlite full"].update(m), 1),
            f"sqlite: update_many, {len(many)} layers": (lambda: stores["sqlite"].update_many(many), len(many)),
            "bare sqlite transaction, same bytes": (bare.step, 1),
        }
        rates = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, (step, per_call) in cases.items():
                rates[name].append(_rate(step, args.seconds) * per_call)
        for s in stores.values():
            s.close()
        bare.conn.close()

    med = {name: statistics.median(r) for name, r in rates.items()}
    floor = med["bare sqlite transaction, same bytes"]
    print(f"# normsvc store benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}, numpy {np.__version__}")
    print(f"# {args.channels} channels (float64), {args.rounds} interleaved rounds of ~{args.seconds}s, medians")
    print()
    print("| case | updates/s | us/update | bare sqlite / case |")
    print("| --- | ---: | ---: | ---: |")
    for name, rate in med.items():
        lo, hi = min(rates[name]), max(rates[name])
        print(f"| {name} | {rate:,.0f} ({lo:,.0f} to {hi:,.0f}) | {1e6 / rate:,.1f} | {rate / floor:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
