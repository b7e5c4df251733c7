"""AllReduceMoments: synchronized batch statistics across ranks (SyncBatchNorm semantics)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
from server_util import allreduce_request as request
from server_util import create_layer as create
from server_util import two_batch_norms
from server_util import decode, moments_of, pb, raises_code, rich_details, stats_arrays


C = grpc.StatusCode


def run_ranks(stubs, requests, timeout=30):
    """Call AllReduceMoments for each rank in its own thread; returns [response or RpcError]."""
    results = [None] * len(requests)

    def call(i):
        try:
            results[i] = stubs[i].AllReduceMoments(requests[i], timeout=timeout)
        except grpc.RpcError as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return results


def test_four_ranks_get_the_moments_of_the_concatenated_data(server, connect, rng):
    world = 4
    stubs = [connect(server) for _ in range(world)]
    reference = two_batch_norms(stubs[0])
    for step in range(3):
        # unequal shard sizes: the merge must weigh ranks by their counts
        shards = [(rng.normal(r, 1 + r, (16 * (r + 1), 3)), rng.normal(-r, 2, (8 + r, 5))) for r in range(world)]
        results = run_ranks(stubs, [
            request(step, r, world, {"conv1/bn": moments_of(a), "conv2/bn": moments_of(b)})
            for r, (a, b) in enumerate(shards)
        ])
        assert all(isinstance(res, pb.AllReduceMomentsResponse) for res in results), results
        full_a = np.concatenate([a for a, _ in shards])
        full_b = np.concatenate([b for _, b in shards])
        expected = reference.update_many({"conv1/bn": moments_of(full_a), "conv2/bn": moments_of(full_b)})
        for res in results:
            assert [g.layer for g in res.global_moments] == ["conv1/bn", "conv2/bn"]
            for g, full in zip(res.global_moments, (full_a, full_b)):
                assert float(decode(g.moments.count, field="count")) == len(full)
                np.testing.assert_allclose(decode(g.moments.mean, field="mean"), full.mean(0), rtol=1e-12)
                np.testing.assert_allclose(decode(g.moments.variance, field="var"), full.var(0), rtol=1e-12)
            for s in res.stats:  # exactly one update per step, from the global moments
                assert (s.stats.version, s.stats.num_batches) == (step + 1, step + 1)
                mean, var = stats_arrays(s.stats)
                np.testing.assert_allclose(mean, expected[s.layer].mean, rtol=1e-12, atol=1e-15)
                np.testing.assert_allclose(var, expected[s.layer].variance, rtol=1e-12)
    assert server.rendezvous.pending() == {}
    registry = server.metrics.registry
    assert registry.get_sample_value("normsvc_allreduce_steps_total", {"outcome": "completed"}) == 3
    assert registry.get_sample_value("normsvc_layer_updates_total",
                                     {"layer": "conv1/bn", "rpc": "AllReduceMoments"}) == 3


def test_a_missing_rank_times_out_cleanly(memory_server, connect, rng):
    stubs = [connect(memory_server) for _ in range(3)]
    create(stubs[0], "bn")
    m = moments_of(rng.normal(size=(8, 2)))
    results = run_ranks(stubs, [request(7, r, 4, {"bn": m}) for r in range(3)], timeout=1.0)
    for res in results:
        assert isinstance(res, grpc.RpcError) and res.code() == C.DEADLINE_EXCEEDED, res
    server_side = [res for res in results if "ranks arrived" in (res.details() or "")]
    for res in server_side:  # the server answers just before the deadline, naming the missing rank
        assert "missing ranks [3]" in res.details()
        assert rich_details(res)["ErrorInfo"].reason == "RANKS_MISSING"
    assert memory_server.rendezvous.pending() == {}
    assert stubs[0].GetLayer(pb.GetLayerRequest(names=["bn"])).layers[0].stats.version == 0
    # the step can still complete later with all ranks
    done = run_ranks(stubs + [connect(memory_server)], [request(7, r, 4, {"bn": m}) for r in range(4)])
    assert all(isinstance(res, pb.AllReduceMomentsResponse) for res in done), done


def test_a_slow_decode_still_ends_the_wait_before_the_callers_deadline(memory_server, connect, rng, monkeypatch):
    # the wait is what is left of the call's deadline after the request is decoded (a first call loading
    # compiled code, a large request on a busy server): the caller hears the server's reason, not its own
    # timeout, and the stream slot the rank held is free by then
    from normsvc.server.servicer import NormServicer

    decode = NormServicer._moments

    def slow_decode(self, entries, field):
        time.sleep(0.4)
        return decode(self, entries, field)

    stub = connect(memory_server)
    create(stub, "bn")
    monkeypatch.setattr(NormServicer, "_moments", slow_decode)
    started = time.monotonic()
    (res,) = run_ranks([stub], [request(0, 0, 2, {"bn": moments_of(rng.normal(size=(8, 2)))})], timeout=1.5)
    assert isinstance(res, grpc.RpcError) and res.code() == C.DEADLINE_EXCEEDED, res
    assert "1 of 2 ranks arrived before rank 0's deadline; missing ranks [1]" in res.details(), res.details()
    assert rich_details(res)["ErrorInfo"].reason == "RANKS_MISSING"
    assert time.monotonic() - started < 1.5
    assert memory_server.streams.open == 0 and memory_server.rendezvous.pending() == {}


def test_duplicate_ranks_are_rejected(memory_server, connect, rng):
    stubs = [connect(memory_server) for _ in range(3)]
    create(stubs[0], "bn")
    m = moments_of(rng.normal(size=(8, 2)))
    waiting = []
    t = threading.Thread(target=lambda: waiting.append(run_ranks([stubs[0]], [request(1, 0, 2, {"bn": m})])[0]))
    t.start()
    for _ in range(200):  # until rank 0 is waiting at the rendezvous
        if memory_server.rendezvous.pending():
            break
        t.join(0.05)
    assert memory_server.rendezvous.pending() == {(("", "job"), 1): [0]}
    with raises_code(C.ALREADY_EXISTS, "rank 0 already joined") as info:
        stubs[1].AllReduceMoments(request(1, 0, 2, {"bn": m}), timeout=10)
    assert rich_details(info.value)["ErrorInfo"].reason == "DUPLICATE_RANK"
    stubs[2].AllReduceMoments(request(1, 1, 2, {"bn": m}), timeout=10)
    t.join(30)
    assert isinstance(waiting[0], pb.AllReduceMomentsResponse)
    with raises_code(C.ALREADY_EXISTS, "already completed"):
        stubs[1].AllReduceMoments(request(1, 1, 2, {"bn": m}), timeout=10)
    assert stubs[0].GetLayer(pb.GetLayerRequest(names=["bn"])).layers[0].stats.num_batches == 1


def test_mismatched_and_invalid_requests(memory_server, connect, rng):
    stubs = [connect(memory_server) for _ in range(2)]
    create(stubs[0], "bn")
    create(stubs[0], "bn2")
    m = moments_of(rng.normal(size=(8, 2)))
    for bad, field in (
        (request(1, 2, 2, {"bn": m}), "rank"),
        (request(1, 0, 0, {"bn": m}), "world_size"),
        (request(-1, 0, 2, {"bn": m}), "step"),
        (request(1, 0, 2, {}), "moments"),
    ):
        with raises_code(C.INVALID_ARGUMENT) as info:
            stubs[0].AllReduceMoments(bad, timeout=5)
        assert rich_details(info.value)["BadRequest"].field_violations[0].field == field
    # rank 1 disagrees with rank 0 about world_size, then about the layers: INVALID_ARGUMENT for rank 1
    results = []
    t = threading.Thread(target=lambda: results.append(run_ranks([stubs[0]], [request(2, 0, 2, {"bn": m})])[0]))
    t.start()
    for _ in range(200):
        if memory_server.rendezvous.pending():
            break
        t.join(0.05)
    with raises_code(C.INVALID_ARGUMENT, "world_size"):
        stubs[1].AllReduceMoments(request(2, 1, 3, {"bn": m}), timeout=5)
    with raises_code(C.INVALID_ARGUMENT, "layers and shapes"):
        stubs[1].AllReduceMoments(request(2, 1, 2, {"bn2": m}), timeout=5)
    with raises_code(C.INVALID_ARGUMENT, "options"):
        stubs[1].AllReduceMoments(request(2, 1, 2, {"bn": m}, update_stats=False), timeout=5)
    stubs[1].AllReduceMoments(request(2, 1, 2, {"bn": m}), timeout=10)
    t.join(30)
    assert isinstance(results[0], pb.AllReduceMomentsResponse)


def test_update_stats_false_only_reduces(memory_server, connect, rng):
    stubs = [connect(memory_server) for _ in range(2)]
    create(stubs[0], "bn")
    m = moments_of(rng.normal(size=(8, 2)))
    results = run_ranks(stubs, [request(0, r, 2, {"bn": m}, update_stats=False) for r in range(2)])
    assert all(len(res.stats) == 0 and len(res.global_moments) == 1 for res in results)
    assert float(decode(results[0].global_moments[0].moments.count, field="count")) == 16
    assert stubs[0].GetLayer(pb.GetLayerRequest(names=["bn"])).layers[0].stats.version == 0


def test_every_rank_gets_the_store_error(memory_server, connect, rng):
    stubs = [connect(memory_server) for _ in range(3)]
    create(stubs[0], "bn")
    stubs[0].Freeze(pb.FreezeRequest(name="bn"))
    m = moments_of(rng.normal(size=(8, 2)))
    results = run_ranks(stubs, [request(0, r, 3, {"bn": m}) for r in range(3)])
    assert [res.code() for res in results] == [C.FAILED_PRECONDITION] * 3
    results = run_ranks(stubs[:2], [request(1, r, 2, {"missing": m}) for r in range(2)])
    assert [res.code() for res in results] == [C.NOT_FOUND] * 2
    assert memory_server.rendezvous.pending() == {}


def test_each_rank_gets_the_layers_in_its_own_order(memory_server, connect, rng):
    """The ranks of a step share one serialized answer when they list the layers alike; a rank that
    lists them in another order gets them in its order, with the same numbers."""
    stubs = [connect(memory_server) for _ in range(3)]
    for name in ("a", "b"):
        create(stubs[0], name, convention=pb.CONVENTION_TORCH)
    xs = [(rng.normal(size=(6 + r, 3)), rng.normal(size=(5, 4))) for r in range(3)]
    orders = [("a", "b"), ("a", "b"), ("b", "a")]
    results = run_ranks(stubs, [
        request(0, r, 3, {name: moments_of(xs[r][0 if name == "a" else 1]) for name in orders[r]})
        for r in range(3)])
    assert all(isinstance(res, pb.AllReduceMomentsResponse) for res in results), results
    assert results[0].SerializeToString() == results[1].SerializeToString()
    for r, res in enumerate(results):
        assert tuple(g.layer for g in res.global_moments) == orders[r]
        assert tuple(s.layer for s in res.stats) == orders[r]
        for g in res.global_moments:
            full = np.concatenate([x[0 if g.layer == "a" else 1] for x in xs])
            np.testing.assert_allclose(decode(g.moments.mean, field="mean"), full.mean(0), rtol=1e-12)
            np.testing.assert_allclose(decode(g.moments.variance, field="var"), full.var(0), rtol=1e-12)
    by_layer = [{g.layer: g.SerializeToString() for g in res.global_moments} for res in results]
    assert by_layer[0] == by_layer[2]  # the same bits whichever order the rank asked in
