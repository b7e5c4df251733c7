"""Test helpers for code that uses normsvc: a real server in-process, and float64 references.

Nothing here mocks gRPC: :func:`running_server` starts the real service on a
free loopback port (port 0) and stops it afterwards, so a user's tests talk
to normsvc exactly as production code does.  With pytest, load the fixtures
with ``pytest_plugins = ["normsvc.testing"]`` in a ``conftest.py``:

``normsvc_server``
    a server over a fresh ``memory://`` store (one per test);
``normsvc_client``
    a :class:`~normsvc.Client` connected to it.

Examples
--------
>>> import numpy as np
>>> from normsvc import Client
>>> with running_server() as server, Client(server.address) as client:
...     bn = client.create_layer("bn", num_features=2)
...     stats = bn.update(reference_moments(np.array([[1.0, 2.0], [3.0, 6.0]]), axes=0))
>>> stats.version
1

:func:`reference_moments` is the plain float64 numpy answer (two-pass mean
and sum of squared deviations), independent of the kernels: compare what
normsvc computes with it.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .moments import Moments

__all__ = ["running_server", "reference_moments", "normsvc_server", "normsvc_client"]


@contextlib.contextmanager
def running_server(store="memory://", **serve_kwargs):
    """A real normsvc server on 127.0.0.1 (a free port) for the ``with`` block.

    Parameters
    ----------
    store : str or Store
        As :func:`normsvc.server.serve` takes it (default: a fresh memory store).
    **serve_kwargs
        Any other argument of :func:`normsvc.server.serve` (tokens, TLS,
        limits, ...); ``host`` and ``port`` default to 127.0.0.1 and 0.

    Yields
    ------
    normsvc.server.Server
        ``address`` is what a :class:`~normsvc.Client` connects to.
    """
    from .server import serve

    serve_kwargs.setdefault("watch_poll", 0.5)
    server = serve(store, **serve_kwargs)
    try:
        yield server
    finally:
        server.stop(grace=0)


def reference_moments(x, axes) -> Moments:
    """Moments of ``x`` over ``axes`` computed with plain numpy in float64 (two passes).

    ``axes`` is an int or a list of ints; the count is the number of values
    reduced per statistic.
    """
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(int(a) % x.ndim for a in np.atleast_1d(axes).tolist())
    mean = x.mean(axis=axes, keepdims=True)
    m2 = ((x - mean) ** 2).sum(axis=axes)
    count = np.float64(np.prod([x.shape[a] for a in axes]))
    return Moments(count, mean.squeeze(axis=axes), m2)


try:  # the pytest fixtures, for users who load this module as a plugin
    import pytest
except ImportError:  # pragma: no cover - pytest is a test dependency
    pytest = None

if pytest is not None:

    @pytest.fixture
    def normsvc_server():
        """A real server over a fresh memory store, stopped after the test."""
        with running_server() as server:
            yield server

    @pytest.fixture
    def normsvc_client(normsvc_server):
        """A :class:`~normsvc.Client` connected to :func:`normsvc_server`."""
        from . import Client

        with Client(normsvc_server.address) as client:
            yield client
