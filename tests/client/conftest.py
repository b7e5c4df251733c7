"""Real servers on 127.0.0.1 for the client tests: in-process (``serve``) and a
``normsvc serve --port 0`` subprocess; no gRPC mocks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest



def start_process(*args, env=None, timeout=120):
    """``normsvc serve --port 0 *args`` in a subprocess; returns (Popen, address)."""
    exe = shutil.which("normsvc", path=str(Path(sys.executable).parent))
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


@pytest.fixture
def server(start_server):
    """An in-process server over a memory store."""
    return start_server()


@pytest.fixture(scope="module")
def process_address():
    """The address of a ``normsvc serve --port 0 --store memory://`` subprocess (one per module)."""
    proc, address = start_process("--store", "memory://", "--log-level", "WARNING")
    yield address
    stop_process(proc)


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
