"""normsvc.server.interceptors: metrics (outermost), errors, auth (innermost), on real servers.

Two kinds of server on 127.0.0.1 (port 0): the real NormService (``serve``), and a
tiny generic service with one method of each streaming kind served behind the
interceptors themselves, for what NormService cannot be made to do on purpose.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from server_util import encode, pb, raises_code, wait_until

from normsvc.errors import LayerNotFound
from normsvc.server.auth import Principal, TokenTable
from normsvc.server.interceptors import ErrorInterceptor, MetricsInterceptor
from normsvc.server.metrics import Metrics
from normsvc.wire.status import from_rpc_error

C = grpc.StatusCode
KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def sample(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# --- a tiny generic service behind the interceptors -------------------------------------

def _behave(text: str, context) -> str:
    if text == "missing":
        raise LayerNotFound("no layer named 'bn': expected an existing layer", layer="bn")
    if text == "bug":
        raise RuntimeError("password=hunter2")
    if text == "abort":
        context.abort(C.FAILED_PRECONDITION, "the handler's own status")
    return text.upper()


_BEHAVIOURS = {
    "unary_unary": lambda request, context: ",".join(_behave(p, context) for p in request.split(",")),
    "unary_stream": lambda request, context: (_behave(p, context) for p in request.split(",")),
    "stream_unary": lambda requests, context: ",".join(_behave(r, context) for r in requests),
    "stream_stream": lambda requests, context: (_behave(r, context) for r in requests),
}


class Tiny:
    """``/t.Tiny/<kind>`` for each streaming kind, text in and out (str <-> utf-8 serializers).

    Each comma-separated part of the text is one message on a streaming side, and
    is answered in upper case; ``missing``, ``bug`` and ``abort`` fail the call there
    (see :func:`_behave`).
    """

    def __init__(self, interceptors):
        self.server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=interceptors)
        handlers = {
            kind: getattr(grpc, f"{kind}_rpc_method_handler")(
                _BEHAVIOURS[kind], request_deserializer=bytes.decode, response_serializer=str.encode)
            for kind in KINDS
        }
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Tiny", handlers)])
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}")
        self.server.start()

    def call(self, kind: str, text: str, received=None):
        """Call ``kind`` with ``text``; answers a str (unary response) or the list ``received``
        of the messages of a response stream, filled as they arrive."""
        stub = getattr(self.channel, kind)(f"/t.Tiny/{kind}", request_serializer=str.encode,
                                           response_deserializer=bytes.decode)
        response = stub(iter(text.split(",")) if kind.startswith("stream") else text, timeout=10)
        if not kind.endswith("_stream"):
            return response
        received = [] if received is None else received
        received.extend(response)
        return received

    def close(self):
        self.channel.close()
        self.server.stop(0)


@pytest.fixture
def tiny():
    """Factory: ``tiny(*interceptors)`` -> a started :class:`Tiny` (stopped at teardown)."""
    made = []

    def make(*interceptors):
        made.append(Tiny(list(interceptors)))
        return made[-1]

    yield make
    for t in made:
        t.close()


EXPECTED_OK = {"unary_unary": "A,B", "unary_stream": ["A", "B"], "stream_unary": "A,B",
               "stream_stream": ["A", "B"]}


@pytest.mark.parametrize("kind", KINDS)
def test_wrapped_handlers_keep_their_kind_and_serializers(tiny, kind):
    service = tiny(MetricsInterceptor(Metrics()), ErrorInterceptor())
    assert service.call(kind, "a,b") == EXPECTED_OK[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_an_error_becomes_a_rich_status_in_every_kind_of_handler(tiny, kind):
    service = tiny(ErrorInterceptor())
    received = []
    with pytest.raises(grpc.RpcError) as info:
        service.call(kind, "a,b,missing", received)
    assert received == (["A", "B"] if kind.endswith("_stream") else [])  # what came before the failure
    got = from_rpc_error(info.value)
    assert type(got) is LayerNotFound and (got.layer, got.code) == ("bn", "NOT_FOUND")


@pytest.mark.parametrize("kind", KINDS)
def test_a_bug_is_internal_without_its_text(tiny, kind):
    service = tiny(ErrorInterceptor())
    with raises_code(C.INTERNAL, "RuntimeError") as info:
        service.call(kind, "a,bug")
    assert "hunter2" not in info.value.details()


@pytest.mark.parametrize("kind", KINDS)
def test_a_status_the_handler_set_itself_passes_through(tiny, kind):
    service = tiny(ErrorInterceptor())
    with raises_code(C.FAILED_PRECONDITION) as info:
        service.call(kind, "a,abort")
    assert info.value.details() == "the handler's own status"
    assert rpc_status.from_call(info.value) is None  # not rewritten into a normsvc status


def test_metrics_count_each_call_by_its_final_code(tiny):
    metrics = Metrics()
    service = tiny(MetricsInterceptor(metrics))  # alone: a bug is a bare exception here
    registry = metrics.registry
    service.call("unary_unary", "a")
    service.call("unary_unary", "b")
    for text, code in (("abort", C.FAILED_PRECONDITION), ("bug", C.UNKNOWN)):
        with raises_code(code):
            service.call("unary_unary", text)
    assert service.call("stream_stream", "a,b,c") == ["A", "B", "C"]  # one call, not three
    with raises_code(C.UNKNOWN):
        service.call("unary_stream", "a,bug")
    method = "/t.Tiny/unary_unary"
    assert sample(registry, "normsvc_rpc_requests_total", method=method, code="OK") == 2
    assert sample(registry, "normsvc_rpc_requests_total", method=method, code="FAILED_PRECONDITION") == 1
    assert sample(registry, "normsvc_rpc_requests_total", method=method, code="UNKNOWN") == 1
    assert sample(registry, "normsvc_rpc_latency_seconds_count", method=method) == 4
    assert sample(registry, "normsvc_rpc_requests_total", method="/t.Tiny/stream_stream", code="OK") == 1
    assert sample(registry, "normsvc_rpc_requests_total", method="/t.Tiny/unary_stream", code="UNKNOWN") == 1
    for kind in KINDS:
        assert sample(registry, "normsvc_rpc_in_flight", method=f"/t.Tiny/{kind}") == 0


def test_metrics_see_the_code_the_errors_interceptor_gave(tiny):
    metrics = Metrics()
    service = tiny(MetricsInterceptor(metrics), ErrorInterceptor())
    for text, code in (("missing", C.NOT_FOUND), ("bug", C.INTERNAL)):
        with raises_code(code):
            service.call("unary_unary", text)
    for code in ("NOT_FOUND", "INTERNAL"):
        assert sample(metrics.registry, "normsvc_rpc_requests_total", method="/t.Tiny/unary_unary", code=code) == 1


class CountingErrors(ErrorInterceptor):
    def __init__(self):
        super().__init__()
        self.built = []

    def _wrap(self, handler, method):
        self.built.append(method)
        return super()._wrap(handler, method)


def test_each_method_s_wrapper_is_built_once(tiny):
    interceptor = CountingErrors()
    service = tiny(interceptor)
    for _ in range(3):
        service.call("unary_unary", "a")
        service.call("stream_stream", "a,b")
    with raises_code(C.UNIMPLEMENTED):  # an unknown method is not wrapped (nor cached)
        service.channel.unary_unary("/t.Tiny/nope")(b"", timeout=10)
    assert sorted(interceptor.built) == ["/t.Tiny/stream_stream", "/t.Tiny/unary_unary"]


# --- the real NormService ---------------------------------------------------------------

def test_metrics_on_the_real_service(memory_server, connect, rng):
    stub = connect(memory_server)
    registry = memory_server.metrics.registry
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"))
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"))  # idempotent: OK again
    with raises_code(C.NOT_FOUND):
        stub.GetLayer(pb.GetLayerRequest(names=["nope"]))
    with raises_code(C.INVALID_ARGUMENT):  # bytes that do not parse: counted, under the method's short name
        stub.channel.unary_unary("/normsvc.v1.NormService/UpdateStats")(b"\xff", timeout=10)
    x = rng.normal(size=(8, 2))
    header = pb.NormalizeStreamRequest(header=pb.NormalizeStreamHeader(
        layer="bn", dtype=encode(x).dtype, shape=x.shape, mode=pb.MODE_TRAINING))
    assert len(list(stub.NormalizeStream(iter([header, pb.NormalizeStreamRequest(chunk=x.tobytes())])))) == 2
    counts = {(m, c): sample(registry, "normsvc_rpc_requests_total", method=m, code=c)
              for m, c in (("CreateLayer", "OK"), ("GetLayer", "NOT_FOUND"), ("UpdateStats", "INVALID_ARGUMENT"),
                           ("NormalizeStream", "OK"))}
    assert counts == {("CreateLayer", "OK"): 2, ("GetLayer", "NOT_FOUND"): 1,
                      ("UpdateStats", "INVALID_ARGUMENT"): 1, ("NormalizeStream", "OK"): 1}
    assert sample(registry, "normsvc_rpc_latency_seconds_count", method="CreateLayer") == 2
    assert sample(registry, "normsvc_rpc_latency_seconds_count", method="NormalizeStream") == 1


def test_a_stream_is_in_flight_until_it_ends(memory_server, connect):
    stub = connect(memory_server)
    registry = memory_server.metrics.registry
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"))
    watch = stub.WatchLayer(pb.WatchLayerRequest(names=["bn"]))
    assert next(watch).layer == "bn"
    assert sample(registry, "normsvc_rpc_in_flight", method="WatchLayer") == 1
    assert sample(registry, "normsvc_rpc_latency_seconds_count", method="WatchLayer") == 0
    watch.cancel()
    wait_until(lambda: sample(registry, "normsvc_rpc_in_flight", method="WatchLayer") == 0)
    assert sample(registry, "normsvc_rpc_latency_seconds_count", method="WatchLayer") == 1


def test_a_cancelled_stream_is_counted_as_cancelled(memory_server, connect):
    stub = connect(memory_server)
    registry = memory_server.metrics.registry
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"))
    watch = stub.WatchLayer(pb.WatchLayerRequest(names=["bn"]))
    next(watch)
    watch.cancel()
    wait_until(lambda: sample(registry, "normsvc_rpc_latency_seconds_count", method="WatchLayer") == 1)
    assert sample(registry, "normsvc_rpc_requests_total", method="WatchLayer", code="CANCELLED") == 1
    assert sample(registry, "normsvc_rpc_requests_total", method="WatchLayer", code="UNKNOWN") == 0


# --- auth ------------------------------------------------------------------------------

TOKENS = TokenTable({"r-token": Principal("reader", "read", ("",)), "a-token": Principal("ops", "admin", ("",))})


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def secured(start_server, connect):
    server = start_server(tokens=TOKENS)
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), metadata=bearer("a-token"))
    return server, stub


def test_each_call_is_checked_with_its_own_token(secured):
    # the wrapper is built once per method and shared: the token must come from each call
    server, stub = secured
    get = lambda metadata: stub.GetLayer(pb.GetLayerRequest(names=["bn"]), metadata=metadata)  # noqa: E731
    freeze = lambda metadata: stub.Freeze(pb.FreezeRequest(name="bn"), metadata=metadata)  # noqa: E731
    for call, metadata, code in (
        (get, bearer("r-token"), None), (get, (), C.UNAUTHENTICATED), (get, bearer("r-token"), None),
        (get, bearer("guess"), C.UNAUTHENTICATED), (get, bearer("a-token"), None),
        (freeze, bearer("a-token"), None), (freeze, bearer("r-token"), C.PERMISSION_DENIED),
        (freeze, bearer("a-token"), None),
    ):
        if code is None:
            call(metadata)
        else:
            with raises_code(code):
                call(metadata)
    registry = server.metrics.registry
    assert sample(registry, "normsvc_rpc_requests_total", method="GetLayer", code="OK") == 3
    assert sample(registry, "normsvc_rpc_requests_total", method="GetLayer", code="UNAUTHENTICATED") == 2
    assert sample(registry, "normsvc_rpc_requests_total", method="Freeze", code="OK") == 2
    assert sample(registry, "normsvc_rpc_requests_total", method="Freeze", code="PERMISSION_DENIED") == 1


def test_health_and_reflection_stay_open(secured):
    _, stub = secured
    health = health_pb2_grpc.HealthStub(stub.channel)
    response = health.Check(health_pb2.HealthCheckRequest(service="normsvc.v1.NormService"), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflect = stub.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    listed = next(iter(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="*")]), timeout=10)))
    assert "normsvc.v1.NormService" in {s.name for s in listed.list_services_response.service}


def test_a_request_that_does_not_parse_is_invalid_argument_before_auth(secured):
    _, stub = secured
    with raises_code(C.INVALID_ARGUMENT, "not a valid normsvc.v1.GetLayerRequest"):
        stub.channel.unary_unary("/normsvc.v1.NormService/GetLayer")(b"\xff", timeout=10)


def _stream(stub, messages, metadata):
    return list(stub.NormalizeStream(iter(messages), metadata=metadata, timeout=10))


def test_normalize_stream_is_authorized_on_its_header(secured):
    _, stub = secured
    x = np.arange(8.0).reshape(4, 2)
    header = pb.NormalizeStreamRequest(header=pb.NormalizeStreamHeader(
        layer="bn", dtype=encode(x).dtype, shape=x.shape, mode=pb.MODE_INFERENCE))
    chunk = pb.NormalizeStreamRequest(chunk=x.tobytes())
    with raises_code(C.UNAUTHENTICATED):
        _stream(stub, [header, chunk], ())
    # the header the interceptor read still reaches the service, followed by every chunk
    result, *chunks = _stream(stub, [header, chunk], bearer("r-token"))
    assert tuple(result.result.shape) == (4, 2)
    assert sum(len(c.chunk) for c in chunks) == x.nbytes
    with raises_code(C.INVALID_ARGUMENT, "first message must be a header"):
        _stream(stub, [chunk, header], bearer("r-token"))
    with raises_code(C.INVALID_ARGUMENT, "first message must be a header"):
        _stream(stub, [], bearer("r-token"))
