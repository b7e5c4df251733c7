"""A real NormService server on 127.0.0.1 (port 0) and a stub to it; no gRPC mocks."""

from __future__ import annotations

import shutil

import grpc
import pytest

from normsvc._proto import normsvc_pb2_grpc as pb_grpc


@pytest.fixture
def connect():
    """Factory: ``connect(server_or_port, credentials=None, options=())`` -> NormServiceStub (channels closed at teardown)."""
    channels = []

    def make(target, credentials=None, options=(), host="127.0.0.1"):
        port = target if isinstance(target, int) else target.port
        address = f"{host}:{port}"
        channel = (grpc.secure_channel(address, credentials, options=options) if credentials is not None
                   else grpc.insecure_channel(address, options=options))
        channels.append(channel)
        stub = pb_grpc.NormServiceStub(channel)
        stub.channel = channel
        return stub

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture(params=["memory", "sqlite"])
def server(request, start_server, tmp_path):
    """A server over the memory store and one over a sqlite file."""
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'stats.db'}"
    return start_server(url)


@pytest.fixture
def memory_server(start_server):
    return start_server("memory://")


@pytest.fixture
def stub(server, connect):
    return connect(server)


@pytest.fixture
def mstub(memory_server, connect):
    """A stub to a memory-store server (for tests that do not depend on the backend)."""
    return connect(memory_server)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Certificates (``server_util.make_pki``): a CA, a server and a client certificate; skips without openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    from server_util import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))
