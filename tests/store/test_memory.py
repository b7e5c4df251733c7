"""normsvc/store/memory.py: what ``memory://`` URLs and options it takes (and how it refuses the
rest), the ``request_window`` option, and records handed out that share no arrays with the store."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from normsvc import Moments, Store
from normsvc.config import make_config
from normsvc.errors import InvalidArgument
from normsvc.store.memory import MemoryBackend
from normsvc.store.records import new_record


@pytest.mark.parametrize("url", ["memory://", "memory:///"])
def test_plain_urls_open_an_empty_backend(url):
    backend = MemoryBackend.from_url(url)
    assert isinstance(backend, MemoryBackend)
    assert backend.names() == [] and backend.request_window == 1024


@pytest.mark.parametrize("url", ["memory://host", "memory://host:5", "memory://user@host", "memory:///stats",
                                 "memory://host/stats.db", "memory:///a/b"])
def test_hosts_and_paths_are_refused_naming_the_url(url):
    with pytest.raises(InvalidArgument) as info:
        MemoryBackend.from_url(url)
    assert str(info.value) == f"store URL {url!r}: expected just memory://"
    assert info.value.field == "url"
    with pytest.raises(InvalidArgument, match="expected just memory://"):
        Store.open(url)


@pytest.mark.parametrize("url, options, named", [
    ("memory://?durable=1", {}, "['durable']"),
    ("memory://", {"synchronous": "FULL"}, "['synchronous']"),
    ("memory://?durable=1", {"busy_timeout": 5}, "['busy_timeout', 'durable']"),
    ("memory://?request_window=4&durable=1", {}, "['durable']"),
])
def test_unknown_options_are_refused_naming_them(url, options, named):
    with pytest.raises(InvalidArgument) as info:
        MemoryBackend.from_url(url, **options)
    assert str(info.value) == f"unknown options for memory://: {named}: expected request_window"
    assert info.value.field == "url"


def test_request_window_from_the_query_or_a_keyword():
    assert MemoryBackend.from_url("memory://?request_window=5").request_window == 5
    assert MemoryBackend.from_url("memory://", request_window=7).request_window == 7
    # the keyword wins over the query, and the query's value is not an unknown option
    assert MemoryBackend.from_url("memory://?request_window=5", request_window=7).request_window == 7
    assert MemoryBackend(request_window=3).request_window == 3


def test_the_request_window_option_bounds_what_a_layer_remembers():
    x = np.arange(12.0).reshape(4, 3)
    old, other = Moments.from_samples(x), Moments.from_samples(x + 1.0)
    with Store.open("memory://?request_window=2") as store:
        layer = store.create_layer("bn")
        assert layer.update(old, request_id="old").version == 1
        assert layer.update(old, request_id="old").version == 1  # a retry: skipped
        assert layer.update(other).version == 2
        assert layer.update(old, request_id="old").version == 2  # applied at 1, still within the last 2
        assert layer.update(other).version == 3
        assert layer.update(old, request_id="old").version == 4  # forgotten: applied again


def test_each_backend_has_its_own_layers():
    first, second = MemoryBackend.from_url("memory://"), MemoryBackend.from_url("memory://")
    first.insert(new_record("bn", make_config(num_features=3)))
    assert first.names() == ["bn"] and second.names() == [] and second.get("bn") is None


def _bump(record):
    """A pure mutation: one version on, mean + 1."""
    s = record.stats
    return replace(record, stats=replace(s, mean=s.mean + 1.0, version=s.version + 1))


def test_records_handed_out_share_no_arrays_with_the_store():
    backend = MemoryBackend.from_url("memory://")
    given = new_record("bn", make_config(num_features=3))
    inserted = backend.insert(given)
    assert given.stats.mean.shape == (3,) and list(inserted.stats.mean) == [0.0, 0.0, 0.0]
    mutated = backend.mutate(["bn"], _bump, None)["bn"]
    assert list(mutated.stats.mean) == [1.0, 1.0, 1.0] and mutated.stats.version == 1
    first, second = backend.get("bn"), backend.get("bn")
    handed_out = [given, inserted, mutated, first, second, backend.insert(given)]
    for i, a in enumerate(handed_out):
        for b in handed_out[i + 1:]:
            for array in ("mean", "variance"):
                assert not np.shares_memory(getattr(a.stats, array), getattr(b.stats, array))
    # editing any of them in place leaves the stored record as it was
    for record in handed_out:
        record.stats.mean[:] = 99.0
        record.stats.variance[:] = -1.0
    stored = backend.get("bn")
    assert list(stored.stats.mean) == [1.0, 1.0, 1.0] and list(stored.stats.variance) == [1.0, 1.0, 1.0]
    assert stored.stats.version == 1


@pytest.mark.parametrize("value", ["abc", "0", "-3"])
def test_a_bad_request_window_is_refused_naming_it(value):
    with pytest.raises(InvalidArgument, match=f"request_window='{value}'") as info:
        Store.open(f"memory://?request_window={value}")
    assert info.value.field == "url"
