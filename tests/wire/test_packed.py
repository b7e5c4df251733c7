"""normsvc.wire.packed: many layers' moments and statistics in a few buffers, against the per-layer codec."""

import numpy as np
import pytest

from normsvc._proto import normsvc_pb2 as pb
from normsvc.errors import InvalidTensor, TensorTooLarge
from normsvc.moments import Moments
from normsvc.running import RunningStats
from normsvc.wire.messages import moments_to_pb, stats_from_pb, stats_to_pb
from normsvc.wire.packed import pack_moments, pack_stats, packable, unpack_moments, unpack_stats
from normsvc.wire.tensors import decode_moments, encode


def step(rng) -> dict:
    """Moments of every layout a packed request carries: 1-D, 2-D (instance), 0-d (layer norm), one channel."""
    shapes = {"stem/bn": (64,), "block/in": (3, 5), "ln": (), "one": (1,)}
    return {name: Moments(np.float64(rng.integers(2, 100)), rng.normal(size=shape), rng.uniform(0, 5, size=shape))
            for name, shape in shapes.items()}


def packed(updates) -> pb.PackedMoments:
    return pb.PackedMoments.FromString(pack_moments(updates, pb.PackedMoments()).SerializeToString())


def test_unpacked_moments_equal_the_per_layer_codec(rng):
    updates = step(rng)
    got = unpack_moments(packed(updates), field="packed")
    assert list(got) == list(updates)
    for name, m in updates.items():
        want = decode_moments(moments_to_pb(name, m, pb.LayerMoments()).moments, field="m")
        g = got[name]
        assert g.mean.shape == m.mean.shape and g.count.shape == ()
        assert np.array_equal(g.mean, want.mean) and np.array_equal(g.m2, want.m2)
        assert float(g.count) == float(m.count)
    # an empty batch (count 0) packs with variance 0, as Moments.variance says
    zero = {"z": Moments(np.float64(0), np.zeros(3), np.zeros(3))}
    assert np.array_equal(unpack_moments(packed(zero), field="packed")["z"].m2, np.zeros(3))


def test_only_one_count_per_layer_packs(rng):
    m = Moments(np.float64(3), rng.normal(size=4), np.ones(4))
    assert packable({"a": m})
    assert not packable({"a": m, "b": Moments(np.full(4, 3.0), m.mean, m.m2)})
    assert not packable({"a": (1, 2, 3)})


def corrupt(msg: pb.PackedMoments, **changes) -> pb.PackedMoments:
    out = pb.PackedMoments()
    out.CopyFrom(msg)
    for field, value in changes.items():
        if isinstance(value, np.ndarray):
            encode(value, getattr(out, field))
        elif value is None:
            out.ClearField(field)
        else:
            getattr(out, field)[:] = value
    return out


@pytest.mark.parametrize("changes, field, words", [
    ({"ndim": [1, 2, 0]}, "packed.ndim", "3 entries: expected one per layer (4)"),
    ({"ndim": [1, 2, 0, 99]}, "packed.ndim", "expected ranks from 0 to 32"),
    ({"dims": [64, 3, 5]}, "packed.dims", "expected sum(ndim) = 4"),
    ({"dims": [64, 3, -5, 1]}, "packed.dims", "expected sizes >= 0"),
    ({"count": [1.0]}, "packed.count", "1 entries: expected one per layer (4)"),
    ({"count": [5.0, float("nan"), 2.0, 2.0]}, "packed.count", "for layer 'block/in'"),
    ({"mean": None}, "packed.mean", "is missing"),
    ({"variance": np.zeros(3)}, "packed.variance", "expected [81]"),
    ({"mean": np.zeros((81, 1))}, "packed.mean", "expected [81]"),
    ({"dims": [1 << 62, 1 << 62, 5, 1]}, "packed.mean", f"expected [{(1 << 62) * 6 + 2}]"),  # no overflow
])
def test_malformed_packed_moments_name_the_field(rng, changes, field, words):
    msg = corrupt(packed(step(rng)), **changes)
    with pytest.raises(InvalidTensor) as info:
        unpack_moments(msg, field="packed")
    assert info.value.field.startswith(field) and words in str(info.value)


@pytest.mark.parametrize("part, value, field, words", [
    ("mean", np.nan, "packed.mean", "NaN or Inf values for layer 'block/in'"),
    ("variance", np.inf, "packed.variance", "NaN or Inf values for layer 'block/in'"),
    ("variance", -1.0, "packed.variance", "negative entries for layer 'block/in'"),
])
def test_bad_values_name_the_layer(rng, part, value, field, words):
    msg = packed(step(rng))
    values = np.frombuffer(getattr(msg, part).data, dtype="<f8").copy()
    values[64 + 7] = value  # inside the second layer
    with pytest.raises(InvalidTensor) as info:
        unpack_moments(corrupt(msg, **{part: values}), field="packed")
    assert info.value.field == field and words in str(info.value)


def test_too_many_elements_are_refused_before_decoding(rng):
    with pytest.raises(TensorTooLarge, match="packed.mean.shape: \\[81\\] has 81 elements: expected at most 10"):
        unpack_moments(packed(step(rng)), field="packed", max_elements=10)


def some_stats(rng, shape, renorm=False, last_step=None) -> RunningStats:
    extra = {}
    if renorm:
        extra = {k: rng.uniform(0.5, 2, size=shape) for k in ("moving_stddev", "renorm_mean", "renorm_stddev")}
    return RunningStats(rng.normal(size=shape), rng.uniform(0, 2, size=shape), float(rng.integers(0, 1000)),
                        int(rng.integers(0, 50)), int(rng.integers(0, 50)), bool(rng.integers(0, 2)),
                        1.7e9 + float(rng.uniform()), "run-a", last_step, **extra)


@pytest.mark.parametrize("renorm", [False, True])
def test_unpacked_stats_equal_the_per_layer_codec(rng, renorm):
    stats = {"a": some_stats(rng, (64,), last_step=3), "b": some_stats(rng, (2, 3), renorm=renorm),
             "c": some_stats(rng, ()), "d": some_stats(rng, (7,), renorm=renorm, last_step=0)}
    msg = pb.PackedStats.FromString(pack_stats(stats, pb.PackedStats()).SerializeToString())
    got = unpack_stats(msg)
    assert list(got) == list(stats)
    for name, s in stats.items():
        want = stats_from_pb(pb.RunningStats.FromString(stats_to_pb(s).SerializeToString()))
        # every field, the arrays' shapes and bits; the Timestamp of RunningStats rounds to nanoseconds
        assert got[name].updated_at == s.updated_at and abs(want.updated_at - s.updated_at) < 1e-6
        assert got[name] == want.evolve(updated_at=s.updated_at)
        assert got[name].mean.flags.writeable and got[name].last_step == s.last_step
    # the caller owns them: writing one layer's array leaves the others alone
    got["a"].mean[:] = 0
    assert np.array_equal(got["c"].mean, stats["c"].mean) and np.array_equal(got["d"].mean, stats["d"].mean)


def test_packed_stats_with_missing_columns_are_refused(rng):
    msg = pack_stats({"a": some_stats(rng, (4,))}, pb.PackedStats())
    msg.version.append(3)
    with pytest.raises(InvalidTensor, match=r"packed.version: has 2 entries: expected one per layer \(1\)"):
        unpack_stats(msg)
