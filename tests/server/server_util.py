"""Helpers for the server tests: messages from numpy, status assertions, certificates, subprocess servers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from normsvc import Moments
from normsvc._proto import normsvc_pb2 as pb
from normsvc.testing import reference_moments
from normsvc.wire.tensors import decode, encode, encode_moments

__all__ = [
    "pb", "encode", "decode", "moments_of", "entry", "update_request", "raises_code", "rich_details",
    "make_pki", "ServerProcess", "stats_arrays", "wait_until", "create_layer", "allreduce_request",
    "two_batch_norms",
]


def create_layer(stub, name, **config):
    """CreateLayer ``name`` with a LayerConfig of ``config``; the Layer message."""
    return stub.CreateLayer(pb.CreateLayerRequest(name=name, config=pb.LayerConfig(**config))).layer


def two_batch_norms(stub):
    """Layers conv1/bn (keras, momentum 0.9) and conv2/bn (torch) on the server, and the same in an
    in-process memory Store: the reference the server's statistics are checked against (returned)."""
    from normsvc.store import Store

    create_layer(stub, "conv1/bn", momentum=0.9)
    create_layer(stub, "conv2/bn", convention=pb.CONVENTION_TORCH)
    reference = Store.open("memory://")
    reference.create_layer("conv1/bn", momentum=0.9)
    reference.create_layer("conv2/bn", convention="torch")
    return reference


def allreduce_request(step, rank, world_size, layers: dict, group="job", **kw) -> pb.AllReduceMomentsRequest:
    """An AllReduceMomentsRequest of ``layers`` ({name: Moments}); ``kw``: its other fields."""
    return pb.AllReduceMomentsRequest(group=group, step=step, rank=rank, world_size=world_size,
                                      moments=[entry(k, v) for k, v in layers.items()], **kw)


def moments_of(x, axes=(0,)) -> Moments:
    """Reference moments (numpy, float64) of ``x`` over ``axes``."""
    return reference_moments(x, axes)


def entry(layer: str, m: Moments) -> pb.LayerMoments:
    return pb.LayerMoments(layer=layer, moments=encode_moments(m))


def update_request(updates: dict, request_id: str = "") -> pb.UpdateStatsRequest:
    return pb.UpdateStatsRequest(updates=[entry(k, v) for k, v in updates.items()], request_id=request_id)


def stats_arrays(stats: pb.RunningStats):
    return decode(stats.mean, field="mean"), decode(stats.variance, field="variance")


def rich_details(err: grpc.RpcError) -> dict:
    """{detail type name: unpacked message} of a failed call's google.rpc.Status."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    out = {}
    for any_msg in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.ResourceInfo,
                    error_details_pb2.PreconditionFailure, error_details_pb2.QuotaFailure):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out[cls.__name__] = msg
    return out


@contextlib.contextmanager
def raises_code(code: grpc.StatusCode, match: str | None = None):
    """Expect a grpc.RpcError with ``code`` (and ``match`` in its details); yields the excinfo."""
    with pytest.raises(grpc.RpcError) as info:
        yield info
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    if match is not None:
        assert match in err.details(), f"{match!r} not in {err.details()!r}"


def wait_until(predicate, timeout=10.0):
    """Poll ``predicate`` until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- certificates (openssl CLI) ---------------------------------------------

def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder) -> dict:
    """A CA, a server cert for localhost/127.0.0.1, a client cert, and a client cert from another CA."""
    folder = str(folder)
    paths = {}
    for ca in ("ca", "otherca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=normsvc test {ca}", cwd=folder)
    leaves = (("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
              ("client", "ca", "extendedKeyUsage=clientAuth"),
              ("intruder", "otherca", "extendedKeyUsage=clientAuth"))
    for name, ca, ext in leaves:
        with open(os.path.join(folder, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={'localhost' if name == 'server' else name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    for name in ("ca", "otherca", "server", "client", "intruder"):
        paths[name] = os.path.join(folder, f"{name}.pem")
        paths[f"{name}_key"] = os.path.join(folder, f"{name}.key")
    return paths


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- a server in a subprocess -----------------------------------------------

class ServerProcess:
    """``normsvc serve`` in a subprocess; ``port`` is read from its first stdout line."""

    def __init__(self, args=(), env=None, cwd=None):
        full_env = dict(os.environ)
        full_env.update(env or {})
        # the console script next to this interpreter (as installed), else the module
        script = os.path.join(os.path.dirname(sys.executable), "normsvc")
        command = [script] if os.path.exists(script) else [sys.executable, "-m", "normsvc.cli"]
        self.proc = subprocess.Popen(
            [*command, "serve", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=cwd,
        )
        self.stderr_lines = []
        self._stderr = threading.Thread(target=self._drain, daemon=True)
        self._stderr.start()
        line = self._first_line(timeout=120)
        if not line.startswith("normsvc serving on "):
            self.kill()
            raise RuntimeError(f"server did not start: {line!r}; stderr: {''.join(self.stderr_lines)}")
        self.line = line
        self.address = line.split()[3]
        self.port = int(self.address.rsplit(":", 1)[1])

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def _first_line(self, timeout):
        box = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return box[0].strip() if box else ""

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
