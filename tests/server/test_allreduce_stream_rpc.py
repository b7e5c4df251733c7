"""AllReduceMomentsStream: AllReduceMoments calls as the messages of one open stream."""

from __future__ import annotations

import math
import queue
import threading
import time

import grpc
import numpy as np
import pytest
from server_util import allreduce_request as request
from server_util import create_layer as create
from server_util import two_batch_norms
from server_util import decode, moments_of, pb, rich_details, stats_arrays, wait_until

from normsvc.server.limits import Limits

C = grpc.StatusCode


class Stream:
    """One open AllReduceMomentsStream: ``ask(request)`` sends a message and reads its answer."""

    def __init__(self, stub, **options):
        self.requests = queue.SimpleQueue()
        self.responses = stub.AllReduceMomentsStream(iter(self.requests.get, None), **options)

    def ask(self, message):
        self.requests.put(message)
        return next(self.responses)

    def close(self):
        self.requests.put(None)
        return list(self.responses)


def test_ranks_on_streams_get_the_moments_of_the_concatenated_data(server, connect, rng):
    """Three ranks, one stream each for all their steps; every answer against float64 numpy on the
    concatenated shards, and the running statistics against one Store fed the concatenated batch."""
    world, steps = 3, 4
    stubs = [connect(server) for _ in range(world)]
    reference = two_batch_norms(stubs[0])
    shards = [[(rng.normal(r, 1 + r, (16 * (r + 1), 3)), rng.normal(-r, 2, (8 + r, 5))) for r in range(world)]
              for _ in range(steps)]
    answers = [[] for _ in range(world)]

    def rank(r):
        stream = Stream(stubs[r])
        for step in range(steps):
            a, b = shards[step][r]
            answers[r].append(stream.ask(request(step, r, world, {"conv1/bn": moments_of(a),
                                                                  "conv2/bn": moments_of(b)}, wait_seconds=30)))
        answers[r].append(stream.close())

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for step in range(steps):
        full_a = np.concatenate([a for a, _ in shards[step]])
        full_b = np.concatenate([b for _, b in shards[step]])
        expected = reference.update_many({"conv1/bn": moments_of(full_a), "conv2/bn": moments_of(full_b)})
        for r in range(world):
            res = answers[r][step]
            assert [g.layer for g in res.global_moments] == ["conv1/bn", "conv2/bn"]
            for g, full in zip(res.global_moments, (full_a, full_b)):
                assert float(decode(g.moments.count, field="count")) == len(full)
                np.testing.assert_allclose(decode(g.moments.mean, field="mean"), full.mean(0), rtol=1e-12)
                np.testing.assert_allclose(decode(g.moments.variance, field="var"), full.var(0), rtol=1e-12)
            for s in res.stats:
                assert (s.stats.version, s.stats.num_batches) == (step + 1, step + 1)
                mean, var = stats_arrays(s.stats)
                np.testing.assert_allclose(mean, expected[s.layer].mean, rtol=1e-12, atol=1e-15)
                np.testing.assert_allclose(var, expected[s.layer].variance, rtol=1e-12)
    assert [answers[r][steps] for r in range(world)] == [[]] * world  # each stream ended cleanly
    assert server.rendezvous.pending() == {}
    registry = server.metrics.registry
    assert registry.get_sample_value("normsvc_allreduce_steps_total", {"outcome": "completed"}) == steps
    assert registry.get_sample_value("normsvc_layer_updates_total",
                                     {"layer": "conv1/bn", "rpc": "AllReduceMoments"}) == steps


def test_a_message_waits_its_wait_seconds_and_the_error_ends_the_stream(memory_server, connect, rng):
    stub = connect(memory_server)
    create(stub, "bn")
    m = moments_of(rng.normal(size=(8, 2)))
    stream = Stream(stub)  # no deadline on the stream: each message bounds its own wait
    assert len(stream.ask(request(0, 0, 1, {"bn": m}, wait_seconds=5)).stats) == 1
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stream.ask(request(1, 0, 2, {"bn": m}, wait_seconds=0.5))
    waited = time.monotonic() - started
    assert info.value.code() == C.DEADLINE_EXCEEDED
    assert "1 of 2 ranks arrived" in info.value.details() and "missing ranks [1]" in info.value.details()
    assert rich_details(info.value)["ErrorInfo"].reason == "RANKS_MISSING"
    assert 0.4 < waited < 5
    wait_until(lambda: memory_server.rendezvous.pending() == {})
    with pytest.raises(grpc.RpcError) as info:  # the stream is over
        stream.ask(request(2, 0, 1, {"bn": m}))
    assert info.value.code() == C.DEADLINE_EXCEEDED
    # a new stream goes on where the run left off
    assert Stream(stub).ask(request(1, 0, 1, {"bn": m})).stats[0].stats.version == 2


def test_the_first_failed_message_ends_the_stream_with_its_status(memory_server, connect, rng):
    stub = connect(memory_server)
    create(stub, "bn")
    frozen = stub.Freeze(pb.FreezeRequest(name="bn")).stats.version
    m = moments_of(rng.normal(size=(8, 2)))
    stream = Stream(stub, timeout=30)
    assert len(stream.ask(request(0, 0, 1, {"bn": m}, update_stats=False)).global_moments) == 1
    with pytest.raises(grpc.RpcError) as info:
        stream.ask(request(0, 0, 1, {"bn": m}, group="other"))
    with pytest.raises(grpc.RpcError) as unary:
        stub.AllReduceMoments(request(0, 0, 1, {"bn": m}, group="third"), timeout=30)
    assert info.value.code() == unary.value.code() == C.FAILED_PRECONDITION
    assert info.value.details() == unary.value.details()
    assert rich_details(info.value)["ErrorInfo"].reason == "FROZEN_LAYER"
    assert stub.GetLayer(pb.GetLayerRequest(names=["bn"])).layers[0].stats.version == frozen


@pytest.mark.parametrize("wait", [0.0, -1.0, math.inf, math.nan])
def test_a_bad_wait_seconds_is_refused_before_it_joins(memory_server, connect, rng, wait):
    stub = connect(memory_server)
    create(stub, "bn")
    m = moments_of(rng.normal(size=(8, 2)))
    for call in (lambda r: Stream(stub, timeout=30).ask(r), lambda r: stub.AllReduceMoments(r, timeout=30)):
        with pytest.raises(grpc.RpcError) as info:
            call(request(0, 0, 2, {"bn": m}, wait_seconds=wait))
        assert info.value.code() == C.INVALID_ARGUMENT
        assert f"wait_seconds={wait!r}: expected a finite number of seconds > 0" in info.value.details()
        assert rich_details(info.value)["BadRequest"].field_violations[0].field == "wait_seconds"
    assert memory_server.rendezvous.pending() == {}


def test_a_unary_call_waits_at_most_its_wait_seconds(memory_server, connect, rng):
    stub = connect(memory_server)
    create(stub, "bn")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.AllReduceMoments(request(0, 0, 2, {"bn": moments_of(rng.normal(size=(8, 2)))}, wait_seconds=0.3),
                              timeout=30)
    assert info.value.code() == C.DEADLINE_EXCEEDED and "missing ranks [1]" in info.value.details()
    assert time.monotonic() - started < 10


def test_a_malformed_message_ends_the_stream_with_invalid_argument(memory_server, connect, rng):
    stub = connect(memory_server)
    create(stub, "bn")
    good = request(0, 0, 1, {"bn": moments_of(rng.normal(size=(8, 2)))}, update_stats=False).SerializeToString()
    raw = stub.channel.stream_stream("/normsvc.v1.NormService/AllReduceMomentsStream")
    answers = raw(iter([good, b"\x0a\xff\xff"]), timeout=30)
    assert len(pb.AllReduceMomentsResponse.FromString(next(answers)).global_moments) == 1
    with pytest.raises(grpc.RpcError) as info:
        next(answers)
    assert info.value.code() == C.INVALID_ARGUMENT
    assert rich_details(info.value)["ErrorInfo"].reason == "MALFORMED_REQUEST"


def test_an_open_stream_holds_a_stream_slot(start_server, connect, rng):
    server = start_server("memory://", workers=4, limits=Limits(max_streams=1))
    stub = connect(server)
    create(stub, "bn")
    m = moments_of(rng.normal(size=(8, 2)))
    first = Stream(stub, timeout=30)
    first.ask(request(0, 0, 1, {"bn": m}))
    with pytest.raises(grpc.RpcError) as info:  # idle, the first stream still holds the only slot
        Stream(stub, timeout=30).ask(request(1, 0, 1, {"bn": m}))
    assert info.value.code() == C.RESOURCE_EXHAUSTED
    assert rich_details(info.value)["ErrorInfo"].reason == "TOO_MANY_STREAMS"
    assert first.close() == []
    wait_until(lambda: server.streams.open == 0)
    assert Stream(stub, timeout=30).ask(request(1, 0, 1, {"bn": m})).stats[0].stats.version == 2


def test_shutdown_cancels_idle_streams_and_gives_a_waiting_rank_the_grace(start_server, connect, rng):
    """Streams between reductions do not hold the server's grace period: they are cancelled at once
    (their clients reconnect).  A rank waiting for its partner keeps its stream until the grace ends."""
    server = start_server("memory://")
    stubs = [connect(server) for _ in range(3)]
    create(stubs[0], "bn")
    m = moments_of(rng.normal(size=(8, 2)))
    idle, partner = Stream(stubs[0]), Stream(stubs[2])
    idle.ask(request(0, 0, 1, {"bn": m}, group="idle"))
    waiting = Stream(stubs[1])
    outcome = []

    def wait_for_partner():
        started = time.monotonic()
        try:
            waiting.ask(request(0, 0, 2, {"bn": m}, group="pair", update_stats=False))
        except grpc.RpcError as exc:
            outcome.append((exc.code(), time.monotonic() - started))

    waiter = threading.Thread(target=wait_for_partner)
    waiter.start()
    wait_until(lambda: server.rendezvous.pending() == {(("", "pair"), 0): [0]})
    wait_until(lambda: server.reductions.open() == 3)
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 2.0})
    started = time.monotonic()
    stopping.start()
    for stream in (idle, partner):  # cancelled at once, not after the grace
        with pytest.raises(grpc.RpcError) as info:
            next(stream.responses)
        assert info.value.code() == C.CANCELLED
    assert time.monotonic() - started < 1.5
    waiter.join(30)
    stopping.join(30)
    # ended by the server's own end of the grace (either code tells the client to reconnect)
    assert outcome and outcome[0][0] in (C.CANCELLED, C.UNAVAILABLE) and outcome[0][1] >= 1.5
    assert not stopping.is_alive() and time.monotonic() - started < 10
    wait_until(lambda: server.reductions.open() == 0)  # the waiting handler notices its call is gone


def test_shutdown_with_only_idle_streams_does_not_wait_for_the_grace(start_server, connect, rng):
    server = start_server("memory://")
    stub = connect(server)
    create(stub, "bn")
    streams = [Stream(stub) for _ in range(3)]
    for i, stream in enumerate(streams):
        stream.ask(request(i, 0, 1, {"bn": moments_of(rng.normal(size=(8, 2)))}, group=f"g{i}"))
    started = time.monotonic()
    server.stop(grace=60)
    assert time.monotonic() - started < 10
