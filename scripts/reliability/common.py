"""What the reliability scripts share: a ``normsvc serve`` subprocess, raw calls, fingerprints, tables.

Everything talks to 127.0.0.1 only.  The server always runs as a separate
process (``python -m normsvc serve --port 0``), so that it can be killed,
signalled and measured (/proc/<pid>/status) like a deployed one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normsvc import Moments
from normsvc._proto import normsvc_pb2 as pb
from normsvc._proto import normsvc_pb2_grpc as pb_grpc
from normsvc.wire.tensors import encode, encode_moments

__all__ = [
    "REPO", "SERVICE", "METHODS", "ServerProcess", "raw_method", "moments_pb", "random_moments", "encode",
    "all_layers", "stats_key", "fingerprint", "healthy", "percentile", "print_table", "machine", "parser",
    "pb", "pb_grpc", "Deadline", "code_name", "make_pki",
]

REPO = Path(__file__).resolve().parents[2]
SERVICE = "normsvc.v1.NormService"
#: method name -> (client streaming, server streaming), from the proto
METHODS = {m.name: (m.client_streaming, m.server_streaming)
           for m in pb.DESCRIPTOR.services_by_name["NormService"].methods}


class ServerProcess:
    """``python -m normsvc serve --port 0 --store STORE ARGS...`` in a subprocess.

    ``address`` and ``port`` come from its first stdout line; stderr is drained
    into ``stderr_tail`` (the last 200 lines).  ``close()`` kills it if it is
    still running; use it as a context manager.
    """

    def __init__(self, store: str, *args: str, env: dict | None = None, start_timeout: float = 120.0):
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        command = [sys.executable, "-m", "normsvc", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--store", store, "--log-level", "WARNING", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=full_env, cwd=str(REPO))
        self.pid = self.proc.pid
        self.stderr_tail = collections.deque(maxlen=200)
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        line = self._first_line(start_timeout)
        if not line.startswith("normsvc serving on "):
            self.close()
            raise RuntimeError(f"server did not start: {line!r}; stderr: {''.join(self.stderr_tail)}")
        self.address = line.split()[3]
        self.port = int(self.address.rsplit(":", 1)[1])
        self.started = time.monotonic()

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_tail.append(line)

    def _first_line(self, timeout: float) -> str:
        box = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return box[0].strip() if box else ""

    def status(self, field: str = "VmRSS") -> int:
        """A field of /proc/<pid>/status in KiB (VmRSS: resident now; VmHWM: its peak); 0 once gone."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def rss_mib(self) -> float:
        return self.status("VmRSS") / 1024

    def kill9(self) -> None:
        """SIGKILL: the process dies at once, wherever it is."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def channel(self, credentials=None, host: str = "127.0.0.1", options=()) -> grpc.Channel:
        target = f"{host}:{self.port}"
        if credentials is not None:
            return grpc.secure_channel(target, credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw_method(channel: grpc.Channel, method: str):
    """NormService ``method`` on ``channel`` with identity serializers: it takes and answers bytes."""
    client_streaming, server_streaming = METHODS[method]
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    return kind[client_streaming, server_streaming](f"/{SERVICE}/{method}")


def moments_pb(count, mean, m2) -> pb.Moments:
    """A Moments message from count, mean and m2 (the sum of squared deviations)."""
    return encode_moments(Moments(np.float64(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64)))


def random_moments(rng: np.random.Generator, features: int, count: float = 16.0) -> pb.Moments:
    return moments_pb(count, rng.normal(size=features), rng.uniform(0.5, 2.0, size=features) * count)


def all_layers(stub, prefix: str = "", *, include_stats: bool = True, metadata=None, timeout: float = 60.0) -> dict:
    """{name: Layer message} of every layer under ``prefix`` (ListLayers, paged by 1000)."""
    out, token = {}, ""
    for _ in range(100_000):
        page = stub.ListLayers(pb.ListLayersRequest(prefix=prefix, page_size=1000, page_token=token,
                                                    include_stats=include_stats), metadata=metadata, timeout=timeout)
        for layer in page.layers:
            out[layer.name] = layer
        token = page.next_page_token
        if not token:
            return out
    raise RuntimeError("ListLayers did not end after 100000 pages")


def stats_key(stats: pb.RunningStats) -> bytes:
    """The statistics without ``updated_at``: equal keys mean the same statistics, bit for bit."""
    copy = pb.RunningStats()
    copy.CopyFrom(stats)
    copy.ClearField("updated_at")
    return copy.SerializeToString(deterministic=True)


def fingerprint(stub, metadata=None) -> bytes:
    """Every layer's name, config and statistics (with updated_at), as one byte string."""
    layers = all_layers(stub, metadata=metadata)
    return b"".join(layers[name].SerializeToString(deterministic=True) for name in sorted(layers))


def healthy(channel: grpc.Channel, timeout: float = 10.0) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def code_name(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    return code.name if code is not None else "NONE"


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


class Deadline:
    """A bound in seconds: ``left()``, ``expired()``."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(self.end - time.monotonic(), 0.0)

    def expired(self) -> bool:
        return time.monotonic() >= self.end


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_table(title: str, headers, rows, file=None) -> str:
    """A Markdown table (paste it into docs/reliability.md); returns the text it printed."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    lines = [f"\n{title}\n", "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text


def machine() -> str:
    """Date, commit, CPU count and model, Python and grpc versions: the line each report starts with."""
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=str(REPO), capture_output=True,
                                text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return (f"{now}; commit {commit}; {os.cpu_count()} CPUs ({model}); Python {platform.python_version()}, "
            f"grpcio {grpc.__version__}; load average {os.getloadavg()[0]:.1f}")


def parser(description: str, *, rounds: int, seconds: float, rounds_help: str, seconds_help: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=rounds, help=f"{rounds_help} (default {rounds})")
    p.add_argument("--seconds", type=float, default=seconds, help=f"{seconds_help} (default {seconds})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return p


def make_pki(folder) -> dict:
    """A CA, server and client certificates and an intruder from another CA (openssl CLI).

    The same helper the server tests use (tests/server/server_util.py).
    """
    tests_server = str(REPO / "tests" / "server")
    if tests_server not in sys.path:
        sys.path.insert(0, tests_server)
    from server_util import make_pki as make

    return make(folder)
