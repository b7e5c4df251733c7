"""LayerConfig: the defaults each convention resolves, the checks of every argument, the dict round trip."""

import pytest

import normsvc
from normsvc.store import InvalidArgument, LayerConfig, Store


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    """A store on each backend (as tests/store/conftest.py's ``store``)."""
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'stats.db'}"
    with Store.open(url) as s:
        yield s


def test_torch_momentum_none_is_kept(store):
    assert store.create_layer("bn", convention="torch", momentum=None).config().momentum is None


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
    # tf.keras' batch renormalization and virtual batches: batch layers of the keras convention only
    ({"renorm": 1}, "renorm"),
    ({"renorm": True, "convention": "torch"}, "renorm"),
    ({"renorm": True, "kind": "layer"}, "renorm"),
    ({"renorm": True, "renorm_clipping": {"rmax": 3, "r": 1}}, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": [3.0]}, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"rmax": float("inf")}}, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"rmin": 2.0, "rmax": 1.0}}, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, "renorm_clipping"),
    ({"renorm": True, "renorm_momentum": 1.5}, "renorm_momentum"),
    ({"renorm": True, "renorm_momentum": True}, "renorm_momentum"),
    ({"renorm_clipping": {"rmax": 3.0}}, "renorm_clipping"),
    ({"renorm_momentum": 0.9}, "renorm_momentum"),
    ({"virtual_batch_size": 0}, "virtual_batch_size"),
    ({"virtual_batch_size": 2.0}, "virtual_batch_size"),
    ({"virtual_batch_size": 4, "convention": "torch"}, "virtual_batch_size"),
    ({"virtual_batch_size": 4, "kind": "instance"}, "virtual_batch_size"),
])
def test_invalid_configs_name_the_field(store, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        store.create_layer("bn", **kwargs)
    assert info.value.field == field
    assert store.list_layers() == []


def test_config_round_trips_through_a_dict():
    cfg = LayerConfig("batch", (1, 3), None, 1e-5, None, "torch", False, True, (2, 4))
    assert LayerConfig.from_dict(cfg.to_dict()) == cfg


def test_renorm_and_virtual_batch_configs(store):
    cfg = store.create_layer("bn", renorm=True, renorm_clipping={"rmax": 3, "dmax": 5},
                             virtual_batch_size=8).config()
    # tf.keras' defaults: renorm_momentum 0.99, no bound that is not given
    assert (cfg.renorm, cfg.renorm_momentum, cfg.renorm_clipping, cfg.virtual_batch_size) == (
        True, 0.99, {"rmax": 3.0, "dmax": 5.0}, 8)
    assert (cfg.renorm_rmin, cfg.sample_ndim) == (None, 1)  # moments per virtual batch
    assert LayerConfig.from_dict(cfg.to_dict()) == cfg
    # creating it again alike is the same layer; another clipping is another config
    assert store.create_layer("bn", renorm=True, renorm_clipping={"dmax": 5.0, "rmax": 3.0},
                              virtual_batch_size=8).config() == cfg
    with pytest.raises(normsvc.ConfigConflict, match="renorm_dmax is 5.0, not 4.0"):
        store.create_layer("bn", renorm=True, renorm_clipping={"rmax": 3, "dmax": 4}, virtual_batch_size=8)
    # layers without either keep the dict they always had
    assert set(store.create_layer("plain").config().to_dict()) == {
        "kind", "axis", "groups", "epsilon", "momentum", "convention", "center", "scale", "num_features"}
