"""normsvc.wire.framing writes and reads exactly what upb does, for every shape and dtype."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from normsvc.wire import framing as _wire
from normsvc._proto import normsvc_pb2 as pb
from normsvc.wire.tensors import DTYPES, decode, encode, encode_moments
from normsvc import Moments

CODES = {np.dtype(dt): code for code, dt in DTYPES.items()}
shapes = st.lists(st.integers(0, 300), min_size=0, max_size=4).filter(lambda s: np.prod(s) <= 20_000)
dtypes = st.sampled_from([np.float16, np.float32, np.float64])


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=dtypes, layer=st.text(max_size=40), update=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_request_parses_as_upb_would(shape, dtype, layer, update, seed):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    small = pb.NormalizeRequest(layer=layer, mode=pb.MODE_TRAINING, update=update, request_id="r",
                                gamma=encode(np.ones(3)))
    raw = _wire.with_tensor(small.SerializeToString(), 2, x, CODES[x.dtype])
    expected = pb.NormalizeRequest(layer=layer, mode=pb.MODE_TRAINING, update=update, request_id="r",
                                   gamma=encode(np.ones(3)), x=encode(x))
    assert pb.NormalizeRequest.FromString(raw) == expected


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=dtypes, seed=st.integers(0, 2**32 - 1), with_stats=st.booleans())
def test_response_y_reads_as_upb_would(shape, dtype, seed, with_stats):
    y = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    response = pb.NormalizeResponse(y=encode(y))
    if with_stats:
        encode_moments(Moments.from_samples(np.ones((2, 3))), response.batch_moments)
        response.stats.version = 300
        encode(np.zeros(3), response.stats.mean)
    got = _wire.normalize_y(response.SerializeToString())
    assert got.dtype == y.dtype and got.shape == y.shape and got.flags.writeable
    np.testing.assert_array_equal(got, y)


def test_unexpected_layouts_fall_back_to_upb():
    # y split over two occurrences of field 1: protobuf merges them, so must we
    first = pb.NormalizeResponse(y=pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=[2]))
    second = pb.NormalizeResponse(y=pb.Tensor(data=np.array([1.0, 2.0]).tobytes()))
    raw = first.SerializeToString() + second.SerializeToString()
    np.testing.assert_array_equal(_wire.normalize_y(raw), [1.0, 2.0])
    expected = decode(pb.NormalizeResponse.FromString(raw).y, field="y")
    np.testing.assert_array_equal(_wire.normalize_y(raw), expected)


def test_varint():
    for n in (0, 1, 127, 128, 300, 2**32, 2**63 - 1):
        t = pb.Tensor(shape=[n]).SerializeToString()
        assert t == b"\x12" + _wire.varint(len(_wire.varint(n))) + _wire.varint(n)
