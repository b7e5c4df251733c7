"""Shared fixtures for the whole suite (keep this file small).

``tests/`` goes on sys.path so test modules can ``import reference`` (the
float64 numpy references) without package ``__init__`` files.
"""

import pathlib
import sys
import zlib

import numpy as np
import pytest

_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy Generator seeded from the test id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def start_server():
    """Factory: ``start_server(store="memory://", **serve_kwargs)`` -> a real in-process
    server on 127.0.0.1, port 0; every server is stopped at teardown."""
    from normsvc.server import serve

    servers = []

    def start(store="memory://", **kwargs):
        kwargs.setdefault("watch_poll", 0.5)
        server = serve(store, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(grace=0)
