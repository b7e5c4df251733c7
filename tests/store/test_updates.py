"""Updates through the store: conventions, versions, request ids, update_many, freeze, reset, rejections."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from normsvc import Moments, Store
from normsvc.store import ConfigConflict, FailedPrecondition, FrozenLayer, InvalidArgument, LayerNotFound
from store_testing import batch_moments, np_moments

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
RUNNING = [c for c in json.loads((GOLDEN / "index.json").read_text())["cases"] if c["kind"] == "running"]


@pytest.mark.parametrize("case", RUNNING, ids=[c["name"] for c in RUNNING])
def test_golden_sequences_on_every_backend(store, case):
    """The framework sequences of tests/golden (Keras momentum 0.9, torch 0.1 and None), on each backend."""
    kw, keys = case["kwargs"], case["keys"]
    with np.load(GOLDEN / case["file"]) as z:
        data = {k: z[k] for k in z.files}
    layer = store.create_layer("bn", kind=kw["kind"], axis=kw["axis"], momentum=kw["momentum"],
                               convention=kw["convention"])
    for step, batch in enumerate(data["batches"]):
        s = layer.update(np_moments(batch, case["reduce_axes"]))
        np.testing.assert_allclose(s.mean, data[keys["mean"]][step], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.variance, data[keys["variance"]][step], rtol=1e-5, atol=1e-6)
        assert s.num_batches == data[keys["num_batches"]][step] == step + 1
        assert s.version == step + 1
        assert s == layer.stats()
    assert s.count == data["batches"][0].size // s.mean.size * len(data["batches"])


def test_cumulative_matches_the_concatenation_channels_first(store, rng):
    layer = store.create_layer("bn", axis=1, convention="cumulative")
    batches = [1e3 + rng.normal(size=(int(rng.integers(1, 6)), 3, 4, 5)) * [[[2.0]], [[0.5]], [[1.0]]]
               for _ in range(15)]
    for b in batches:
        s = layer.update(np_moments(b, [0, 2, 3]))
    everything = np.concatenate(batches)
    np.testing.assert_allclose(s.mean, everything.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(s.variance, everything.var(axis=(0, 2, 3)), rtol=1e-9)
    assert s.count == everything.size / 3 and s.num_batches == 15


def test_cumulative_instance_layer_pools_every_sample(store, rng):
    layer = store.create_layer("in", kind="instance", axis=-1, convention="cumulative")
    batches = [rng.normal(loc=rng.normal(size=(n, 1, 1, 2)) * 3, size=(n, 4, 4, 2)) for n in (2, 3, 1, 4)]
    for b in batches:
        s = layer.update(np_moments(b, [1, 2]))  # per (N, C), as ops.instance_norm returns
    everything = np.concatenate(batches)
    np.testing.assert_allclose(s.mean, everything.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(s.variance, everything.var(axis=(0, 1, 2)), rtol=1e-10)


def test_torch_group_layer_averages_instances(store, rng):
    layer = store.create_layer("gn", kind="group", groups=2, axis=1, convention="torch")
    x = rng.normal(size=(3, 4, 5))
    g = x.reshape(3, 2, 10)
    s = layer.update(np_moments(g, [2]))
    np.testing.assert_allclose(s.mean, 0.1 * g.mean(axis=2).mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(s.variance, 0.9 + 0.1 * g.var(axis=2, ddof=1).mean(axis=0), rtol=1e-13)


def test_layer_kind_keeps_scalar_statistics(store, rng):
    layer = store.create_layer("ln", kind="layer", momentum=0.5)
    x = rng.normal(size=(6, 7, 8))
    s = layer.update(np_moments(x, [2]))  # per position (6, 7)
    np.testing.assert_allclose(s.mean, 0.5 * x.mean(axis=2).mean())
    np.testing.assert_allclose(s.variance, 0.5 + 0.5 * x.var(axis=2).mean())
    assert s.mean.shape == () and s.count == x.size


def test_first_batch_fixes_the_shape(store, assert_unchanged, rng):
    layer = store.create_layer("bn")
    assert layer.update(batch_moments(rng, c=4)).mean.shape == (4,)
    with assert_unchanged(store), pytest.raises(InvalidArgument, match=r"statistics shape \(5,\).*\(4,\)"):
        layer.update(batch_moments(rng, c=5))
    declared = store.create_layer("bn5", num_features=5)
    with assert_unchanged(store), pytest.raises(InvalidArgument, match=r"shape \(5,\)"):
        declared.update(batch_moments(rng, c=4))


def test_every_mutation_bumps_the_version_by_one(store, rng):
    layer = store.create_layer("bn")
    versions = [layer.stats().version]
    for step in (lambda: layer.update(batch_moments(rng)), layer.freeze, layer.unfreeze, layer.reset,
                 lambda: layer.update(batch_moments(rng))):
        versions.append(step().version)
    assert versions == [0, 1, 2, 3, 4, 5]
    assert layer.stats().updated_at >= layer.stats().updated_at > 0


def test_freeze_and_unfreeze_are_no_ops_when_already_there(store):
    layer = store.create_layer("bn")
    assert layer.unfreeze().version == 0
    assert layer.freeze().version == 1
    assert layer.freeze().version == 1 and layer.stats().frozen


def test_frozen_layer_rejects_updates(store, assert_unchanged, rng):
    layer = store.create_layer("bn")
    layer.update(batch_moments(rng))
    layer.freeze()
    with assert_unchanged(store), pytest.raises(FrozenLayer, match="'bn' is frozen") as info:
        layer.update(batch_moments(rng))
    assert isinstance(info.value, FailedPrecondition) and info.value.layer == "bn"
    layer.unfreeze()
    assert layer.update(batch_moments(rng)).num_batches == 2


def test_reset(store, rng):
    layer = store.create_layer("bn", convention="torch")
    layer.update(batch_moments(rng, c=3))
    layer.freeze()
    s = layer.reset()
    np.testing.assert_array_equal(s.mean, np.zeros(3))
    np.testing.assert_array_equal(s.variance, np.ones(3))
    assert (s.count, s.num_batches, s.frozen, s.version) == (0.0, 0, True, 3)
    cum = store.create_layer("cum", convention="cumulative")
    cum.update(batch_moments(rng, c=2))
    s = cum.reset()
    np.testing.assert_array_equal(s.variance, np.zeros(2))
    assert s.count == 0


def test_request_id_applies_once(store, rng):
    layer = store.create_layer("bn", momentum=0.5)
    m = batch_moments(rng)
    first = layer.update(m, request_id="step-1")
    again = layer.update(m, request_id="step-1")
    assert again == first == layer.stats() and first.version == 1 and first.num_batches == 1
    assert layer.update(m, request_id="step-2").version == 2
    # other mutations take request ids too
    assert layer.reset(request_id="reset-1").version == 3
    layer.update(m)
    assert layer.reset(request_id="reset-1").num_batches == 1


def test_request_ids_are_per_layer(store, rng):
    a, b = store.create_layer("a"), store.create_layer("b")
    a.update(batch_moments(rng), request_id="r")
    assert b.update(batch_moments(rng), request_id="r").version == 1
    store.create_layer("c")
    # a retry that names one more layer: only the layer that has not seen "r" takes it
    out = store.update_many({n: batch_moments(rng) for n in "abc"}, request_id="r")
    assert [out[n].version for n in "abc"] == [1, 1, 1]


def test_request_window_is_bounded(store_url, rng):
    with Store.open(store_url, request_window=3) as store:
        layer = store.create_layer("bn")
        layer.update(batch_moments(rng), request_id="old")
        layer.update(batch_moments(rng), request_id="old")
        assert layer.stats().version == 1
        for _ in range(2):
            layer.update(batch_moments(rng))
        assert layer.update(batch_moments(rng), request_id="old").version == 3  # still remembered
        layer.update(batch_moments(rng))
        assert layer.update(batch_moments(rng), request_id="old").version == 5  # forgotten: applied again


def test_invalid_request_ids(store, rng):
    layer = store.create_layer("bn")
    for bad in ("", "x" * 257, 7, b"id"):
        with pytest.raises(InvalidArgument) as info:
            layer.update(batch_moments(rng), request_id=bad)
        assert info.value.field == "request_id"
    assert layer.stats().version == 0


def test_update_many_applies_all_in_one_call(store, rng):
    names = [f"net/bn{i}" for i in range(12)]
    for i, n in enumerate(names):
        store.create_layer(n, momentum=0.9)
    pushes = {n: batch_moments(rng, c=3 + i) for i, n in enumerate(names)}
    out = store.update_many(pushes, request_id="step-0")
    assert list(out) == names
    for n in names:
        s = store.layer(n).stats()
        assert s == out[n] and s.version == 1 and s.num_batches == 1
        np.testing.assert_allclose(s.mean, 0.1 * pushes[n].mean)
    again = store.update_many(pushes, request_id="step-0")
    assert all(again[n].version == 1 for n in names)
    assert store.update_many({}) == {}


@pytest.mark.parametrize("spoiler", ["missing", "frozen", "nan", "shape"])
def test_update_many_is_all_or_nothing(store, assert_unchanged, rng, spoiler):
    for n in ("a", "b", "c"):
        store.create_layer(n)
        store.layer(n).update(batch_moments(rng))
    pushes = {"a": batch_moments(rng), "b": batch_moments(rng), "c": batch_moments(rng)}
    if spoiler == "missing":
        pushes["zz"] = batch_moments(rng)
        expected = LayerNotFound
    elif spoiler == "frozen":
        store.layer("c").freeze()
        expected = FrozenLayer
    elif spoiler == "nan":
        pushes["c"] = Moments(8.0, np.array([0.0, np.nan, 0, 0]), np.ones(4))
        expected = InvalidArgument
    else:
        pushes["c"] = batch_moments(rng, c=7)
        expected = InvalidArgument
    with assert_unchanged(store), pytest.raises(expected):
        store.update_many(pushes, request_id="x")
    # nothing was remembered either: the same request id applies once the push is valid
    if spoiler == "frozen":
        store.layer("c").unfreeze()
    pushes = {n: batch_moments(rng) for n in ("a", "b", "c")}
    assert all(s.num_batches == 2 for s in store.update_many(pushes, request_id="x").values())


def test_update_many_argument_checks(store, rng):
    store.create_layer("a")
    with pytest.raises(InvalidArgument, match="mapping"):
        store.update_many([("a", batch_moments(rng))])
    with pytest.raises(InvalidArgument) as info:
        store.update_many({"bad name": batch_moments(rng)})
    assert info.value.field == "name"


def _bad_moments():
    good_mean, good_m2 = np.zeros(4), np.ones(4)
    return {
        "nan mean": (Moments(8.0, [0, np.nan, 0, 0], good_m2), "moments.mean", "NaN or Inf"),
        "inf mean": (Moments(8.0, [0, np.inf, 0, 0], good_m2), "moments.mean", "NaN or Inf"),
        "nan m2": (Moments(8.0, good_mean, [1, 1, np.nan, 1]), "moments.m2", "NaN or Inf"),
        "inf m2": (Moments(8.0, good_mean, [1, 1, np.inf, 1]), "moments.m2", "NaN or Inf"),
        "nan count": (Moments(np.nan, good_mean, good_m2), "moments.count", "NaN or Inf"),
        "inf count": (Moments(np.inf, good_mean, good_m2), "moments.count", "NaN or Inf"),
        "negative count": (Moments(-8.0, good_mean, good_m2), "moments.count", "positive"),
        "zero count": (Moments(0.0, good_mean, good_m2), "moments.count", "positive"),
        "negative variance": (Moments(8.0, good_mean, [1, -1e-3, 1, 1]), "moments.m2", "negative"),
        "other features": (Moments(8.0, np.zeros(5), np.ones(5)), "moments.mean", "shape"),
        "other rank": (Moments(8.0, np.zeros((2, 4)), np.ones((2, 4))), "moments.mean", "shape"),
        "scalar": (Moments(8.0, 0.0, 1.0), "moments.mean", "shape"),
        "uneven counts": (Moments([8.0, 8, 7, 8], good_mean, good_m2), "moments.count", "differs"),
        "not moments": ((8.0, good_mean, good_m2), "moments", "normsvc.Moments"),
        "overflow": (Moments(8.0, [0, 1e308, 0, 0], good_m2), "moments.mean", "overflow"),
    }


@pytest.mark.parametrize("case", list(_bad_moments()))
def test_rejected_moments_change_nothing(store, assert_unchanged, rng, case):
    moments, field, message = _bad_moments()[case]
    # the cumulative merge squares the distance between means: 1e308 overflows it
    layer = store.create_layer("bn", convention="cumulative" if case == "overflow" else "keras")
    layer.update(batch_moments(rng, c=4))
    with assert_unchanged(store), pytest.raises(InvalidArgument, match=message) as info:
        layer.update(moments, request_id="r")
    assert info.value.field == field and info.value.layer == "bn"
    assert layer.update(batch_moments(rng, c=4), request_id="r").version == 2  # "r" was not remembered


def test_uniform_per_group_counts_are_accepted(store):
    layer = store.create_layer("bn", momentum=0.0)
    s = layer.update(Moments(np.full(3, 4.0), np.arange(3.0), np.full(3, 8.0)))
    np.testing.assert_array_equal(s.variance, [2.0, 2.0, 2.0])
    assert s.count == 4.0


def test_torch_needs_more_than_one_value_per_channel(store, assert_unchanged):
    layer = store.create_layer("bn", convention="torch")
    with assert_unchanged(store), pytest.raises(InvalidArgument, match="more than 1 value"):
        layer.update(np_moments(np.ones((1, 3)), [0]))
    inst = store.create_layer("in", kind="instance", axis=1, convention="torch")
    with assert_unchanged(store), pytest.raises(InvalidArgument, match="more than 1 value"):
        inst.update(np_moments(np.ones((4, 3, 1)), [2]))  # 4 instances of one value each


def test_instance_moments_need_the_sample_axis(store, assert_unchanged, rng):
    layer = store.create_layer("in", kind="instance", axis=1)
    with assert_unchanged(store), pytest.raises(InvalidArgument, match=r"shape \(N, C\)"):
        layer.update(batch_moments(rng, c=3))  # per channel only: not what instance norm produces


def test_returned_arrays_do_not_alias_the_store(store, rng):
    layer = store.create_layer("bn")
    s = layer.update(batch_moments(rng, c=3))
    s.mean[:] = 99.0
    s.variance[:] = -1.0
    assert np.all(layer.stats().mean != 99.0) and np.all(layer.stats().variance > 0)


def test_sqlite_persists_exact_values(sqlite_url, rng):
    with Store.open(sqlite_url) as a:
        layer = a.create_layer("bn", convention="cumulative")
        for _ in range(5):
            layer.update(batch_moments(rng, c=6, loc=math.pi, scale=1e-3))
        want = layer.stats()
    with Store.open(sqlite_url) as b:
        assert b.layer("bn").stats() == want
        assert b.layer("bn").stats().mean.dtype == np.float64


def test_conflicting_create_leaves_the_layer(store, rng):
    layer = store.create_layer("bn")
    layer.update(batch_moments(rng))
    with pytest.raises(ConfigConflict):
        store.create_layer("bn", convention="torch")
    assert layer.stats().num_batches == 1
