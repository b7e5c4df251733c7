"""Durability of the sqlite backend: every acknowledged update survives kill -9.

A child process pushes updates and prints the index of each one that returned
(was acknowledged); the test kills it with SIGKILL at a random moment, reads
everything it printed, reopens the file and checks that every acknowledged
update is there, at most one more (committed but killed before printing), and
that multi-layer updates were all or nothing.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from normsvc import Moments, Store

_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from normsvc import Moments, Store

    url, start = sys.argv[1], int(sys.argv[2])
    store = Store.open(url)
    m = Moments(2.0, np.arange(8.0), np.full(8, 2.0))
    print("ready", flush=True)
    i = start
    while True:
        store.update_many({"net/bn1": m, "net/bn2": m, "net/bn3": m}, request_id=f"step-{i}")
        print(i, flush=True)
        i += 1
""")

LAYERS = ("net/bn1", "net/bn2", "net/bn3")


def _kill_at_random(url: str, start: int, rng) -> list[int]:
    """Run the child, SIGKILL it after a random number of acknowledgements; return every acknowledged index."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(start)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        target = int(rng.integers(5, 300))
        acked = []
        while len(acked) < target:
            line = proc.stdout.readline()
            assert line, f"child exited early: {proc.stderr.read()}"
            acked.append(int(line))
        time.sleep(float(rng.uniform(0, 0.02)))  # and let it run on for a random moment
        os.kill(proc.pid, signal.SIGKILL)
        acked += [int(line) for line in proc.stdout.read().split()]  # printed before the kill: acknowledged
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return acked


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_acknowledged_updates_survive_kill_9(tmp_path, rng, synchronous):
    url = f"sqlite:///{tmp_path / 'stats.db'}?synchronous={synchronous}"
    with Store.open(url) as store:
        for name in LAYERS:
            store.create_layer(name, convention="cumulative")
    applied = 0
    for _round in range(2):
        acked = _kill_at_random(url, applied, rng)
        assert acked == list(range(applied, applied + len(acked)))
        with Store.open(url) as store:
            stats = [store.layer(n).stats() for n in LAYERS]
            batches = stats[0].num_batches
            # every acknowledged update is there; at most one more committed before the kill
            assert applied + len(acked) <= batches <= applied + len(acked) + 1
            for s in stats:  # all or nothing across the layers of one update_many
                assert (s.num_batches, s.version, s.count) == (batches, batches, 2.0 * batches)
                np.testing.assert_allclose(s.mean, np.arange(8.0))
            # the acknowledged request ids were persisted with the updates: retrying is a no-op
            last = acked[-1]
            m = Moments(2.0, np.zeros(8), np.zeros(8))
            again = store.update_many({n: m for n in LAYERS}, request_id=f"step-{last}")
            assert all(s.num_batches == batches for s in again.values())
        applied = batches


def test_synchronous_and_journal_settings(tmp_path):
    def pragmas(url):
        with Store.open(url) as store:
            conn = store._backend._conn()
            return conn.execute("PRAGMA journal_mode").fetchone()[0], conn.execute("PRAGMA synchronous").fetchone()[0]

    path = tmp_path / "stats.db"
    assert pragmas(f"sqlite:///{path}") == ("wal", 1)  # NORMAL: survives a process crash
    assert pragmas(f"sqlite:///{path}?synchronous=full") == ("wal", 2)  # FULL: survives power loss
    with Store.open(f"sqlite:///{path}", synchronous="full") as store:
        assert store._backend.synchronous == "full"


def test_relative_sqlite_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Store.open("sqlite:///sub.db") as store:
        store.create_layer("bn")
    assert (tmp_path / "sub.db").exists()
