"""normsvc.server.limits: each limit is RESOURCE_EXHAUSTED naming what was over it, changes
nothing, and the server keeps serving; real servers on 127.0.0.1."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from server_util import decode, encode, entry, pb, raises_code, rich_details, update_request

from normsvc import Moments
from normsvc.server.limits import Limits

C = grpc.StatusCode
MiB = 1 << 20
#: the client may send and receive more than the server accepts, so the server's limits are what is tested
BIG = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
SMALL = Limits(max_message_mb=1, max_tensor_elements=10_000, max_layers_per_request=3, max_layers=4)


@pytest.fixture
def limited(start_server, connect):
    """A server with :data:`SMALL` limits, a stub to it, and layer "bn" (batch, 4 features)."""
    server = start_server(limits=SMALL)
    stub = connect(server, options=BIG)
    create(stub, "bn", num_features=[4])
    return server, stub


def create(stub, name, **config):
    return stub.CreateLayer(pb.CreateLayerRequest(name=name, config=pb.LayerConfig(**config)), timeout=10)


def normalize(stub, layer, x, **kw):
    return stub.Normalize(pb.NormalizeRequest(layer=layer, x=encode(x), mode=pb.MODE_TRAINING, **kw), timeout=10)


def layer_names(stub):
    return [layer.name for layer in stub.ListLayers(pb.ListLayersRequest(), timeout=10).layers]


def versions(stub, *names):
    """The version of each layer, one GetLayer each (a server may limit the names per request)."""
    return [stub.GetLayer(pb.GetLayerRequest(names=[n]), timeout=10).layers[0].stats.version for n in names]


def assert_serving(stub, rng):
    y = decode(normalize(stub, "bn", rng.normal(size=(16, 4))).y, field="y")
    assert y.shape == (16, 4)


def assert_exhausted(info, subject: str, reason: str):
    details = rich_details(info.value)
    assert details["ErrorInfo"].reason == reason
    assert [v.subject for v in details["QuotaFailure"].violations] == [subject]


def test_max_message_bytes_is_in_mebibytes():
    assert Limits().max_message_bytes == 64 * 1024 * 1024
    assert Limits(max_message_mb=3).max_message_bytes == 3 * 1024 * 1024


def test_a_message_over_max_message_mb_is_refused(limited, rng):
    _, stub = limited
    with raises_code(C.RESOURCE_EXHAUSTED):  # 1.2 MB over 1 MiB: gRPC's own limit, before the service
        normalize(stub, "bn", rng.normal(size=(75_000, 4)).astype(np.float32))
    assert versions(stub, "bn") == [0]
    assert_serving(stub, rng)


def test_serve_s_max_message_mb_overrides_the_limits(start_server, connect, rng):
    stub = connect(start_server(max_message_mb=1, limits=Limits(max_message_mb=64)), options=BIG)
    create(stub, "bn")
    with raises_code(C.RESOURCE_EXHAUSTED):
        normalize(stub, "bn", rng.normal(size=(300_000,)).astype(np.float32))
    with pytest.raises(ValueError, match="max_message_mb=0"):
        start_server(max_message_mb=0)


# (rpc, request, the field the QuotaFailure names): one tensor of 10_001 elements each
TOO_LARGE = {
    "Normalize x": ("Normalize", lambda: pb.NormalizeRequest(
        layer="bn", x=encode(np.zeros(10_001)), mode=pb.MODE_TRAINING), "x.shape"),
    "Normalize gamma": ("Normalize", lambda: pb.NormalizeRequest(
        layer="bn", x=encode(np.ones((2, 4))), gamma=encode(np.zeros(10_001)), mode=pb.MODE_TRAINING),
        "gamma.shape"),
    "UpdateStats": ("UpdateStats", lambda: update_request(
        {"bn": Moments(np.float64(2), np.zeros(10_001), np.zeros(10_001))}), "updates[0].moments.mean.shape"),
    "AllReduceMoments": ("AllReduceMoments", lambda: pb.AllReduceMomentsRequest(
        world_size=1, moments=[entry("bn", Moments(np.float64(2), np.zeros(10_001), np.zeros(10_001)))]),
        "moments[0].moments.mean.shape"),
}


@pytest.mark.parametrize("case", sorted(TOO_LARGE))
def test_a_tensor_over_max_tensor_elements_is_refused(limited, rng, case):
    server, stub = limited
    rpc, request, subject = TOO_LARGE[case]
    with raises_code(C.RESOURCE_EXHAUSTED, "10001 elements: expected at most 10000") as info:
        getattr(stub, rpc)(request(), timeout=10)
    assert_exhausted(info, subject, "TENSOR_TOO_LARGE")
    assert versions(stub, "bn") == [0]
    assert_serving(stub, rng)
    assert server.metrics.registry.get_sample_value(
        "normsvc_rpc_requests_total", {"method": rpc, "code": "RESOURCE_EXHAUSTED"}) == 1


def _header_over_the_limit():
    """A NormalizeStream header for 2501 x 4 = 10004 elements."""
    return pb.NormalizeStreamRequest(header=pb.NormalizeStreamHeader(
        layer="bn", dtype=pb.DTYPE_FLOAT64, shape=[2_501, 4], mode=pb.MODE_TRAINING))


def test_normalize_stream_is_refused_on_its_header_before_any_bytes(limited, rng):
    _, stub = limited
    header = _header_over_the_limit()
    with raises_code(C.RESOURCE_EXHAUSTED, "10004 elements: expected at most 10000") as info:
        list(stub.NormalizeStream(iter([header]), timeout=10))  # the header alone: no chunk was needed
    assert_exhausted(info, "header.shape", "TENSOR_TOO_LARGE")
    assert versions(stub, "bn") == [0]
    assert_serving(stub, rng)


def test_normalize_stream_s_refusal_names_the_header_s_field_in_its_message(limited):
    _, stub = limited
    header = _header_over_the_limit()
    with raises_code(C.RESOURCE_EXHAUSTED, "header.shape: [2501, 4] has 10004 elements"):
        list(stub.NormalizeStream(iter([header]), timeout=10))


def test_exactly_max_tensor_elements_is_accepted(limited):
    _, stub = limited
    y = decode(normalize(stub, "bn", np.arange(10_000.0).reshape(2_500, 4)).y, field="y")
    assert y.shape == (2_500, 4) and versions(stub, "bn") == [1]


def test_create_layer_with_num_features_over_max_tensor_elements_is_refused(limited):
    _, stub = limited
    with raises_code(C.RESOURCE_EXHAUSTED, "expected at most 10000"):
        create(stub, "wide", num_features=[20_000])
    assert layer_names(stub) == ["bn"]


def _layers_request(rpc, names):
    m = Moments.from_samples(np.ones((2, 4)))
    return {
        "UpdateStats": lambda: update_request({n: m for n in names}),
        "AllReduceMoments": lambda: pb.AllReduceMomentsRequest(world_size=1, moments=[entry(n, m) for n in names]),
        "GetLayer": lambda: pb.GetLayerRequest(names=names),
        "WatchLayer": lambda: pb.WatchLayerRequest(names=names),
    }[rpc]()


@pytest.mark.parametrize("rpc, subject", [("UpdateStats", "updates"), ("AllReduceMoments", "moments"),
                                          ("GetLayer", "names"), ("WatchLayer", "names")])
def test_more_layers_than_max_layers_per_request_are_refused(limited, rng, rpc, subject):
    _, stub = limited
    for name in ("a", "b", "c"):
        create(stub, name, num_features=[4])
    call = getattr(stub, rpc)
    with raises_code(C.RESOURCE_EXHAUSTED, f"{subject} names 4 layers: expected at most 3") as info:
        response = call(_layers_request(rpc, ["a", "b", "c", "bn"]), timeout=10)
        if rpc == "WatchLayer":
            next(response)
    assert_exhausted(info, subject, "LIMIT_EXCEEDED")
    assert versions(stub, "a", "b", "c", "bn") == [0, 0, 0, 0]  # not one of the four was updated
    assert_serving(stub, rng)


def test_exactly_max_layers_per_request_is_accepted(limited):
    _, stub = limited
    for name in ("a", "b"):
        create(stub, name, num_features=[4])
    stub.UpdateStats(_layers_request("UpdateStats", ["a", "b", "bn"]), timeout=10)
    assert versions(stub, "a", "b", "bn") == [1, 1, 1]


def test_create_layer_past_max_layers_is_refused(limited, rng):
    _, stub = limited
    for name in ("a", "b", "c"):  # with "bn": 4, the maximum
        create(stub, name, num_features=[4])
    with raises_code(C.RESOURCE_EXHAUSTED, "holds 4 layers") as info:
        create(stub, "d")
    assert "delete layers" in info.value.details()
    assert_exhausted(info, "name", "TOO_MANY_LAYERS")
    assert layer_names(stub) == ["a", "b", "bn", "c"]
    create(stub, "a", num_features=[4])  # the same config again: an existing layer, not a new one
    with raises_code(C.ALREADY_EXISTS):  # a clash is still a clash
        create(stub, "a", num_features=[5])
    stub.DeleteLayer(pb.DeleteLayerRequest(name="c"), timeout=10)
    create(stub, "d")
    assert layer_names(stub) == ["a", "b", "bn", "d"]
    assert_serving(stub, rng)


def test_import_stats_past_max_layers_is_refused(start_server, connect, limited):
    _, stub = limited
    source = connect(start_server())
    for name in ("p", "q", "r", "s", "t"):
        create(source, name, num_features=[2])
    data = source.ExportStats(pb.ExportStatsRequest(), timeout=10).safetensors
    with raises_code(C.RESOURCE_EXHAUSTED):
        stub.ImportStats(pb.ImportStatsRequest(safetensors=data), timeout=10)
    assert layer_names(stub) == ["bn"]


def test_an_answer_over_max_message_mb_changes_nothing(limited):
    _, stub = limited
    try:  # 200_000 float64 means and variances: 3.2 MB of statistics in the answer
        created = create(stub, "wide", num_features=[200_000])
    except grpc.RpcError as err:
        assert err.code() == C.RESOURCE_EXHAUSTED
        assert layer_names(stub) == ["bn"]
    else:
        assert created.name == "wide"


def _stream_chunks(stub, x):
    header = pb.NormalizeStreamRequest(header=pb.NormalizeStreamHeader(
        layer="bn", dtype=encode(x).dtype, shape=x.shape, mode=pb.MODE_INFERENCE))
    body = [pb.NormalizeStreamRequest(chunk=x.tobytes()[i:i + 256 * 1024]) for i in range(0, x.nbytes, 256 * 1024)]
    result, *chunks = stub.NormalizeStream(iter([header, *body]), timeout=30)
    assert tuple(result.result.shape) == x.shape
    return [len(c.chunk) for c in chunks]


def test_stream_chunk_bytes_sizes_the_chunks_sent_back(start_server, connect):
    stub = connect(start_server(limits=Limits(stream_chunk_bytes=1000)))
    create(stub, "bn", num_features=[4])
    assert _stream_chunks(stub, np.ones((64, 4))) == [1000, 1000, 48]  # 2048 bytes of float64


def test_stream_chunks_fit_in_a_message_whatever_stream_chunk_bytes_says(start_server, connect):
    stub = connect(start_server(limits=Limits(max_message_mb=1, stream_chunk_bytes=4 * MiB)), options=BIG)
    create(stub, "bn", num_features=[4])
    sizes = _stream_chunks(stub, np.ones((49_152, 4)))  # 1.5 MiB back
    assert sum(sizes) == 3 * MiB // 2 and len(sizes) >= 2 and max(sizes) < MiB


def test_list_layers_pages_are_bounded(start_server, connect):
    stub = connect(start_server(limits=Limits(max_page_size=5, default_page_size=3)))
    names = [f"l{i}" for i in range(7)]
    for name in names:
        create(stub, name)

    def page(size, token=""):
        response = stub.ListLayers(pb.ListLayersRequest(page_size=size, page_token=token), timeout=10)
        return [layer.name for layer in response.layers], response.next_page_token

    assert page(0)[0] == names[:3]  # no size: the default
    assert page(4)[0] == names[:4]
    first, token = page(100)  # over the maximum: the maximum, not an error
    assert first == names[:5] and token
    assert page(100, token) == (names[5:], "")


def test_a_get_layer_answer_that_would_outgrow_a_message_is_refused(start_server, connect):
    # each layer fits a message on its own; four of them together do not: refused, not sent half-built
    stub = connect(start_server(limits=Limits(max_message_mb=1)))
    for name in ("a", "b", "c", "d"):
        create(stub, name, num_features=[20_000])  # 320 KB of statistics each
    assert len(stub.GetLayer(pb.GetLayerRequest(names=["a", "b"]), timeout=10).layers) == 2
    with raises_code(C.RESOURCE_EXHAUSTED, "outgrows the 1 MiB message limit") as info:
        stub.GetLayer(pb.GetLayerRequest(names=["a", "b", "c", "d"]), timeout=10)
    assert rich_details(info.value)["ErrorInfo"].reason == "ANSWER_TOO_LARGE"
    assert "ask names[3:] in another call" in info.value.details()  # a, b, c fit (3 x 320 KB)
