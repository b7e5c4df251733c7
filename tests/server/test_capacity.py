"""Shared capacity: stream slots (threads held by streams and waiting ranks), the NormalizeStream byte
budget, and ListLayers pages bounded by their encoded size; real servers on 127.0.0.1.

Each test fills a capacity the way an attacker would, checks the next call is refused at once with
RESOURCE_EXHAUSTED naming the limit, that unary calls and the health service still answer, and that
ending the calls gives the capacity back.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from server_util import (ServerProcess, encode, entry, moments_of, pb, raises_code, read, rich_details,
                         wait_until)

from normsvc.server.limits import Limits

C = grpc.StatusCode
MiB = 1 << 20
TOKENS = {"tokens": [
    {"name": "reader", "token": "r-token", "role": "read"},
    {"name": "other", "token": "o-token", "role": "read"},
    {"name": "ops", "token": "a-token", "role": "admin"},
]}


def auth(token):
    return (("authorization", f"Bearer {token}"),)


def assert_refused(info, limit: str, reason: str = "TOO_MANY_STREAMS"):
    details = rich_details(info.value)
    assert details["ErrorInfo"].reason == reason
    assert [v.subject for v in details["QuotaFailure"].violations] == [limit]


class Streams:
    """WatchLayer streams opened on one stub; each is established (its first message read) when opened."""

    def __init__(self, stub):
        self.stub, self.open = stub, []

    def watch(self, metadata=(), layer="bn"):
        stream = self.stub.WatchLayer(pb.WatchLayerRequest(names=[layer]), metadata=metadata, timeout=60)
        assert next(stream).layer == layer
        self.open.append(stream)
        return stream

    def close(self, stream):
        stream.cancel()
        self.open.remove(stream)

    def close_all(self):
        for stream in list(self.open):
            self.close(stream)


@pytest.fixture
def streams():
    opened = []

    def make(stub):
        opened.append(Streams(stub))
        return opened[-1]

    yield make
    for s in opened:
        s.close_all()


def _health(channel, timeout=5):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def assert_unary_and_health_answer(stub, metadata=()):
    """A unary call and the health check both answer well within their deadline."""
    assert stub.GetLayer(pb.GetLayerRequest(names=["bn"]), metadata=metadata, timeout=5).layers[0].name == "bn"
    assert _health(stub.channel) == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    return str(path)


# --- the limits and their defaults ---------------------------------------------------------------

def test_stream_limits_default_to_the_workers_less_a_reserve():
    assert Limits().for_server(64, tokens=False).max_streams == 48  # 16 threads only unary calls and health use
    assert Limits().for_server(64, tokens=False).max_streams_per_token == 48  # one tokenless caller: the same
    assert Limits().for_server(64, tokens=True).max_streams_per_token == 24  # no token takes every stream
    assert Limits().for_server(8, tokens=True).max_streams == 6
    assert Limits().for_server(2, tokens=False).max_streams == 1
    assert Limits(max_streams=10, max_streams_per_token=50).for_server(64, tokens=True).max_streams_per_token == 10


@pytest.mark.parametrize("limits, workers, message", [
    (Limits(max_streams=4), 4, "max_streams=4: expected 1 to 3"),
    (Limits(max_streams=0), 4, "max_streams=0"),
    (Limits(max_streams_per_token=0), 4, "max_streams_per_token=0"),
    (Limits(), 1, "workers=1"),
    (Limits(max_stream_mb=0), 4, "max_stream_mb=0"),
])
def test_stream_limits_that_leave_no_thread_are_refused(start_server, limits, workers, message):
    with pytest.raises(ValueError, match=message):
        start_server(workers=workers, limits=limits)


def test_serve_s_stream_options_come_from_flags_and_the_environment(monkeypatch, capsys):
    from normsvc import cli

    for key, value in {"MAX_STREAMS": "5", "MAX_STREAMS_PER_TOKEN": "2", "MAX_STREAM_MB": "32"}.items():
        monkeypatch.setenv(f"NORMSVC_{key}", value)
    args = cli.build_parser().parse_args(["serve"])
    assert (args.max_streams, args.max_streams_per_token, args.max_stream_mb) == (5, 2, 32)
    monkeypatch.delenv("NORMSVC_MAX_STREAMS")
    assert cli.build_parser().parse_args(["serve"]).max_streams is None  # unset: derived from --workers
    assert cli.main(["serve", "--port", "0", "--store", "memory://", "--workers", "4", "--max-streams", "4"]) == 2
    assert "max_streams=4: expected 1 to 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-streams ", "NORMSVC_MAX_STREAMS,", "--max-streams-per-token", "NORMSVC_MAX_STREAMS_PER_TOKEN",
                 "--max-stream-mb", "NORMSVC_MAX_STREAM_MB"):
        assert flag in text


# --- stream slots ---------------------------------------------------------------------------------

def test_streams_get_bounded_slots_per_token_and_in_all(start_server, connect, tokens_file, streams):
    server = start_server(workers=8, tokens=tokens_file)  # 6 stream slots, 3 per token
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), metadata=auth("a-token"), timeout=10)
    assert (server.limits.max_streams, server.limits.max_streams_per_token) == (6, 3)
    open_ = streams(stub)
    reader = [open_.watch(auth("r-token")) for _ in range(3)]
    with raises_code(C.RESOURCE_EXHAUSTED, "token 'reader' has 3 streams open") as info:
        open_.watch(auth("r-token"))
    assert_refused(info, "max_streams_per_token")
    assert_unary_and_health_answer(stub, auth("a-token"))
    for _ in range(3):
        open_.watch(auth("o-token"))  # another token has slots of its own
    assert server.streams.open == 6 == server.metrics.registry.get_sample_value("normsvc_streams_open")
    with raises_code(C.RESOURCE_EXHAUSTED, "the server has 6 streams open") as info:
        open_.watch(auth("a-token"))
    assert_refused(info, "max_streams")
    with raises_code(C.RESOURCE_EXHAUSTED, "AllReduceMoments refused"):  # a rank would wait: it takes a slot
        stub.AllReduceMoments(pb.AllReduceMomentsRequest(world_size=1, moments=[]), metadata=auth("a-token"),
                              timeout=10)
    assert_unary_and_health_answer(stub, auth("a-token"))
    assert server.metrics.registry.get_sample_value(
        "normsvc_rpc_requests_total", {"method": "WatchLayer", "code": "RESOURCE_EXHAUSTED"}) == 2

    open_.close(reader[0])  # a closed stream gives its slot back, to its token and to the server
    wait_until(lambda: server.streams.open_for("reader") == 2)
    open_.watch(auth("r-token"))
    open_.close_all()
    wait_until(lambda: server.streams.open == 0)
    assert server.streams.open_for("reader") == server.streams.open_for("other") == 0


def test_a_read_only_token_cannot_starve_a_default_server(start_server, connect, tokens_file, streams):
    """The attack: 64 WatchLayer streams with one read-only token against serve(workers=64)."""
    server = start_server(tokens=tokens_file)
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), metadata=auth("a-token"), timeout=10)
    open_ = streams(stub)
    refused = 0
    for _ in range(64):
        try:
            open_.watch(auth("r-token"))
        except grpc.RpcError as err:
            assert err.code() == C.RESOURCE_EXHAUSTED
            refused += 1
    assert (len(open_.open), refused) == (24, 40)  # half of the 48 stream slots of 64 workers
    assert_unary_and_health_answer(stub, auth("a-token"))
    open_.watch(auth("a-token"))  # the admin can still watch
    assert_unary_and_health_answer(stub, auth("a-token"))


def test_without_tokens_every_caller_shares_the_server_s_slots(start_server, connect, streams):
    server = start_server(workers=4)  # 2 stream slots
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), timeout=10)
    open_ = streams(stub)
    first = open_.watch()
    open_.watch(auth("anything"))  # a token means nothing to a server without a tokens file
    with raises_code(C.RESOURCE_EXHAUSTED, "max_streams=2") as info:
        open_.watch()
    assert_refused(info, "max_streams")
    assert_unary_and_health_answer(stub)
    open_.close(first)
    wait_until(lambda: server.streams.open == 1)
    open_.watch()


def test_normalize_stream_takes_a_slot_before_its_header_arrives(start_server, connect, tokens_file, streams):
    server = start_server(workers=8, tokens=tokens_file, limits=Limits(max_streams_per_token=2))
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), metadata=auth("a-token"), timeout=10)
    go = threading.Event()

    def silent():  # sends nothing until told to
        go.wait(30)
        return
        yield

    calls = [stub.NormalizeStream(silent(), metadata=auth("r-token"), timeout=30) for _ in range(2)]
    try:
        wait_until(lambda: server.streams.open_for("reader") == 2)
        with raises_code(C.RESOURCE_EXHAUSTED, "max_streams_per_token=2"):
            streams(stub).watch(auth("r-token"))
        assert_unary_and_health_answer(stub, auth("a-token"))
    finally:
        go.set()
        for call in calls:
            call.cancel()
    wait_until(lambda: server.streams.open == 0)


def test_ranks_waiting_in_allreduce_hold_slots(start_server, connect, rng):
    server = start_server(workers=4)  # 2 stream slots
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), timeout=10)
    request = [pb.AllReduceMomentsRequest(world_size=3, rank=r, step=0, moments=[
        entry("bn", moments_of(rng.normal(size=(8, 2))))]) for r in range(3)]
    outcomes = []

    def rank(r):
        try:
            stub.AllReduceMoments(request[r], timeout=3)
        except grpc.RpcError as err:
            outcomes.append(err.code())

    waiting = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in waiting:
        t.start()
    wait_until(lambda: server.streams.open == 2)
    with raises_code(C.RESOURCE_EXHAUSTED, "max_streams=2"):  # the third rank finds no slot: keep world_size within
        stub.AllReduceMoments(request[2], timeout=10)
    assert_unary_and_health_answer(stub)
    for t in waiting:
        t.join(30)
    assert outcomes == [C.DEADLINE_EXCEEDED] * 2
    assert server.streams.open == 0


def test_health_watches_hold_no_thread(start_server, connect):
    server = start_server(workers=4)
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), timeout=10)
    health = health_pb2_grpc.HealthStub(stub.channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(12)]
    try:
        for watch in watches:  # more watches than threads: each answers, none waits for a thread
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert_unary_and_health_answer(stub)
        assert server.streams.open == 0
    finally:
        for watch in watches:
            watch.cancel()


def test_reflection_streams_take_slots_too(start_server, connect):
    server = start_server(workers=4)  # 2 stream slots; reflection needs no token
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), timeout=10)
    call = stub.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    go = threading.Event()

    def requests():  # one question, then the stream stays open
        yield reflection_pb2.ServerReflectionRequest(list_services="*")
        go.wait(30)

    opened = [call(requests(), timeout=30) for _ in range(2)]
    try:
        for stream in opened:
            assert next(stream).list_services_response.service
        with raises_code(C.RESOURCE_EXHAUSTED, "max_streams=2"):
            next(call(requests(), timeout=10))
        assert_unary_and_health_answer(stub)
    finally:
        go.set()
        for stream in opened:
            stream.cancel()
    wait_until(lambda: server.streams.open == 0)


def test_health_answers_over_tls_while_streams_fill_their_slots(start_server, connect, pki, tokens_file, streams):
    server = start_server(workers=4, tokens=tokens_file, tls_cert=pki["server"], tls_key=pki["server_key"])
    stub = connect(server, credentials=grpc.ssl_channel_credentials(root_certificates=read(pki["ca"])),
                   host="localhost")
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), metadata=auth("a-token"), timeout=10)
    open_ = streams(stub)  # 2 stream slots, 1 per token
    open_.watch(auth("r-token"))
    with raises_code(C.RESOURCE_EXHAUSTED, "max_streams_per_token=1"):
        open_.watch(auth("r-token"))
    open_.watch(auth("o-token"))
    with raises_code(C.RESOURCE_EXHAUSTED, "max_streams=2"):
        open_.watch(auth("a-token"))
    assert_unary_and_health_answer(stub, auth("a-token"))


# --- the NormalizeStream byte budget --------------------------------------------------------------

def _header(shape, dtype=pb.DTYPE_FLOAT64, layer="bn"):
    return pb.NormalizeStreamRequest(header=pb.NormalizeStreamHeader(
        layer=layer, dtype=dtype, shape=shape, mode=pb.MODE_INFERENCE))


def _whole(x, layer="bn", chunk=256 * 1024):
    data = x.tobytes()
    return [_header(list(x.shape), encode(x).dtype, layer),
            *(pb.NormalizeStreamRequest(chunk=data[i:i + chunk]) for i in range(0, len(data), chunk))]


def _held(requests, go):
    """``requests``, then wait for ``go`` (the stream stays open)."""
    yield from requests
    go.wait(60)


def test_a_stream_over_the_whole_budget_is_refused_on_its_header(start_server, connect):
    server = start_server(limits=Limits(max_stream_mb=1))
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), timeout=10)
    with raises_code(C.RESOURCE_EXHAUSTED, "header.shape: NormalizeStream of [65537] x float64 (x and y) "
                                           "needs 1048592 bytes") as info:
        list(stub.NormalizeStream(iter([_header([65_537])]), timeout=10))
    assert "max_stream_bytes" in info.value.details()
    assert_refused(info, "header.shape", "TENSOR_TOO_LARGE")
    assert server.stream_budget.used == 0
    x = np.ones((65_536,))  # 512 KiB, twice: the whole budget
    result, *_ = stub.NormalizeStream(iter(_whole(x)), timeout=30)
    assert list(result.result.shape) == [65_536]


def test_streams_share_the_budget_and_a_cancelled_one_gives_it_back(start_server, connect, rng):
    server = start_server(limits=Limits(max_stream_mb=1))
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn", config=pb.LayerConfig(num_features=[4])), timeout=10)
    x = rng.normal(size=(10_000, 4))  # 320 000 bytes: x and y take 640 000 of the 1 MiB budget
    go = threading.Event()
    first = stub.NormalizeStream(_held(_whole(x)[:2], go), timeout=60)  # the header and a chunk, then nothing
    try:
        wait_until(lambda: server.stream_budget.used == 2 * x.nbytes)
        with raises_code(C.RESOURCE_EXHAUSTED, "other streams hold 640000 of the server's 1048576") as info:
            list(stub.NormalizeStream(iter(_whole(x)), timeout=10))
        assert_refused(info, "max_stream_bytes", "STREAM_BUDGET_EXHAUSTED")
        first.cancel()
        wait_until(lambda: server.stream_budget.used == 0)
    finally:
        go.set()
    result, *chunks = stub.NormalizeStream(iter(_whole(x)), timeout=30)
    y = np.frombuffer(b"".join(c.chunk for c in chunks)).reshape(x.shape)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=1e-12)  # inference: the initial running statistics
    assert server.stream_budget.used == 0 and server.streams.open == 0


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_a_stream_header_allocates_nothing_in_a_serve_process(connect, rng):
    proc = ServerProcess(["--port", "0", "--store", "memory://", "--max-stream-mb", "64", "--device", "cpu",
                          "--metrics-port", "0"])
    metrics_port = int(proc.line.split()[-1])

    def reserved():
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("normsvc_stream_bytes_reserved ")))

    try:
        stub = connect(proc.port)
        stub.CreateLayer(pb.CreateLayerRequest(name="bn"), timeout=30)
        x = np.ones((4, 8), dtype=np.float32)
        list(stub.NormalizeStream(iter(_whole(x)), timeout=60))  # the stream path's code is loaded
        before = _rss(proc.proc.pid)
        with raises_code(C.RESOURCE_EXHAUSTED, "max_stream_bytes"):  # float64 [2^27]: 1 GiB, over the budget
            list(stub.NormalizeStream(iter([_header([1 << 27])]), timeout=30))
        assert _rss(proc.proc.pid) - before < 32 * MiB
        go = threading.Event()
        held = stub.NormalizeStream(_held([_header([1 << 22])], go), timeout=60)  # 32 MiB: x and y fill the budget
        try:
            wait_until(lambda: reserved() == 64 * MiB, timeout=30)  # once the held header is in,
            assert _rss(proc.proc.pid) - before < 16 * MiB  # its bytes are reserved, and nothing is allocated
            with raises_code(C.RESOURCE_EXHAUSTED, "other streams hold"):
                list(stub.NormalizeStream(iter([_header([1 << 22])]), timeout=30))
            held.cancel()
            wait_until(lambda: reserved() == 0, timeout=30)  # a cancelled stream gives its bytes back
        finally:
            go.set()
        big = rng.normal(size=(1 << 22,))
        result, *chunks = stub.NormalizeStream(iter(_whole(big, chunk=1 << 20)), timeout=60)
        assert list(result.result.shape) == [1 << 22] and sum(len(c.chunk) for c in chunks) == big.nbytes
    finally:
        proc.kill()


# --- ListLayers pages bounded by their size --------------------------------------------------------

def test_list_layers_pages_end_before_the_message_limit(start_server, connect):
    server = start_server(limits=Limits(max_message_mb=1))
    stub = connect(server)
    names = [f"wide/l{i}" for i in range(5)]
    for name in names:  # 30 000 float64 means and variances: 480 KB of statistics a layer
        stub.CreateLayer(pb.CreateLayerRequest(name=name, config=pb.LayerConfig(num_features=[30_000])), timeout=10)
    stub.CreateLayer(pb.CreateLayerRequest(name="wide/small"), timeout=10)
    pages, token = [], ""
    while True:
        page = stub.ListLayers(pb.ListLayersRequest(prefix="wide/", include_stats=True, page_token=token),
                               timeout=10)
        assert page.ByteSize() <= server.limits.max_message_bytes - 64 * 1024
        pages.append([layer.name for layer in page.layers])
        token = page.next_page_token
        if not token:
            break
    assert pages == [names[:2], names[2:4], [names[4], "wide/small"]]
    assert all(layer.stats.mean.shape == [30_000] for layer in stub.ListLayers(
        pb.ListLayersRequest(prefix="wide/", include_stats=True), timeout=10).layers)
    listed = stub.ListLayers(pb.ListLayersRequest(prefix="wide/"), timeout=10)  # configs only: one page
    assert [layer.name for layer in listed.layers] == [*names, "wide/small"] and not listed.next_page_token


def test_the_client_reads_every_page(start_server):
    from normsvc import Client

    server = start_server(limits=Limits(max_message_mb=1))
    with Client(server.address) as client:
        for i in range(4):
            client.create_layer(f"wide/l{i}", num_features=30_000)
        infos = client.describe(prefix="wide/")
    assert [i.name for i in infos] == [f"wide/l{i}" for i in range(4)]
    assert all(i.stats.mean.shape == (30_000,) for i in infos)
