"""Store: public names, create_layer (defaults, idempotence, conflicts), listing, delete, update_many, put_stats."""

import numpy as np
import pytest

from normsvc.errors import AlreadyExists

import normsvc
from normsvc import Moments, RunningStats
from normsvc.store import (
    ConfigConflict,
    FailedPrecondition,
    FrozenLayer,
    InvalidArgument,
    LayerConfig,
    LayerNotFound,
    NoStatistics,
    StoreError,
    StoreUnavailable,
)
from store_testing import batch_moments, np_moments


def test_public_names():
    for name in ("Store", "Layer", "RunningStats", "InvalidArgument", "LayerNotFound", "ConfigConflict",
                 "FrozenLayer", "NoStatistics", "StoreUnavailable", "FailedPrecondition", "StoreError"):
        assert name in normsvc.__all__ and hasattr(normsvc, name)


def test_error_classes_are_distinct():
    classes = [InvalidArgument, LayerNotFound, ConfigConflict, FrozenLayer, NoStatistics, StoreUnavailable]
    for i, a in enumerate(classes):
        assert issubclass(a, StoreError)
        for b in classes[i + 1:]:
            assert not issubclass(a, b) and not issubclass(b, a)
    assert issubclass(FrozenLayer, FailedPrecondition) and issubclass(NoStatistics, FailedPrecondition)
    assert issubclass(InvalidArgument, ValueError) and issubclass(LayerNotFound, LookupError)
    e = LayerNotFound("no layer named 'x'", layer="x")
    assert str(e) == "no layer named 'x'" and e.layer == "x" and e.field is None


@pytest.mark.parametrize(
    "convention, momentum, epsilon",
    [("keras", 0.99, 1e-3), ("torch", 0.1, 1e-5), ("cumulative", None, 1e-3)],
)
def test_defaults_follow_the_convention(store, convention, momentum, epsilon):
    layer = store.create_layer("bn", convention=convention)
    cfg = layer.config()
    assert (cfg.momentum, cfg.epsilon, cfg.convention) == (momentum, epsilon, convention)
    # torch's BatchNorm keeps the channel dim 1; Keras' the last axis
    assert (cfg.kind, cfg.axis, cfg.center, cfg.scale) == ("batch", 1 if convention == "torch" else -1, True, True)
    s = layer.stats()
    assert (s.count, s.num_batches, s.version, s.frozen) == (0.0, 0, 0, False)
    assert s.mean.shape == ()  # shape learned from the first batch
    assert float(s.variance) == (0.0 if convention == "cumulative" else 1.0)


def test_create_is_idempotent_for_an_identical_config(store):
    a = store.create_layer("enc/bn1", axis=1, convention="torch")
    a.update(np_moments(np.arange(12.0).reshape(3, 4), axes=[0]))
    b = store.create_layer("enc/bn1", axis=1, convention="torch", momentum=0.1, epsilon=1e-5)
    assert b.name == "enc/bn1" and b.stats() == a.stats()
    # num_features naming the learned shape is the same layer too
    store.create_layer("enc/bn1", axis=1, convention="torch", num_features=4)


@pytest.mark.parametrize("change", [
    {"momentum": 0.9}, {"epsilon": 1e-5}, {"convention": "torch"}, {"axis": 1}, {"kind": "instance", "axis": 1},
    {"center": False}, {"scale": False}, {"num_features": 3},
])
def test_create_with_another_config_conflicts(store, assert_unchanged, change):
    store.create_layer("bn", num_features=4)
    with assert_unchanged(store), pytest.raises(ConfigConflict, match="'bn' exists with another config") as info:
        store.create_layer("bn", **{"num_features": 4, **change})
    assert info.value.layer == "bn"
    # the message names each field that differs, with both values, and no Python dict
    key = next(iter(change))
    assert f"{key} is " in str(info.value) and "{" not in str(info.value)


@pytest.mark.parametrize("kind, axis", [("batch", 1), ("instance", 1), ("group", 1), ("layer", -1), ("rms", -1)])
def test_torch_layers_default_to_the_channel_dim(store, rng, kind, axis):
    # a PyTorch user's NCHW batch fits a torch-convention layer created without an axis
    layer = store.create_layer(kind, kind=kind, convention="torch", **({"groups": 4} if kind == "group" else {}))
    assert layer.config().axis == axis
    x = rng.normal(size=(4, 8, 5, 5))
    y = layer.normalize(x, training=True)
    assert y.shape == x.shape
    assert layer.normalize(x, training=False).shape == x.shape


def test_conflicting_create_leaves_the_layer(store, rng):
    layer = store.create_layer("bn")
    layer.update(batch_moments(rng))
    with pytest.raises(ConfigConflict):
        store.create_layer("bn", convention="torch")
    assert layer.stats().num_batches == 1


def test_num_features_shapes_up_front(store):
    s = store.create_layer("bn", num_features=5).stats()
    np.testing.assert_array_equal(s.mean, np.zeros(5))
    np.testing.assert_array_equal(s.variance, np.ones(5))
    s = store.create_layer("bn2", axis=[1, 3], num_features=(2, 3)).stats()
    assert s.mean.shape == (2, 3)
    assert store.create_layer("gn", kind="group", groups=4).stats().mean.shape == (4,)
    assert store.create_layer("gn-default", kind="group").config().groups == 32
    assert store.create_layer("ln", kind="layer").stats().mean.shape == ()
    assert store.create_layer("rms", kind="rms", axis=[-2, -1]).config().axis == (-2, -1)


def test_unknown_layer(store):
    with pytest.raises(LayerNotFound, match="no layer named 'nope'"):
        store.layer("nope")
    with pytest.raises(LayerNotFound):
        store.update_many({"nope": np_moments(np.ones((2, 2)), axes=[0])})
    with pytest.raises(LayerNotFound):
        store.delete_layer("nope")


def test_list_layers_by_prefix_and_pages(store):
    names = ["a", "enc/bn1", "enc/bn2", "enc/block/bn", "encoder", "z.y"]
    for n in reversed(names):
        store.create_layer(n)
    assert store.list_layers() == sorted(names)
    assert store.list_layers("enc/") == ["enc/block/bn", "enc/bn1", "enc/bn2"]
    assert store.list_layers("enc") == ["enc/block/bn", "enc/bn1", "enc/bn2", "encoder"]
    assert store.list_layers("x") == []
    pages, after = [], None
    while True:
        page = store.list_layers(limit=4, after=after)
        if not page:
            break
        pages.append(page)
        after = page[-1]
    assert pages == [sorted(names)[:4], sorted(names)[4:]]
    with pytest.raises(InvalidArgument):
        store.list_layers(limit=0)


def test_delete(store):
    layer = store.create_layer("bn", momentum=0.5)
    layer.update(np_moments(np.ones((2, 3)), axes=[0]), request_id="r1")
    store.delete_layer("bn")
    assert store.list_layers() == []
    with pytest.raises(LayerNotFound):
        layer.stats()
    with pytest.raises(LayerNotFound):
        layer.update(np_moments(np.ones((2, 3)), axes=[0]))
    # a new layer under the name starts afresh: new config, version 0, no remembered request ids
    again = store.create_layer("bn", momentum=0.9)
    assert again.stats().version == 0 and again.config().momentum == 0.9
    assert again.update(np_moments(np.ones((2, 3)), axes=[0]), request_id="r1").version == 1


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


def _values(mean, variance=None, count=10.0, num_batches=2) -> RunningStats:
    mean = np.asarray(mean, dtype=np.float64)
    return RunningStats(mean, np.ones_like(mean) if variance is None else np.asarray(variance), count, num_batches)


def test_put_stats_writes_the_values_as_they_are(store, rng):
    bn = store.create_layer("bn", convention="torch", momentum=0.01)
    bn.update(batch_moments(rng, c=3))
    bn.freeze()
    out = store.put_stats({"bn": _values([1.0, 2.0, 3.0], [0.5, 0.25, 2.0], 96.0, 7)})
    s = bn.stats()
    assert out == {"bn": s}
    assert (s.mean.tolist(), s.variance.tolist(), s.count, s.num_batches) == ([1, 2, 3], [0.5, 0.25, 2], 96.0, 7)
    assert (s.version, s.frozen, bn.config().momentum) == (3, True, 0.01)  # one version; flag and config kept


def test_put_stats_creates_missing_layers(store):
    store.create_layer("old", momentum=0.5)
    configs = {"old": {"convention": "torch"}, "new": {"convention": "torch", "axis": 1},
               "gn": LayerConfig("group", -1, 2, 1e-3, 0.99, "keras", True, True, (2,)), "lazy": {}}
    out = store.put_stats({"new": _values([1.0, 2.0]), "old": _values([3.0]), "gn": _values([0.0, 1.0])},
                          create=configs)
    assert sorted(out) == store.list_layers() == ["gn", "lazy", "new", "old"]
    assert store.layer("old").config().momentum == 0.5  # an existing layer keeps its config
    new = store.layer("new")
    assert (new.config().convention, new.config().axis, new.stats().version) == ("torch", 1, 1)
    assert store.layer("lazy").stats().version == 0 and out["lazy"].mean.shape == ()


@pytest.mark.parametrize("spoiler, field", [
    ({"stats": {"old": _values([1.0, 2.0])}}, "stats.mean"),  # the layer keeps shape (3,)
    ({"stats": {"new": _values([[1.0]])}}, "stats.mean"),  # rank 2 for a rank-1 layer
    ({"stats": {"gn": _values([1.0, 2.0, 3.0])}}, "stats.mean"),  # 4 groups declared
    ({"stats": {"new": _values([1.0, np.inf])}}, "stats.mean"),
    ({"create": {"bad": {"momentum": 7}}}, "momentum"),
    ({"create": {"bad name": {}}}, "name"),
    ({"stats": {"nope": _values([1.0])}}, None),  # not created: LayerNotFound
])
def test_put_stats_is_all_or_nothing(store, assert_unchanged, rng, spoiler, field):
    store.create_layer("old").update(batch_moments(rng, c=3))
    stats = {"old": _values([1.0, 2.0, 3.0]), "new": _values([1.0, 2.0]), **spoiler.get("stats", {})}
    create = {"new": {}, "gn": {"kind": "group", "groups": 4}, **spoiler.get("create", {})}
    expected = LayerNotFound if field is None else InvalidArgument
    with assert_unchanged(store), pytest.raises(expected) as info:
        store.put_stats(stats, create=create, request_id="r")
    assert info.value.field == field
    assert store.list_layers() == ["old"]


def test_put_stats_request_id_applies_once(store):
    store.create_layer("bn")
    store.put_stats({"bn": _values([1.0])}, create={"new": {}}, request_id="r")
    again = store.put_stats({"bn": _values([1.0])}, create={"new": {}}, request_id="r")
    assert again["bn"].mean.tolist() == [1.0] and again["bn"].version == 1
    with pytest.raises(AlreadyExists, match="request_id 'r'"):  # the same id for other values
        store.put_stats({"bn": _values([5.0])}, create={"new": {}}, request_id="r")


def test_put_stats_argument_checks(store):
    with pytest.raises(InvalidArgument, match="mapping") as info:
        store.put_stats([("bn", _values([1.0]))])
    assert info.value.field == "stats"
    with pytest.raises(InvalidArgument) as info:
        store.put_stats({}, create=[("bn", {})])
    assert info.value.field == "create"
    with pytest.raises(InvalidArgument) as info:
        store.put_stats({}, create={"bn": {}}, request_id="")
    assert info.value.field == "request_id"
    assert store.put_stats({}) == {}
