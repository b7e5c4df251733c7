"""Normalize and NormalizeStream (their limits: test_limits.py)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from server_util import decode, encode, moments_of, pb, raises_code, rich_details, stats_arrays, update_request

from normsvc import ops
from normsvc.wire.tensors import Assembler, chunks

C = grpc.StatusCode
MiB = 1 << 20


def create(stub, name, **config):
    return stub.CreateLayer(pb.CreateLayerRequest(name=name, config=pb.LayerConfig(**config))).layer


def normalize(stub, layer, x, mode=pb.MODE_TRAINING, **kw):
    return stub.Normalize(pb.NormalizeRequest(layer=layer, x=encode(x), mode=mode, **kw))


def test_training_normalizes_with_batch_statistics_and_updates(stub, rng):
    create(stub, "bn", momentum=0.9)
    x = rng.normal(3, 2, (64, 8)).astype(np.float32)
    response = normalize(stub, "bn", x)
    y = decode(response.y, field="y")
    want, m = ops.batch_norm(x, axis=-1, epsilon=1e-3)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, want)
    assert (response.stats.version, response.stats.num_batches) == (1, 1)
    np.testing.assert_allclose(stats_arrays(response.stats)[0], 0.1 * m.mean, rtol=1e-12)


def test_inference_and_no_update(stub, rng):
    create(stub, "bn")
    stub.UpdateStats(update_request({"bn": moments_of(rng.normal(5, 3, (256, 4)))}))
    running = stub.GetLayer(pb.GetLayerRequest(names=["bn"])).layers[0].stats
    mean, var = stats_arrays(running)
    x = rng.normal(5, 3, (16, 4))
    response = normalize(stub, "bn", x, mode=pb.MODE_INFERENCE)
    want, _ = ops.batch_norm(x, axis=-1, epsilon=1e-3, mean=mean, variance=var)
    np.testing.assert_array_equal(decode(response.y, field="y"), want)
    assert not response.HasField("stats")
    response = normalize(stub, "bn", x, update=False)
    np.testing.assert_array_equal(decode(response.y, field="y"), ops.batch_norm(x, axis=-1, epsilon=1e-3)[0])
    assert stub.GetLayer(pb.GetLayerRequest(names=["bn"])).layers[0].stats.version == running.version


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_output_keeps_the_dtype_and_affine_parameters_apply(mstub, rng, dtype):
    create(mstub, "gn", kind=pb.LAYER_KIND_GROUP, groups=2)
    x = rng.normal(size=(4, 5, 6)).astype(dtype)
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    response = normalize(mstub, "gn", x, gamma=encode(gamma), beta=encode(beta), update=False)
    y = decode(response.y, field="y")
    want, _ = ops.group_norm(x, groups=2, axis=-1, epsilon=1e-3, gamma=gamma, beta=beta)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, want)


def test_normalize_errors(mstub, rng):
    create(mstub, "bn")
    x = rng.normal(size=(8, 3)).astype(np.float32)
    bad = x.copy()
    bad[2, 1] = np.inf
    with raises_code(C.INVALID_ARGUMENT, "NaN or Inf") as info:
        normalize(mstub, "bn", bad)
    assert rich_details(info.value)["BadRequest"].field_violations[0].field == "x.data"
    with raises_code(C.INVALID_ARGUMENT, "mode"):
        normalize(mstub, "bn", x, mode=pb.MODE_UNSPECIFIED)
    with raises_code(C.INVALID_ARGUMENT, "x is missing"):
        mstub.Normalize(pb.NormalizeRequest(layer="bn", mode=pb.MODE_TRAINING))
    short = encode(x)
    short.data = short.data[:-4]
    with raises_code(C.INVALID_ARGUMENT, "has 92 bytes: expected 96"):
        mstub.Normalize(pb.NormalizeRequest(layer="bn", x=short, mode=pb.MODE_TRAINING))
    with raises_code(C.INVALID_ARGUMENT, "gamma"):
        normalize(mstub, "bn", x, gamma=encode(np.ones(5)))
    with raises_code(C.NOT_FOUND):
        normalize(mstub, "nope", x)
    assert mstub.GetLayer(pb.GetLayerRequest(names=["bn"])).layers[0].stats.version == 0
    mstub.Freeze(pb.FreezeRequest(name="bn"))  # frozen: training normalizes with the running statistics
    response = normalize(mstub, "bn", x)
    np.testing.assert_array_equal(decode(response.y, field="y"),
                                  ops.batch_norm(x, axis=-1, epsilon=1e-3, mean=0.0, variance=1.0)[0])
    # nothing was updated: neither batch moments nor statistics come back (the proto's promise)
    assert not response.HasField("stats") and not response.HasField("batch_moments")
    assert mstub.GetLayer(pb.GetLayerRequest(names=["bn"])).layers[0].stats.version == 1


def stream_requests(layer, x, chunk_bytes, mode=pb.MODE_TRAINING, **header):
    yield pb.NormalizeStreamRequest(header=pb.NormalizeStreamHeader(
        layer=layer, dtype=encode(x[:0]).dtype, shape=x.shape, mode=mode, **header))
    for chunk in chunks(x, chunk_bytes):
        yield pb.NormalizeStreamRequest(chunk=chunk)


def read_stream(responses):
    it = iter(responses)
    first = next(it)
    assert first.WhichOneof("part") == "result"
    y = Assembler(first.result.dtype, first.result.shape, field="y")
    for msg in it:
        y.add(msg.chunk)
    return first.result, y.array()


def test_normalize_stream_carries_a_64_mib_tensor(memory_server, connect, rng):
    stub = connect(memory_server)
    create(stub, "big/ln", kind=pb.LAYER_KIND_LAYER)
    x = rng.standard_normal((16384, 1024), dtype=np.float32)  # 64 MiB
    assert x.nbytes == 64 * MiB
    result, y = read_stream(stub.NormalizeStream(stream_requests("big/ln", x, 4 * MiB), timeout=120))
    want, _ = ops.layer_norm(x, axis=-1, epsilon=1e-3)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(y, want)
    assert result.stats.version == 1


def test_normalize_stream_errors(memory_server, connect, rng):
    stub = connect(memory_server)
    create(stub, "bn")
    x = rng.normal(size=(64, 4))

    def call(messages):
        return read_stream(stub.NormalizeStream(iter(list(messages)), timeout=30))

    header, *body = list(stream_requests("bn", x, 512))
    with raises_code(C.INVALID_ARGUMENT, "first message must be a header"):
        call(body)
    with raises_code(C.INVALID_ARGUMENT, "expected 2048"):
        call([header] + body[:-1])
    with raises_code(C.INVALID_ARGUMENT, "more than the 2048 bytes"):
        call([header] + body + body[:1])
    with raises_code(C.INVALID_ARGUMENT, "expected only chunks"):
        call([header] + body + [header])
    with raises_code(C.NOT_FOUND):
        call(stream_requests("nope", x, 512))
    result, y = call([header] + body)  # and a good one after all that
    np.testing.assert_array_equal(y, ops.batch_norm(x, axis=-1, epsilon=1e-3)[0])


def test_concurrent_normalize_calls_run_the_parallel_kernels_safely(memory_server, connect, rng):
    """8 clients at once on tensors big enough for the parallel kernels (numba's default
    threading layer would abort the process here; the kernels pick a thread-safe one)."""
    stub = connect(memory_server)
    create(stub, "bn")
    xs = [rng.standard_normal((256, 1024), dtype=np.float32) + k for k in range(8)]
    results = [None] * len(xs)

    def call(k):
        mine = connect(memory_server)
        for _ in range(3):
            results[k] = decode(normalize(mine, "bn", xs[k], update=False).y, field="y")

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for x, y in zip(xs, results):
        np.testing.assert_array_equal(y, ops.batch_norm(x, axis=-1, epsilon=1e-3)[0])


def test_batch_moments_in_training_mode_only(stub, rng):
    create(stub, "bn", momentum=0.9)
    x = rng.normal(3, 2, (64, 8)).astype(np.float32)
    m = normalize(stub, "bn", x).batch_moments
    want = ops.moments(x, axes=[0])
    np.testing.assert_array_equal(decode(m.mean, field="mean"), want.mean)
    np.testing.assert_allclose(decode(m.variance, field="variance"), want.variance, rtol=1e-12)
    np.testing.assert_array_equal(decode(m.count, field="count"), want.count)
    assert normalize(stub, "bn", x, update=False).HasField("batch_moments")
    assert not normalize(stub, "bn", x, mode=pb.MODE_INFERENCE).HasField("batch_moments")
    stub.Freeze(pb.FreezeRequest(name="bn"))
    assert not normalize(stub, "bn", x).HasField("batch_moments")


def test_bfloat16_travels_as_bfloat16_unary_and_streamed(start_server, rng):
    """DTYPE_BFLOAT16 on the wire: what the ops compute in-process, bit for bit, both ways."""
    from normsvc import Client, ops
    from normsvc.wire.tensors import BFLOAT16

    server = start_server(max_message_mb=1)
    x = rng.normal(2.0, 3.0, size=(64, 8)).astype(BFLOAT16)
    big = rng.normal(size=(1000, 1024)).astype(BFLOAT16)  # 2 MB: sent as a stream
    with Client(server.address, max_message_bytes=1 << 20) as client:
        y = client.create_layer("bf16/bn", num_features=8).normalize(x, training=True)
        want, m = ops.batch_norm(x)
        assert y.dtype == BFLOAT16 and np.array_equal(y.view(np.uint16), want.view(np.uint16))
        np.testing.assert_allclose(client.layer("bf16/bn").stats().mean, 0.01 * m.mean, rtol=1e-12)
        y = client.create_layer("bf16/ln", kind="layer").normalize(big, training=True)
        want, _ = ops.layer_norm(big)
        assert y.dtype == BFLOAT16 and np.array_equal(y.view(np.uint16), want.view(np.uint16))
