"""WatchLayer: every version of the watched layers' statistics, in order."""

from __future__ import annotations

import threading

import grpc
import numpy as np
from server_util import encode, moments_of, pb, raises_code, update_request

from normsvc import Moments

C = grpc.StatusCode


def create(stub, name, **config):
    return stub.CreateLayer(pb.CreateLayerRequest(name=name, config=pb.LayerConfig(**config))).layer


def collect(stream, until, out, limit=10_000):
    """Read (layer, version) pairs from ``stream`` into ``out`` until ``until(out)``; bounded."""
    for msg in stream:
        out.append((msg.layer, msg.stats.version))
        if until(out) or len(out) >= limit:
            break


def test_watch_sees_every_version_from_concurrent_writers(server, connect):
    stub = connect(server)
    create(stub, "bn")
    create(stub, "ln", kind=pb.LAYER_KIND_LAYER)
    writers, per_writer = 4, 25
    total = writers * per_writer
    stream = stub.WatchLayer(pb.WatchLayerRequest(names=["bn", "ln"]), timeout=60)
    seen = []
    first = next(stream), next(stream)  # the current state of both layers comes first
    assert sorted((m.layer, m.stats.version) for m in first) == [("bn", 0), ("ln", 0)]

    def write(k):
        mine = connect(server)
        m = Moments.from_variance(4.0, [float(k)], [1.0])
        for _ in range(per_writer):
            mine.UpdateStats(update_request({"bn": m}))
        mine.UpdateStats(update_request({"ln": Moments.from_variance(4.0, [1.0], [1.0])}))

    reader = threading.Thread(target=collect, args=(stream, lambda out: len(out) >= total + writers, seen))
    reader.start()
    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    reader.join(60)
    stream.cancel()
    assert [v for name, v in seen if name == "bn"] == list(range(1, total + 1))
    assert [v for name, v in seen if name == "ln"] == list(range(1, writers + 1))


def test_watch_follows_every_kind_of_mutation(mstub, rng):
    create(mstub, "bn")
    stream = mstub.WatchLayer(pb.WatchLayerRequest(names=["bn"]), timeout=20)
    assert next(stream).stats.version == 0  # subscribed
    mstub.UpdateStats(update_request({"bn": moments_of(rng.normal(size=(8, 2)))}))
    mstub.Freeze(pb.FreezeRequest(name="bn"))
    mstub.Unfreeze(pb.UnfreezeRequest(name="bn"))
    mstub.ResetStats(pb.ResetStatsRequest(name="bn"))
    x = rng.normal(size=(8, 2)).astype(np.float32)
    mstub.Normalize(pb.NormalizeRequest(layer="bn", x=encode(x), mode=pb.MODE_TRAINING))
    got = []
    collect(stream, lambda out: len(out) >= 5, got)
    assert [v for _, v in got] == [1, 2, 3, 4, 5]
    mstub.DeleteLayer(pb.DeleteLayerRequest(name="bn"))
    with raises_code(C.NOT_FOUND, "deleted"):
        next(stream)


def test_watch_errors(mstub):
    with raises_code(C.NOT_FOUND):
        next(mstub.WatchLayer(pb.WatchLayerRequest(names=["missing"]), timeout=10))
    with raises_code(C.INVALID_ARGUMENT, "names is empty"):
        next(mstub.WatchLayer(pb.WatchLayerRequest(), timeout=10))


def test_watch_sees_versions_made_by_another_process_on_the_same_store(start_server, connect, tmp_path):
    """Two servers on one sqlite file: a watcher on one sees the other's updates (by polling)."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = start_server(url), start_server(url)
    stub_a, stub_b = connect(a), connect(b)
    create(stub_a, "bn")
    stream = stub_a.WatchLayer(pb.WatchLayerRequest(names=["bn"]), timeout=20)
    assert next(stream).stats.version == 0
    stub_b.UpdateStats(update_request({"bn": Moments.from_variance(4.0, [1.0], [1.0])}))
    assert next(stream).stats.version == 1
    stream.cancel()


def test_server_shutdown_ends_watch_streams_with_unavailable(start_server, connect):
    server = start_server()
    stub = connect(server)
    create(stub, "bn")
    stream = stub.WatchLayer(pb.WatchLayerRequest(names=["bn"]), timeout=30)
    assert next(stream).stats.version == 0
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 5})
    stopper.start()
    with raises_code(C.UNAVAILABLE):
        next(stream)
    stopper.join(30)
