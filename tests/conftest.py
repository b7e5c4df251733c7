"""Shared fixtures for the whole suite (keep this file small).

``tests/`` goes on sys.path so test modules can ``import reference`` (the
float64 numpy references) without package ``__init__`` files.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import threading
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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (the Debian package) on a free loopback port for the session; yields
    ``new_url()``, which names a fresh namespace (key prefix) of it per call.  Skipped where
    redis-server is not installed, except in CI (CI=true), where .ci/run installs it."""
    import socket
    import time
    import uuid

    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed: .ci/run installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    yield lambda: f"redis://127.0.0.1:{port}/0?prefix=t{uuid.uuid4().hex[:12]}"
    proc.terminate()
    proc.wait(10)


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


def start_process(*args, env=None, timeout=120):
    """``normsvc serve --port 0 *args`` in a subprocess; returns (Popen, address)."""
    exe = shutil.which("normsvc", path=str(pathlib.Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "normsvc.cli"]
    proc = subprocess.Popen([*cmd, "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})
    box = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    line = box[0].strip() if box else ""
    if not line.startswith("normsvc serving on "):
        proc.kill()
        proc.wait(timeout=30)
        raise RuntimeError(f"normsvc serve did not start: {line!r}")
    return proc, line.split()[3]


def stop_process(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def process_address():
    """The address of a ``normsvc serve --port 0 --store memory://`` subprocess (one per module)."""
    proc, address = start_process("--store", "memory://", "--log-level", "WARNING")
    yield address
    stop_process(proc)
