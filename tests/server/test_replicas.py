"""Two ``normsvc serve`` replicas on one Redis store behave as one service.

Real servers on loopback, a real redis-server (the ``redis_server`` fixture), clients spread over
both replicas; every expectation is float64 numpy over all the data, or exact counts.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from normsvc import AlreadyExists, Client, DeadlineExceeded, Moments

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def replicas(redis_server, start_server):
    url = redis_server()
    # watch_poll 60 s: a watcher sees another replica's versions through Redis' change notices, not polling
    return [start_server(url, watch_poll=60.0) for _ in range(2)]


def test_sixteen_clients_over_two_replicas_count_every_update(replicas):
    clients = [Client(replicas[i % 2].address) for i in range(16)]
    clients[0].create_layer("shared/bn", num_features=4, convention="cumulative")
    rng = np.random.default_rng(7)
    data = rng.normal(1.5, 2.5, size=(16, 200, 3, 4))
    errors = []

    def worker(i):
        layer = clients[i].layer("shared/bn")
        try:
            for j in range(200):
                layer.update(Moments.from_samples(data[i, j]), request_id=f"client{i}/{j}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for client in clients[:2]:  # one client of each replica
        stats = client.layer("shared/bn").stats()
        assert (stats.version, stats.num_batches, stats.count) == (3200, 3200, 9600)
        everything = data.reshape(-1, 4)
        np.testing.assert_allclose(stats.mean, everything.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(stats.variance, everything.var(axis=0), rtol=1e-12)
    for c in clients:
        c.close()


def test_an_allreduce_step_whose_ranks_reach_different_replicas(replicas):
    clients = [Client(replicas[rank % 2].address) for rank in range(4)]
    clients[0].create_layer("sync/bn", num_features=3, convention="torch", momentum=0.1)
    rng = np.random.default_rng(3)
    xs = [rng.normal(rank, 1.0 + rank, size=(5 + rank, 3)) for rank in range(4)]
    results, errors = {}, []

    def rank_main(rank):
        try:
            results[rank] = clients[rank].allreduce({"sync/bn": Moments.from_samples(xs[rank])}, step=0,
                                                    rank=rank, world_size=4, run="job")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    everything = np.concatenate(xs)
    merged = [results[r].moments["sync/bn"] for r in range(4)]
    for m in merged:  # every rank, on either replica, gets the same bits
        assert np.array_equal(m.mean, merged[0].mean) and np.array_equal(m.m2, merged[0].m2)
    np.testing.assert_allclose(merged[0].mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged[0].variance, everything.var(axis=0), rtol=1e-12)
    # one update of the torch convention with the unbiased variance of all 26 samples
    stats = clients[1].layer("sync/bn").stats()
    assert stats.version == 1 and stats.last_step == 0
    np.testing.assert_allclose(stats.mean, 0.1 * everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, 0.9 + 0.1 * everything.var(axis=0, ddof=1), rtol=1e-12)
    assert all(results[r].stats["sync/bn"].version == 1 for r in range(4))
    # a latecomer on either replica is a duplicate, and changes nothing
    with pytest.raises(AlreadyExists, match="already completed"):
        clients[3].allreduce({"sync/bn": Moments.from_samples(xs[3])}, step=0, rank=3, world_size=4, run="job")
    assert clients[0].layer("sync/bn").stats().version == 1


def test_a_missing_rank_times_out_on_every_replica_naming_it(replicas):
    clients = [Client(replicas[r].address, timeout=30) for r in range(2)]
    clients[0].create_layer("sync/bn2", num_features=2)
    errors = {}

    def rank_main(rank):
        try:
            clients[rank].allreduce({"sync/bn2": Moments.from_samples(np.ones((2, 2)) * rank)}, step=1, rank=rank,
                                    world_size=3, run="job", timeout=2.0)
        except Exception as exc:  # noqa: BLE001
            errors[rank] = exc

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(errors) == {0, 1}
    for exc in errors.values():
        assert isinstance(exc, DeadlineExceeded), exc
        if "ranks arrived" in str(exc):  # the server's answer, just before the deadline (else grpc's own)
            assert "2 of 3 ranks arrived" in str(exc) and "missing ranks [2]" in str(exc), exc
    assert clients[0].layer("sync/bn2").stats().version == 0


def test_a_watch_on_one_replica_sees_updates_made_through_the_other(replicas):
    a, b = Client(replicas[0].address), Client(replicas[1].address)
    a.create_layer("watched/bn", num_features=2)
    with b.watch(["watched/bn"], skip_initial=True, timeout=20) as watch:
        it = iter(watch)
        for i in range(3):
            t0 = time.monotonic()
            stats = a.layer("watched/bn").update(Moments.from_samples(np.full((2, 2), float(i))))
            seen = next(it)
            assert seen.layer == "watched/bn" and seen.stats.version == stats.version == i + 1
            assert time.monotonic() - t0 < 10.0  # change notices, not the 60 s poll
