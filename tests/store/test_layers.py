"""Layer lifecycle: create (idempotent, conflicts, validation), names, listing, delete; URLs and errors."""

import numpy as np
import pytest

import normsvc
from normsvc.store import (
    ConfigConflict,
    FailedPrecondition,
    FrozenLayer,
    InvalidArgument,
    LayerConfig,
    LayerNotFound,
    NoStatistics,
    Store,
    StoreError,
    StoreUnavailable,
)
from store_testing import np_moments


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
    cfg = layer.config
    assert (cfg.momentum, cfg.epsilon, cfg.convention) == (momentum, epsilon, convention)
    assert (cfg.kind, cfg.axis, cfg.center, cfg.scale) == ("batch", -1, True, True)
    s = layer.stats()
    assert (s.count, s.num_batches, s.version, s.frozen) == (0.0, 0, 0, False)
    assert s.mean.shape == ()  # shape learned from the first batch
    assert float(s.variance) == (0.0 if convention == "cumulative" else 1.0)


def test_torch_momentum_none_is_kept(store):
    assert store.create_layer("bn", convention="torch", momentum=None).config.momentum is None


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
    with assert_unchanged(store), pytest.raises(ConfigConflict, match="'bn' exists with config") as info:
        store.create_layer("bn", **{"num_features": 4, **change})
    assert info.value.layer == "bn"


def test_num_features_shapes_up_front(store):
    s = store.create_layer("bn", num_features=5).stats()
    np.testing.assert_array_equal(s.mean, np.zeros(5))
    np.testing.assert_array_equal(s.variance, np.ones(5))
    s = store.create_layer("bn2", axis=[1, 3], num_features=(2, 3)).stats()
    assert s.mean.shape == (2, 3)
    assert store.create_layer("gn", kind="group", groups=4).stats().mean.shape == (4,)
    assert store.create_layer("gn-default", kind="group").config.groups == 32
    assert store.create_layer("ln", kind="layer").stats().mean.shape == ()
    assert store.create_layer("rms", kind="rms", axis=[-2, -1]).config.axis == (-2, -1)


@pytest.mark.parametrize("name", ["bn", "a/b/c", "layer1.0.bn1", "x-y_z.9", "B" * 256, "model/block.1/bn-2"])
def test_valid_names(store, name):
    store.create_layer(name)
    assert store.layer(name).name == name


@pytest.mark.parametrize("name", ["", "B" * 257, "a b", "a//b", "/a", "a/", "caf\u00e9", "a\nb", "a:b", "a*", 5, None])
def test_invalid_names(store, name):
    with pytest.raises(InvalidArgument) as info:
        store.create_layer(name)
    assert info.value.field == "name"
    assert store.list_layers() == []


@pytest.mark.parametrize("kwargs, field", [
    ({"kind": "weight"}, "kind"),
    ({"convention": "tf"}, "convention"),
    ({"momentum": 1.5}, "momentum"),
    ({"momentum": -0.1}, "momentum"),
    ({"momentum": "x"}, "momentum"),
    ({"momentum": None}, "momentum"),  # keras has no cumulative average
    ({"convention": "cumulative", "momentum": 0.9}, "momentum"),
    ({"epsilon": -1.0}, "epsilon"),
    ({"epsilon": float("nan")}, "epsilon"),
    ({"epsilon": "small"}, "epsilon"),
    ({"groups": 4}, "groups"),
    ({"kind": "group", "groups": 0}, "groups"),
    ({"kind": "group", "groups": 2.5}, "groups"),
    ({"kind": "instance", "axis": 0}, "axis"),
    ({"kind": "instance", "axis": [1, 2]}, "axis"),
    ({"axis": []}, "axis"),
    ({"axis": [1, 1]}, "axis"),
    ({"axis": "last"}, "axis"),
    ({"num_features": 0}, "num_features"),
    ({"num_features": (2, 3)}, "num_features"),
    ({"kind": "group", "groups": 4, "num_features": 8}, "num_features"),
    ({"kind": "layer", "num_features": 3}, "num_features"),
    ({"center": "yes"}, "center"),
    ({"scale": 1}, "scale"),
])
def test_invalid_configs_name_the_field(store, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        store.create_layer("bn", **kwargs)
    assert info.value.field == field
    assert store.list_layers() == []


def test_config_round_trips_through_a_dict():
    cfg = LayerConfig("batch", (1, 3), None, 1e-5, None, "torch", False, True, (2, 4))
    assert LayerConfig.from_dict(cfg.to_dict()) == cfg


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
    assert again.stats().version == 0 and again.config.momentum == 0.9
    assert again.update(np_moments(np.ones((2, 3)), axes=[0]), request_id="r1").version == 1


def test_layer_handles_share_state(store):
    a = store.create_layer("bn")
    b = store.layer("bn")
    a.update(np_moments(np.ones((2, 3)), axes=[0]))
    assert b.stats().version == 1
    assert repr(b) == "Layer('bn')"


def test_sqlite_reopen_keeps_layers(sqlite_url):
    with Store.open(sqlite_url) as s:
        s.create_layer("bn2", axis=[1, 3], num_features=(2, 3), convention="torch", momentum=None)
        s.create_layer("gn", kind="group", groups=2, axis=1)
    with Store.open(sqlite_url) as s:
        assert s.list_layers() == ["bn2", "gn"]
        assert s.layer("bn2").config == LayerConfig("batch", (1, 3), None, 1e-5, None, "torch", True, True, (2, 3))
        assert s.layer("gn").stats().mean.shape == (2,)


@pytest.mark.parametrize("url", ["redis2://x", "postgres://db", "memory://host", "sqlite://host/x.db",
                                 "sqlite:///:memory:", "nothing"])
def test_bad_urls(url):
    with pytest.raises(InvalidArgument) as info:
        Store.open(url)
    assert info.value.field == "url"


def test_sqlite_options(tmp_path):
    with pytest.raises(InvalidArgument, match="unknown sqlite options"):
        Store.open(f"sqlite:///{tmp_path}/a.db?sync=full")
    with pytest.raises(InvalidArgument, match="synchronous"):
        Store.open(f"sqlite:///{tmp_path}/a.db", synchronous="off")
    with pytest.raises(StoreUnavailable):
        Store.open(f"sqlite:///{tmp_path}/missing/dir/a.db")


def test_closed_sqlite_store(sqlite_url):
    s = Store.open(sqlite_url)
    s.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        s.list_layers()
