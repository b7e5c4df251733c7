"""normsvc/client/operations.py without a server: each operation is driven with canned responses."""

from __future__ import annotations

import numpy as np
import pytest

from normsvc import Moments
from normsvc._proto import normsvc_pb2 as pb
from normsvc.client import LayerInfo, operations
from normsvc.client.operations import Call
from normsvc.errors import InvalidArgument, InvalidType
from normsvc.running import RunningStats
from normsvc.config import DEFAULT
from normsvc.wire.messages import stats_to_pb
from normsvc.wire.tensors import DTYPE_CODES, chunks


def drive(operation, *responses):
    """Run ``operation`` answering its calls with ``responses`` in order; returns (calls, value)."""
    calls = []
    try:
        call = next(operation)
        for response in responses:
            calls.append(call)
            call = operation.send(response)
    except StopIteration as done:
        return calls, done.value
    raise AssertionError(f"the operation asked for more calls than answered: {call}")


def stats_pb(version: int) -> pb.RunningStats:
    stats = RunningStats(mean=np.zeros(2), variance=np.ones(2), count=0.0, num_batches=0, version=version,
                         frozen=False)
    return stats_to_pb(stats)


@pytest.mark.parametrize("operation", [
    lambda: operations.list_layers("", None, 0),
    lambda: operations.list_layers("", 3, None),
    lambda: operations.list_layers(7, None, None),
    lambda: operations.create_layer("x", {"convention": "nope"}),
    lambda: operations.update_many([("x", None)], None),
    lambda: operations.allreduce("not a mapping", 0, 0, 1, "", True, DEFAULT),
    lambda: operations.normalize("x", np.ones(3), training="yes", update=True, gamma=None, beta=None,
                                 request_id=None, max_message_bytes=1 << 20),
])
def test_bad_arguments_fail_before_the_first_call(operation):
    with pytest.raises(InvalidArgument):
        next(operation())


def test_int_tensors_are_not_normalized():
    with pytest.raises(InvalidType, match="x has dtype int32"):
        next(operations.normalize("x", np.ones(3, dtype=np.int32), training=True, update=True, gamma=None,
                                  beta=None, request_id=None, max_message_bytes=1 << 20))


def test_list_layers_reads_every_page_then_filters():
    op = operations.list_layers("net/", "net/b", 2)
    pages = [pb.ListLayersResponse(layers=[pb.Layer(name="net/a"), pb.Layer(name="net/b")], next_page_token="p2"),
             pb.ListLayersResponse(layers=[pb.Layer(name="net/c"), pb.Layer(name="net/d"), pb.Layer(name="net/e")])]
    calls, names = drive(op, *pages)
    assert [c.request.page_token for c in calls] == ["", "p2"]
    assert {c.request.prefix for c in calls} == {"net/"} and not calls[0].request.include_stats
    assert names == ["net/c", "net/d"]


def test_describe_names_one_call_and_stats_only_where_sent():
    config = pb.LayerConfig()
    calls, infos = drive(operations.describe(["a", "b"], ""), pb.GetLayerResponse(layers=[
        pb.Layer(name="a", config=config, stats=stats_pb(3)), pb.Layer(name="b", config=config)]))
    assert [c.method for c in calls] == ["GetLayer"] and list(calls[0].request.names) == ["a", "b"]
    assert all(isinstance(i, LayerInfo) for i in infos)
    assert infos[0].stats.version == 3 and infos[1].stats is None


def test_updates_carry_a_request_id_fresh_or_given():
    m = Moments.from_samples(np.ones((2, 2)))
    answer = pb.UpdateStatsResponse(stats=[pb.LayerStats(layer="bn", stats=stats_pb(1))])
    (fresh,), stats = drive(operations.update("bn", m, None), answer)
    assert len(fresh.request.request_id) == 32 and stats.version == 1
    (given,), _ = drive(operations.update("bn", m, "mine"), answer)
    assert given.request.request_id == "mine"
    assert drive(operations.update_many({}, None)) == ([], {})  # nothing to send, no call


def test_allreduce_keeps_its_own_timeout():
    m = Moments.from_samples(np.ones((2, 2)))
    (call,), result = drive(operations.allreduce({"bn": m}, 4, 1, 2, "job", True, 0.5),
                            pb.AllReduceMomentsResponse())
    assert call.method == "AllReduceMoments" and call.timeout == 0.5
    assert (call.request.step, call.request.rank, call.request.world_size, call.request.group) == (4, 1, 2, "job")
    assert result.moments == {} and result.stats == {}


def normalize(x, max_message_bytes, **kwargs):
    kwargs = {"training": True, "update": True, "gamma": None, "beta": None, "request_id": None,
              "max_message_bytes": max_message_bytes} | kwargs
    return operations.normalize("ln", x, **kwargs)


def test_normalize_fits_in_one_message():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    op = normalize(x, 1 << 20, training=False, gamma=np.ones(4))
    call = next(op)
    assert call == Call("Normalize", call.request, raw=True)
    request = pb.NormalizeRequest.FromString(call.request)
    assert request.layer == "ln" and not request.HasField("update") and request.request_id == ""
    np.testing.assert_array_equal(np.frombuffer(request.x.data, "<f4").reshape(3, 4), x)
    assert list(request.gamma.shape) == [4]
    with pytest.raises(StopIteration) as done:
        op.send((x * 2, None))
    np.testing.assert_array_equal(done.value.value, x * 2)


def test_normalize_over_the_limit_streams_in_chunks():
    x = np.arange(40_000, dtype=np.float64).reshape(200, 200)  # 320 kB
    op = normalize(x, 100_000)  # 100 kB messages: chunks of 100 kB - 64 KiB
    call = next(op)
    assert call.method == "NormalizeStream" and call.streaming
    sent = list(call.request())
    header = sent[0].header
    assert header.layer == "ln" and header.update and len(header.request_id) == 32
    assert (header.dtype, list(header.shape)) == (DTYPE_CODES[np.dtype("<f8")], [200, 200])
    assert b"".join(m.chunk for m in sent[1:]) == x.tobytes() and len(sent) == 1 + 10
    assert [m.chunk for m in sent[1:]] == [m.chunk for m in list(call.request())[1:]]  # a retry sends it again
    y = -x
    result = pb.NormalizeStreamResult(dtype=header.dtype, shape=[200, 200])
    answer = [pb.NormalizeStreamResponse(result=result)]
    answer += [pb.NormalizeStreamResponse(chunk=c) for c in chunks(y, 65536)]
    with pytest.raises(StopIteration) as done:
        op.send(answer)
    np.testing.assert_array_equal(done.value.value, y)


def test_normalize_stream_without_a_result_is_an_error():
    op = normalize(np.zeros((300, 300)), 100_000)
    next(op)
    with pytest.raises(InvalidArgument, match="without a result"):
        op.send([])


def test_export_writes_the_file_whole(tmp_path):
    path = tmp_path / "stats.safetensors"
    (call,), layers = drive(operations.export(path, "bn", "torch", "float32"),
                            pb.ExportStatsResponse(safetensors=b"bytes", layers=["bn"]))
    assert list(call.request.names) == ["bn"] and call.request.naming == pb.NAMING_TORCH
    assert path.read_bytes() == b"bytes" and layers == ["bn"]
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temporary file left


def test_import_of_a_missing_file_fails_before_the_call(tmp_path):
    with pytest.raises(InvalidArgument, match="no file"):
        next(operations.import_(tmp_path / "missing.safetensors", "keras", None))
