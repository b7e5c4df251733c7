"""Real servers on 127.0.0.1 for the client tests: in-process (``serve``) and a
``normsvc serve --port 0`` subprocess (``process_address``, in tests/conftest.py); no gRPC mocks."""

from __future__ import annotations

import pytest


@pytest.fixture
def server(start_server):
    """An in-process server over a memory store."""
    return start_server()


@pytest.fixture(params=["in-process", "subprocess"])
def target(request):
    """The address of an in-process server, then of a subprocess one."""
    if request.param == "in-process":
        return request.getfixturevalue("server").address
    return request.getfixturevalue("process_address")


@pytest.fixture
def flaky():
    """Factory: ``flaky(failures, code=UNAVAILABLE)`` -> a started :class:`client_util.FlakyService`."""
    from client_util import FlakyService

    services = []

    def make(*args, **kwargs):
        services.append(FlakyService(*args, **kwargs))
        return services[-1]

    yield make
    for service in services:
        service.server.stop(0)
