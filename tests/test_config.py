"""LayerConfig: the defaults each convention resolves, the checks of every argument, the dict round trip."""

import pytest

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
])
def test_invalid_configs_name_the_field(store, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        store.create_layer("bn", **kwargs)
    assert info.value.field == field
    assert store.list_layers() == []


def test_config_round_trips_through_a_dict():
    cfg = LayerConfig("batch", (1, 3), None, 1e-5, None, "torch", False, True, (2, 4))
    assert LayerConfig.from_dict(cfg.to_dict()) == cfg
