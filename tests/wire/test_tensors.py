"""normsvc.wire.tensors.decode_moments: the compiled check and the general one agree."""

import numpy as np
import pytest

import normsvc

from normsvc.moments import Moments
from normsvc.errors import InvalidTensor
from normsvc.wire.tensors import decode_moments, encode, encode_moments
from normsvc._proto import normsvc_pb2 as pb


def message(count, mean, variance, dtype=np.float64) -> pb.Moments:
    msg = pb.Moments()
    encode(np.asarray(count, dtype), msg.count)
    encode(np.asarray(mean, dtype), msg.mean)
    encode(np.asarray(variance, dtype), msg.variance)
    return msg


@pytest.mark.parametrize("count", [np.float64(5.0), np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 6.0]])])
def test_decoded_m2_is_variance_times_count(rng, count):
    mean, variance = rng.normal(size=(2, 3)), rng.uniform(0, 3, size=(2, 3))
    got = decode_moments(message(count, mean, variance), field="m")
    assert np.array_equal(got.m2, variance * count) and np.array_equal(got.mean, mean)
    assert got.count.shape == np.shape(count) and got.m2.dtype == np.float64
    # float32 tensors take the general path: the same values, in float64
    narrow = decode_moments(message(count, mean, variance, np.float32), field="m")
    want = variance.astype(np.float32).astype(np.float64) * np.asarray(count, np.float32).astype(np.float64)
    assert np.array_equal(narrow.m2, want)


def test_round_trip_of_encode_moments(rng):
    m = Moments.from_samples(rng.normal(size=(16, 4)))
    got = decode_moments(encode_moments(m), field="m")
    np.testing.assert_allclose(got.m2, m.m2, rtol=1e-15)
    assert np.array_equal(got.mean, m.mean) and float(got.count) == 16.0


@pytest.mark.parametrize("count, mean, variance, field, words", [
    (4.0, [np.nan, 1.0], [1.0, 1.0], "m.mean.data", "NaN or Inf"),
    (4.0, [1.0, -np.inf], [1.0, 1.0], "m.mean.data", "NaN or Inf"),
    (np.inf, [1.0, 1.0], [1.0, 1.0], "m.count.data", "NaN or Inf"),
    (-1.0, [1.0, 1.0], [1.0, 1.0], "m.count", "expected counts >= 0"),
    (-1.0, np.zeros(0), np.zeros(0), "m.count", "expected counts >= 0"),  # no elements to visit
    ([4.0, -4.0], [1.0, 1.0], [1.0, 1.0], "m.count", "expected counts >= 0"),
    (4.0, [1.0, 1.0], [1.0, -1e-300], "m.variance", "expected variances >= 0"),
    (4.0, [1.0, 1.0], [np.nan, 1.0], "m.variance.data", "NaN or Inf"),
])
def test_invalid_moments_name_the_field(count, mean, variance, field, words):
    with pytest.raises(InvalidTensor) as info:
        decode_moments(message(count, mean, variance), field="m")
    assert info.value.field == field and words in str(info.value)


def test_bfloat16_round_trips_bit_for_bit(rng):
    from normsvc._proto import normsvc_pb2 as pb
    from normsvc.wire.tensors import BFLOAT16, decode, encode

    x = rng.normal(size=(3, 5)).astype(BFLOAT16)
    t = encode(x)
    assert t.dtype == pb.DTYPE_BFLOAT16 and len(t.data) == x.size * 2
    back = decode(t, field="x")
    assert back.dtype == BFLOAT16 and np.array_equal(back.view(np.uint16), x.view(np.uint16))
    x[0, 0] = np.inf
    with pytest.raises(normsvc.InvalidArgument, match="x.data: has 1 NaN or Inf values"):
        decode(encode(x), field="x")
