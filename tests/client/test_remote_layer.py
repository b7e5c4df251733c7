"""normsvc/client/layer.py: the layer handle of both drivers; ``config()`` is a method, and the
old property spelling ``layer.config`` still works with a DeprecationWarning."""

from __future__ import annotations

import asyncio
import warnings

import pytest
from client_util import ok_calls

from normsvc.client import AsyncClient, Client, RemoteLayer
from normsvc.errors import LayerNotFound
from normsvc.config import LayerConfig

pytestmark = pytest.mark.timeout(120)

DEPRECATED = r"RemoteLayer\.config is a method: call config\(\)"


def ours(caught) -> list:
    """The client's warnings among those caught (an in-process server shares the warning filters)."""
    return [w for w in caught if "RemoteLayer" in str(w.message)]


def test_config_is_a_method_without_a_warning(server):
    with Client(server.address) as client:
        bn = client.create_layer("bn", convention="torch", num_features=3)
        before = ok_calls(server, "GetLayer")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = bn.config()
            again = client.layer("bn").config()
    assert ours(caught) == []
    assert isinstance(config, LayerConfig) and config == again
    assert (config.convention, config.epsilon, config.momentum, config.num_features) == ("torch", 1e-5, 0.1, (3,))
    assert ok_calls(server, "GetLayer") == before + 3  # one call per config(), one for layer()


def test_config_property_spelling_works_and_warns(server):
    with Client(server.address) as client:
        bn = client.create_layer("bn", kind="group", groups=4)
        expected = bn.config()
        before = ok_calls(server, "GetLayer")
        value = bn.config  # reading the attribute asks nothing yet
        assert ok_calls(server, "GetLayer") == before
        with pytest.warns(DeprecationWarning, match=DEPRECATED) as record:
            assert value.groups == 4 and value.kind == "group"
        assert len(ours(record)) == 1 and ours(record)[0].filename == __file__  # points at the caller
        assert ok_calls(server, "GetLayer") == before + 1  # one call, then the value is kept
        with pytest.warns(DeprecationWarning, match=DEPRECATED):
            assert bn.config == expected
        with pytest.warns(DeprecationWarning, match=DEPRECATED):
            assert expected == bn.config
        with pytest.warns(DeprecationWarning, match=DEPRECATED):
            assert bn.config != LayerConfig()
        with pytest.warns(DeprecationWarning, match=DEPRECATED):
            assert repr(bn.config) == repr(expected) and str(bn.config) == str(expected)
        with pytest.warns(DeprecationWarning, match=DEPRECATED):
            assert hash(bn.config) == hash(expected)
        with pytest.warns(DeprecationWarning, match=DEPRECATED):
            assert bn.config.to_dict() == expected.to_dict()


def test_config_of_a_deleted_layer_raises_in_both_spellings(server):
    with Client(server.address) as client:
        layer = client.create_layer("gone", num_features=1)
        client.delete_layer("gone")
        with pytest.raises(LayerNotFound):
            layer.config()
        with pytest.warns(DeprecationWarning, match=DEPRECATED), pytest.raises(LayerNotFound):
            layer.config.kind


def test_async_config_method_and_awaited_property(server):
    async def main():
        async with AsyncClient(server.address) as client:
            bn = await client.create_layer("abn", convention="cumulative", num_features=2)
            assert isinstance(bn, RemoteLayer)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                config = await bn.config()
            assert ours(caught) == []
            with pytest.warns(DeprecationWarning, match=DEPRECATED) as record:
                old = await bn.config
            assert ours(record)[0].filename == __file__
            return config, old

    config, old = asyncio.run(asyncio.wait_for(main(), 60))
    assert isinstance(config, LayerConfig) and config.convention == "cumulative"
    assert old == config
