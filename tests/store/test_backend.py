"""The backend contract, on every backend: URLs, request ids and their window, atomic mutate (with creates),
records that never alias the stored state."""

from dataclasses import replace

import numpy as np
import pytest

from normsvc import Store
from normsvc.errors import AlreadyExists
from normsvc.store import InvalidArgument, LayerNotFound
from normsvc.config import make_config
from normsvc.store.records import new_record
from store_testing import batch_moments


@pytest.mark.parametrize("url", ["redis2://x", "postgres://db", "memory://host", "sqlite://host/x.db",
                                 "sqlite:///:memory:", "nothing"])
def test_bad_urls(url):
    with pytest.raises(InvalidArgument) as info:
        Store.open(url)
    assert info.value.field == "url"


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


def test_a_request_id_is_bound_to_its_content(store, assert_unchanged, rng):
    # an idempotency key: the same id with the same content is a retry, with other content an error
    a, _, _ = (store.create_layer(n) for n in "abc")
    m = {"a": batch_moments(rng), "b": batch_moments(rng)}
    first = store.update_many(m, request_id="step-1")
    assert store.update_many(m, request_id="step-1") == first  # the retry: nothing changes
    other = {"a": batch_moments(rng), "b": m["b"]}
    for request in (other, {"a": m["a"]}, {**m, "c": m["a"]}):  # other moments, fewer or more layers
        with assert_unchanged(store), pytest.raises(AlreadyExists, match="request_id 'step-1' was used for "
                                                                          "another request") as info:
            store.update_many(request, request_id="step-1")
        assert info.value.reason == "REQUEST_ID_REUSED" and info.value.field == "request_id"
    # the same id for another kind of call is another request too
    with pytest.raises(AlreadyExists, match="request_id 'step-1'"):
        a.freeze(request_id="step-1")
    assert a.freeze(request_id="freeze-1").frozen and a.freeze(request_id="freeze-1").version == 2


def test_request_digests_tell_content_apart():
    from normsvc.moments import Moments
    from normsvc.store.validation import DIGEST_VERSION, request_digest

    a = Moments(np.float64(4), np.arange(6.0), np.ones(6))
    digest = request_digest("update", None, {"x": a})
    assert len(digest) == 17 and digest.startswith(DIGEST_VERSION)
    assert request_digest("update", None, {"x": Moments(a.count.copy(), a.mean.copy(), a.m2.copy())}) == digest
    others = [{"x": Moments(a.count, a.mean.reshape(2, 3), a.m2.reshape(2, 3))},  # shape
              {"x": Moments(a.count, np.nextafter(a.mean, 9), a.m2)},  # one ulp
              {"x": Moments(a.count + 1, a.mean, a.m2)},
              {"y": a}, {"x": a, "y": a}]
    assert digest not in {request_digest("update", None, o) for o in others}
    assert request_digest("freeze", None, {}) != request_digest("reset", None, {})


def test_request_digests_are_stable_across_versions():
    """A sqlite or redis store remembers digests across restarts and upgrades: the same content
    must keep the same digest (values recorded with normsvc of 2026-11-26, commit b0ab078)."""
    from normsvc.moments import Moments
    from normsvc.store.steps import StepKey
    from normsvc.store.validation import request_digest

    a = Moments(np.float64(4.0), np.array([1.0, -2.5, 3.25]), np.array([0.5, 1.5, 2.0]))
    b = Moments(np.array([[2.0, 3.0]]), np.array([[0.0, 1.0]]), np.array([[1.0, 4.0]]))
    assert request_digest("update", StepKey("run-1", 7, 2, 4), {"bn/b": b, "bn/a": a}).hex() \
        == "02566cb0fbefe292f36af8315e9732136d"
    assert request_digest("update", None, {"x": a}).hex() == "0249ede501796edc13d58d391c7fee2bad"
    # a count given as a 0-d array digests as the scalar does
    assert request_digest("update", None, {"x": Moments(np.array(4.0), a.mean, a.m2)}).hex() \
        == "0249ede501796edc13d58d391c7fee2bad"
    put = {"x": (np.array([1.0, 2.0]), np.array([3.0, 4.0]), 5.0, 6)}
    assert request_digest("put", None, put).hex() == "0232d14423690eb8be4457d103e00801e9"


def test_ids_remembered_with_an_older_digest_count_as_retries():
    from normsvc.store.backend import is_retry

    new = b"\x02" + bytes(16)
    assert is_retry("bn", "r", bytes(range(16)), new)  # an older normsvc's blake2b: unknown, as before
    assert is_retry("bn", "r", None, new) and is_retry("bn", "r", new, new)
    with pytest.raises(AlreadyExists, match="request_id 'r'"):
        is_retry("bn", "r", b"\x02" + bytes(range(16)), new)


def test_request_window_is_bounded(store_url, rng):
    with Store.open(store_url, request_window=3) as store:
        layer = store.create_layer("bn")
        old = batch_moments(rng)
        layer.update(old, request_id="old")
        layer.update(old, request_id="old")
        assert layer.stats().version == 1
        for _ in range(2):
            layer.update(batch_moments(rng))
        assert layer.update(old, request_id="old").version == 3  # still remembered
        layer.update(batch_moments(rng))
        assert layer.update(old, request_id="old").version == 5  # forgotten: applied again


def test_returned_arrays_do_not_alias_the_store(store, rng):
    layer = store.create_layer("bn")
    s = layer.update(batch_moments(rng, c=3))
    s.mean[:] = 99.0
    s.variance[:] = -1.0
    assert np.all(layer.stats().mean != 99.0) and np.all(layer.stats().variance > 0)


def _bump(record):
    """A pure mutation: one version on, mean + 1."""
    s = record.stats
    return replace(record, stats=replace(s, mean=s.mean + 1.0, version=s.version + 1))


def test_require(store):
    store.create_layer("bn")
    assert store.backend.require("bn").name == "bn"
    with pytest.raises(LayerNotFound, match="no layer named 'nope'") as info:
        store.backend.require("nope")
    assert info.value.layer == "nope"


def test_mutate_creates_missing_layers_in_the_same_transaction(store, assert_unchanged):
    store.create_layer("old", num_features=2)
    backend = store.backend
    create = {n: new_record(n, make_config(num_features=2)) for n in ("new1", "new2", "old")}

    def failing(record):
        if record.name == "new2":
            raise InvalidArgument("no", layer="new2")
        return _bump(record)

    with assert_unchanged(store), pytest.raises(InvalidArgument):
        backend.mutate(["old", "new1", "new2"], failing, "r", create=create)
    with assert_unchanged(store), pytest.raises(LayerNotFound) as info:
        backend.mutate(["old", "new1", "nope"], _bump, None, create=create)
    assert info.value.layer == "nope"

    out = backend.mutate(["old", "new1", "new2"], _bump, "r", create=create)
    assert store.list_layers() == ["new1", "new2", "old"]
    for name in out:
        assert out[name].stats.version == 1 and list(out[name].stats.mean) == [1.0, 1.0]
        assert backend.get(name) == out[name]
    # the request id was remembered for the created layers too; an existing layer keeps its record
    again = backend.mutate(["old", "new1", "new2"], _bump, "r", create=create)
    assert all(again[n].stats.version == 1 for n in again)


def test_a_created_layer_that_fn_leaves_alone_stays_at_version_0(store):
    out = store.backend.mutate(["lazy"], lambda r: None, "r", create={"lazy": new_record("lazy", make_config())})
    assert out["lazy"].stats.version == 0 and store.layer("lazy").stats().version == 0
    # nothing was applied, so nothing was remembered: the id still applies
    assert store.backend.mutate(["lazy"], _bump, "r")["lazy"].stats.version == 1
