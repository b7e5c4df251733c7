"""Fixtures for the store tests: every test taking ``store`` runs on each backend."""

import pathlib
import sys

import pytest

from normsvc import Store

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_url(request, tmp_path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "redis":
        return request.getfixturevalue("redis_server")()
    return f"sqlite:///{tmp_path / 'stats.db'}"


@pytest.fixture
def store(store_url):
    s = Store.open(store_url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'stats.db'}"


def snapshot(store) -> dict:
    """Everything observable about every layer: config and statistics (version, timestamps included)."""
    out = {}
    for name in store.list_layers():
        layer = store.layer(name)
        s = layer.stats()
        out[name] = (layer.config(), s.mean.tolist(), s.variance.tolist(), s.count, s.num_batches,
                     s.version, s.frozen, s.updated_at)
    return out


@pytest.fixture
def assert_unchanged():
    """``with assert_unchanged(store): ...``: the block leaves every layer exactly as it was."""

    class _Guard:
        def __init__(self, store):
            self.store = store

        def __enter__(self):
            self.before = snapshot(self.store)

        def __exit__(self, *exc):
            assert snapshot(self.store) == self.before
            return False

    return _Guard

