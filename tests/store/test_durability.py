"""Durability of the sqlite backend: every acknowledged update survives kill -9.

A child process pushes updates and prints the index of each one that returned
(was acknowledged); the test kills it with SIGKILL at a random moment, reads
everything it printed, reopens the file and checks that every acknowledged
update is there, at most one more (committed but killed before printing), and
that multi-layer updates were all or nothing.  Likewise a child importing
thousands of new layers, killed mid-import, leaves all of them with their
statistics or none.
"""

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from normsvc import AlreadyExists, Moments, Store

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


@contextlib.contextmanager
def _child(script: str, *args: str):
    """A child running ``script`` that has printed "ready"; killed (if still running) and reaped on the way out."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()


def _kill_at_random(url: str, start: int, rng) -> list[int]:
    """Run the child, SIGKILL it after a random number of acknowledgements; return every acknowledged index."""
    with _child(_CHILD, url, str(start)) as proc:
        target = int(rng.integers(5, 300))
        acked = []
        while len(acked) < target:
            line = proc.stdout.readline()
            assert line, f"child exited early: {proc.stderr.read()}"
            acked.append(int(line))
        time.sleep(float(rng.uniform(0, 0.02)))  # and let it run on for a random moment
        os.kill(proc.pid, signal.SIGKILL)
        acked += [int(line) for line in proc.stdout.read().split()]  # printed before the kill: acknowledged
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
            # the acknowledged request ids were persisted with the updates (and their content):
            # retrying is a no-op, the same id with other content an error
            last = acked[-1]
            m = Moments(2.0, np.arange(8.0), np.full(8, 2.0))
            again = store.update_many({n: m for n in LAYERS}, request_id=f"step-{last}")
            assert all(s.num_batches == batches for s in again.values())
            with pytest.raises(AlreadyExists, match=f"request_id 'step-{last}'"):
                store.update_many({n: Moments(2.0, np.zeros(8), np.zeros(8)) for n in LAYERS},
                                  request_id=f"step-{last}")
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


# --- an import killed half-way: all of its layers with their statistics, or none ------------

_IMPORT_CHILD = textwrap.dedent("""
    import sys
    from normsvc import Store

    url, path = sys.argv[1], sys.argv[2]
    store = Store.open(url)
    print("ready", flush=True)
    store.import_(path)
    print("done", flush=True)
""")

IMPORTED = [f"net/block{i // 100}/bn{i % 100}" for i in range(4000)]
EXISTING = IMPORTED[0]  # one layer of the file exists before the import


def _import_file(path) -> None:
    tensors, layers = {}, {}
    for i, name in enumerate(IMPORTED):
        tensors[f"{name}/moving_mean"] = np.full(8, float(i))
        tensors[f"{name}/moving_variance"] = np.full(8, 1.0 + i)
        layers[name] = {"config": {"convention": "torch", "axis": 1}, "count": 10.0 * i, "num_batches": i}
    save_file(tensors, str(path), metadata={"normsvc": json.dumps({"format": 1, "layers": layers})})


def _writing(db) -> bool:
    """Whether another connection holds the file's write lock (what an import's transaction takes)."""
    with contextlib.closing(sqlite3.connect(db, timeout=0, isolation_level=None)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        conn.execute("ROLLBACK")
        return False


def _run_import(db, path, delay: float | None) -> tuple[bool, float]:
    """Import in a child; SIGKILL it ``delay`` seconds after it starts writing (None: let it finish).

    Returns whether it was killed before it finished, and how long it held the write lock.
    """
    with _child(_IMPORT_CHILD, f"sqlite:///{db}", str(path)) as proc:
        while proc.poll() is None and not _writing(db):
            time.sleep(0.001)
        started = time.perf_counter()
        if delay is not None:
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
        done = proc.stdout.read().split()
        held = time.perf_counter() - started
    assert proc.returncode == -signal.SIGKILL or (proc.returncode == 0 and done == ["done"]), proc.returncode
    return not done, held


def _outcome(db) -> str:
    """'none' or 'all' (with every statistic as in the file); fails on anything in between."""
    with Store.open(f"sqlite:///{db}") as store:
        names = store.list_layers()
        if names == [EXISTING]:
            s = store.layer(EXISTING).stats()
            assert (s.version, s.num_batches) == (1, 1)  # as before the import
            return "none"
        assert names == sorted(IMPORTED), f"{len(names)} of {len(IMPORTED)} layers after the kill"
        for i, name in enumerate(IMPORTED):
            s = store.layer(name).stats()
            assert (s.mean[0], s.variance[-1], s.count, s.num_batches) == (i, 1.0 + i, 10.0 * i, i), name
            assert s.version == (2 if name == EXISTING else 1), name
        return "all"


def test_an_import_killed_half_way_leaves_all_or_nothing(tmp_path, rng):
    """10 kills at random moments after the importing child took the write lock."""
    path = tmp_path / "many.safetensors"
    _import_file(path)
    base = tmp_path / "base.db"
    with Store.open(f"sqlite:///{base}") as store:
        store.create_layer(EXISTING, convention="torch", axis=1).update(Moments(4.0, np.ones(8), np.full(8, 4.0)))
    writing = []
    for i in range(2):  # uninterrupted runs: how long the child writes (the shorter one: the machine is noisy)
        shutil.copyfile(base, tmp_path / f"whole{i}.db")
        writing.append(_run_import(tmp_path / f"whole{i}.db", path, None)[1])
        assert _outcome(tmp_path / f"whole{i}.db") == "all"
    outcomes = []
    for i in range(10):
        db = tmp_path / f"try{i}.db"
        shutil.copyfile(base, db)
        killed, _ = _run_import(db, path, float(rng.uniform(0.0, 0.8 * min(writing))))
        outcomes.append(("killed" if killed else "finished", _outcome(db)))
    print(f"writing {len(IMPORTED)} layers took {min(writing):.2f} s; per try: {outcomes}")
    assert sum(k == "killed" for k, _ in outcomes) >= 3  # kills landed inside the transaction
