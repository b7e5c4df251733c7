"""Client.allreduce_stream(): allreduce calls over one AllReduceMomentsStream, against real servers."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

import normsvc
from normsvc.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted
from normsvc.server.limits import Limits
from normsvc.store import Store


def _ranks(world, fn):
    """Run ``fn(rank)`` in one thread per rank; their results (an exception is raised here)."""
    with futures.ThreadPoolExecutor(world) as pool:
        return [f.result(timeout=60) for f in [pool.submit(fn, r) for r in range(world)]]


def test_ranks_on_streams_match_numpy_and_one_store_fed_the_concatenated_batch(target, rng):
    """Two layers, three ranks of unequal batches, five steps on one stream per rank; unary allreduce
    of the same data on twin layers gives the same bits."""
    world, steps = 3, 5
    with normsvc.Client(target) as client:
        for prefix in ("s/", "u/"):
            client.create_layer(prefix + "a", kind="batch", axis=1, convention="torch", momentum=None)
            client.create_layer(prefix + "b", kind="batch", axis=1, convention="keras", momentum=0.9)
        reference = Store.open("memory://")
        reference.create_layer("a", kind="batch", axis=1, convention="torch", momentum=None)
        reference.create_layer("b", kind="batch", axis=1, convention="keras", momentum=0.9)
        shards = [[(rng.normal(r, 1 + r, (4 + 3 * r, 3)), rng.normal(-r, 2, (5 + r, 6))) for r in range(world)]
                  for _ in range(steps)]

        def rank(r):
            out = []
            with client.allreduce_stream() as stream:
                for step in range(steps):
                    a, b = shards[step][r]
                    ms = {"a": normsvc.moments(a, axes=[0]), "b": normsvc.moments(b, axes=[0])}
                    streamed = stream.allreduce({"s/" + k: m for k, m in ms.items()}, step=step, rank=r,
                                                world_size=world, run="stream")
                    unary = client.allreduce({"u/" + k: m for k, m in ms.items()}, step=step, rank=r,
                                             world_size=world, run="unary")
                    out.append((streamed, unary))
            return out

        results = _ranks(world, rank)
    for step in range(steps):
        full = {"a": np.concatenate([a for a, _ in shards[step]]), "b": np.concatenate([b for _, b in shards[step]])}
        expected = reference.update_many({k: normsvc.moments(x, axes=[0]) for k, x in full.items()})
        for r in range(world):
            streamed, unary = results[r][step]
            for k, x in full.items():
                g = streamed.moments["s/" + k]
                assert float(g.count) == len(x)
                np.testing.assert_allclose(g.mean, x.mean(0), rtol=1e-12)
                np.testing.assert_allclose(g.variance, x.var(0), rtol=1e-12)
                s = streamed.stats["s/" + k]
                assert (s.version, s.num_batches) == (step + 1, step + 1)
                np.testing.assert_allclose(s.mean, expected[k].mean, rtol=1e-12, atol=1e-15)
                np.testing.assert_allclose(s.variance, expected[k].variance, rtol=1e-12)
                u = unary.moments["u/" + k]
                assert (g.count, g.mean.tobytes(), g.m2.tobytes()) == (u.count, u.mean.tobytes(), u.m2.tobytes())
                assert s.mean.tobytes() == unary.stats["u/" + k].mean.tobytes()


def test_an_error_ends_only_that_call_and_the_next_opens_a_new_stream(server, rng):
    m = normsvc.moments(rng.normal(size=(8, 2)), axes=[0])
    with normsvc.Client(server.address) as client, client.allreduce_stream() as stream:
        bn = client.create_layer("bn", kind="batch", axis=1)
        assert stream.allreduce({"bn": m}, step=0, rank=0, world_size=1, run="r").stats["bn"].version == 1
        bn.freeze()
        with pytest.raises(FailedPrecondition, match="frozen"):
            stream.allreduce({"bn": m}, step=1, rank=0, world_size=1, run="r")
        bn.unfreeze()
        assert stream.allreduce({"bn": m}, step=2, rank=0, world_size=1, run="r").stats["bn"].num_batches == 2
        with pytest.raises(InvalidArgument, match="world_size"):  # refused by the client: nothing is sent
            stream.allreduce({"bn": m}, step=3, rank=0, world_size=0, run="r")
        assert stream.allreduce({"bn": m}, step=3, rank=0, world_size=1, run="r").stats["bn"].num_batches == 3
        assert "open" in repr(stream)
    with pytest.raises(FailedPrecondition, match="closed"):
        stream.allreduce({"bn": m}, step=4, rank=0, world_size=1, run="r")
    wait = time.monotonic() + 10
    while server.streams.open and time.monotonic() < wait:  # closing freed the server's slot
        time.sleep(0.02)
    assert server.streams.open == 0


def test_a_missing_rank_is_deadline_exceeded_at_the_timeout(server, rng):
    m = normsvc.moments(rng.normal(size=(8, 2)), axes=[0])
    with normsvc.Client(server.address, timeout=30) as client, client.allreduce_stream() as stream:
        client.create_layer("bn", kind="batch", axis=1)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"missing ranks \[1\]"):
            stream.allreduce({"bn": m}, step=0, rank=0, world_size=2, run="r", timeout=0.5)
        assert 0.4 < time.monotonic() - started < 5
        assert server.rendezvous.pending() == {}
        assert client.layer("bn").stats().version == 0


class _Silent:
    """A server whose AllReduceMomentsStream reads messages and never answers (a wedged server)."""

    def __init__(self):
        self.stop = threading.Event()

        def handler(requests, context):
            for _ in requests:
                self.stop.wait(60)
            return iter(())

        method = grpc.stream_stream_rpc_method_handler(handler)
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "normsvc.v1.NormService", {"AllReduceMomentsStream": method}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self):
        self.stop.set()
        self.server.stop(0)


def test_a_server_that_stops_answering_cannot_hang_the_caller(rng):
    silent = _Silent()
    try:
        with normsvc.Client(f"127.0.0.1:{silent.port}") as client, client.allreduce_stream() as stream:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="the server stopped answering"):
                stream.allreduce({"bn": normsvc.moments(rng.normal(size=(4, 2)), axes=[0])}, step=0, rank=0,
                                 world_size=1, timeout=0.3)
            assert 1.2 < time.monotonic() - started < 10  # the 0.3 s wait and the 1 s grace
    finally:
        silent.close()


def test_a_stream_that_broke_while_idle_is_reopened(start_server, rng, tmp_path):
    """The server restarts between two calls (same port, same sqlite file): the second call works."""
    url = f"sqlite:///{tmp_path / 'stats.db'}"
    first = start_server(url)
    m = normsvc.moments(rng.normal(size=(8, 2)), axes=[0])
    with normsvc.Client(first.address) as client, client.allreduce_stream() as stream:
        client.create_layer("bn", kind="batch", axis=1)
        assert stream.allreduce({"bn": m}, step=0, rank=0, world_size=1, run="r").stats["bn"].version == 1
        port = first.port
        first.stop(grace=0)
        start_server(url, port=port)
        assert stream.allreduce({"bn": m}, step=1, rank=0, world_size=1, run="r").stats["bn"].version == 2


def test_no_free_stream_slot_is_resource_exhausted(start_server, rng):
    server = start_server("memory://", workers=4, limits=Limits(max_streams=1))
    m = normsvc.moments(rng.normal(size=(8, 2)), axes=[0])
    with normsvc.Client(server.address) as client:
        client.create_layer("bn", kind="batch", axis=1)
        with client.allreduce_stream() as one, client.allreduce_stream() as two:
            one.allreduce({"bn": m}, step=0, rank=0, world_size=1, run="r")
            with pytest.raises(ResourceExhausted, match="stream"):
                two.allreduce({"bn": m}, step=1, rank=0, world_size=1, run="r")


# --- AsyncClient.allreduce_stream() ----------------------------------------------------------------


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_async_ranks_on_streams_match_numpy_and_the_unary_call(server, rng):
    world, steps = 3, 3
    shards = [[rng.normal(r, 1 + r, (4 + 3 * r, 5)) for r in range(world)] for _ in range(steps)]

    async def main():
        async with normsvc.AsyncClient(server.address) as client:
            for name in ("s/bn", "u/bn"):
                await client.create_layer(name, kind="batch", axis=1, convention="torch")

            async def rank(r):
                out = []
                async with client.allreduce_stream() as stream:
                    for step in range(steps):
                        m = normsvc.moments(shards[step][r], axes=[0])
                        out.append((await stream.allreduce({"s/bn": m}, step=step, rank=r, world_size=world, run="s"),
                                    await client.allreduce({"u/bn": m}, step=step, rank=r, world_size=world, run="u")))
                return out

            return await asyncio.gather(*(rank(r) for r in range(world)))

    results = _run(main())
    for step in range(steps):
        full = np.concatenate(shards[step])
        for r in range(world):
            streamed, unary = results[r][step]
            g, u = streamed.moments["s/bn"], unary.moments["u/bn"]
            assert float(g.count) == len(full)
            np.testing.assert_allclose(g.mean, full.mean(0), rtol=1e-12)
            np.testing.assert_allclose(g.variance, full.var(0), rtol=1e-12)
            assert (g.mean.tobytes(), g.m2.tobytes()) == (u.mean.tobytes(), u.m2.tobytes())
            assert streamed.stats["s/bn"].num_batches == step + 1
            assert streamed.stats["s/bn"].mean.tobytes() == unary.stats["u/bn"].mean.tobytes()


def test_async_errors_timeouts_and_close(server, rng):
    m = normsvc.moments(rng.normal(size=(8, 2)), axes=[0])

    async def main():
        async with normsvc.AsyncClient(server.address) as client:
            bn = await client.create_layer("bn", kind="batch", axis=1)
            stream = client.allreduce_stream()
            assert (await stream.allreduce({"bn": m}, step=0, rank=0, world_size=1, run="r")).stats["bn"].version == 1
            await bn.freeze()
            with pytest.raises(FailedPrecondition, match="frozen"):
                await stream.allreduce({"bn": m}, step=1, rank=0, world_size=1, run="r")
            await bn.unfreeze()
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match=r"missing ranks \[1\]"):
                await stream.allreduce({"bn": m}, step=2, rank=0, world_size=2, run="r", timeout=0.5)
            assert 0.4 < time.monotonic() - started < 5
            assert (await stream.allreduce({"bn": m}, step=3, rank=0, world_size=1,
                                           run="r")).stats["bn"].num_batches == 2
            await stream.close()
            with pytest.raises(FailedPrecondition, match="closed"):
                await stream.allreduce({"bn": m}, step=4, rank=0, world_size=1, run="r")

    _run(main())


def test_async_stream_cannot_hang_on_a_server_that_stops_answering(rng):
    silent = _Silent()

    async def main():
        async with normsvc.AsyncClient(f"127.0.0.1:{silent.port}") as client:
            async with client.allreduce_stream() as stream:
                started = time.monotonic()
                with pytest.raises(DeadlineExceeded, match="the server stopped answering"):
                    await stream.allreduce({"bn": normsvc.moments(rng.normal(size=(4, 2)), axes=[0])}, step=0,
                                           rank=0, world_size=1, timeout=0.3)
                assert 1.2 < time.monotonic() - started < 10

    try:
        _run(main())
    finally:
        silent.close()


def test_the_watchdog_keeps_the_nearest_deadline():
    """A short timeout after a long one still fires on time (the thread sleeps until the earlier)."""
    from normsvc.client.allreduce_stream import _Watchdog

    class Call:
        cancelled_at = None

        def cancel(self):
            self.cancelled_at = time.monotonic()

    dog = _Watchdog()
    try:
        long_call, short_call = Call(), Call()
        dog.arm(long_call, time.monotonic() + 60)
        time.sleep(0.1)  # the thread now sleeps until the long deadline
        dog.disarm()
        started = time.monotonic()
        dog.arm(short_call, started + 0.2)
        deadline = started + 10
        while short_call.cancelled_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert short_call.cancelled_at is not None and short_call.cancelled_at - started < 2
        assert long_call.cancelled_at is None and dog.fired is short_call
    finally:
        dog.stop()
