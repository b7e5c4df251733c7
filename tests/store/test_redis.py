"""What only the Redis backend has: its URL, several Store objects (processes) on one Redis, an
unreachable Redis, and what survives a crash of Redis under each appendfsync setting.

The whole store contract runs on Redis too: every test of tests/store taking ``store`` or
``store_url`` is parametrized over memory, sqlite and redis (tests/store/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from normsvc import InvalidArgument, Moments, Store, StoreUnavailable
from normsvc.store.redis import RedisBackend

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A redis-server of this test's own, with the persistence settings given, in ``workdir``."""

    def __init__(self, workdir, *args):
        self.port, self.workdir, self.args = _free_port(), workdir, args
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.workdir), "--save", "", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
                time.sleep(0.05)
        # AOF loading: wait until the server answers commands
        import redis

        client = redis.Redis(port=self.port)
        while True:
            try:
                client.ping()
                break
            except redis.BusyLoadingError:
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path):
    started = []

    def make(*args) -> RedisProcess:
        r = RedisProcess(tmp_path, *args).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def test_url_options(redis_server):
    url = redis_server()
    store = Store.open(url + "&request_window=8")
    assert isinstance(store.backend, RedisBackend) and store.backend.request_window == 8
    store.close()
    for bad, field in ((url + "&request_window=0", "url"), (url + "&bogus=1", None)):
        with pytest.raises(InvalidArgument):
            Store.open(bad)


def test_prefixes_are_separate_stores(redis_server):
    a, b = Store.open(redis_server()), Store.open(redis_server())
    a.create_layer("bn", num_features=2)
    assert a.list_layers() == ["bn"] and b.list_layers() == []


def test_store_objects_on_one_redis_see_one_store_and_count_every_update(redis_server):
    """Four Store objects (as four processes or replicas would hold) x 4 threads x 50 updates of one
    cumulative layer: exactly 800 updates, the statistics of all the data (numpy float64)."""
    url = redis_server()
    stores = [Store.open(url) for _ in range(4)]
    stores[0].create_layer("shared", num_features=3, convention="cumulative")
    rng = np.random.default_rng(1)
    batches = rng.normal(2.0, 3.0, size=(16, 50, 4, 3))

    def worker(i):
        layer = stores[i % 4].layer("shared")
        for j in range(50):
            layer.update(Moments.from_samples(batches[i, j]), request_id=f"w{i}/{j}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = stores[3].layer("shared").stats()
    assert stats.version == 800 and stats.count == 3200 and stats.num_batches == 800
    everything = batches.reshape(-1, 3)
    np.testing.assert_allclose(stats.mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, everything.var(axis=0), rtol=1e-12)


def test_an_unreachable_redis_is_store_unavailable_naming_it(own_redis):
    r = own_redis()
    store = Store.open(r.url + "?socket_timeout=2")
    store.create_layer("bn", num_features=2)
    r.kill()
    with pytest.raises(StoreUnavailable, match=r"redis store redis://127\.0\.0\.1.*/0"):
        store.layer("bn").update(Moments.from_samples(np.ones((2, 2))))
    with pytest.raises(StoreUnavailable):
        Store.open(r.url + "?socket_timeout=2")


def _update(store, i):
    """Update number ``i``: one transaction over two layers."""
    return store.update_many({"a": Moments.from_samples(np.full((2, 2), float(i))),
                              "b": Moments.from_samples(np.full((2, 2), float(-i)))}, request_id=f"u{i}")


def _push(store, n):
    """n acknowledged two-layer updates; returns how many were acknowledged."""
    for i in range(n):
        _update(store, i)
    return n


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_what_survives_a_crash_of_redis(own_redis, fsync):
    """kill -9 of Redis with appendonly yes.  ``always``: every acknowledged update survives.
    ``everysec``: what was written more than a second before the crash survives; the last second
    may be lost.  Either way a multi-layer update survives whole or not at all, and a retry of a
    surviving request is still recognised."""
    args = ("--appendonly", "yes", "--appendfsync", fsync)
    r = own_redis(*args)
    store = Store.open(r.url)
    for name in ("a", "b"):
        store.create_layer(name, num_features=2, convention="cumulative")
    done = _push(store, 200)
    if fsync == "everysec":
        time.sleep(2.0)  # past the fsync of the last second
    r.kill()
    r.start()
    store = Store.open(r.url)
    a, b = store.layer("a").stats(), store.layer("b").stats()
    assert a.version == b.version == done  # all of them, and no torn transaction
    assert _update(store, 199) == {"a": a, "b": b}  # a retry of the last one: recognised, nothing changes
    if fsync == "everysec":  # an update in the last second before a crash may be lost, but never half
        _push(store, 1)
        r.kill()
        r.start()
        store = Store.open(r.url)
        a, b = store.layer("a").stats(), store.layer("b").stats()
        assert a.version == b.version and a.version in (done, done + 1)
