"""Helpers for the client tests: transcript comparison and a flaky gRPC service."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np

from normsvc._proto import normsvc_pb2 as pb
from normsvc.client import Retry
from normsvc.running import RunningStats
from normsvc.config import LayerConfig
from normsvc.wire.packed import pack_stats
from normsvc.wire.tensors import encode

__all__ = ["FAST_RETRY", "assert_same", "ok_calls", "FlakyService"]

FAST_RETRY = Retry(attempts=4, initial_backoff=0.01, max_backoff=0.05)


def assert_same(a, b, where="") -> None:
    if isinstance(a, RunningStats):
        assert isinstance(b, RunningStats), where
        for field in ("count", "num_batches", "version", "frozen"):
            assert getattr(a, field) == getattr(b, field), f"{where}.{field}"
        for field in ("mean", "variance"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None), f"{where}.{field}"
            if x is not None:
                np.testing.assert_allclose(y, x, rtol=1e-12, atol=0, err_msg=f"{where}.{field}")
        return
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and b.dtype == a.dtype and b.shape == a.shape, where
        tol = 1e-3 if a.dtype == np.float16 else 1e-6
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol, err_msg=where)
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k}]")
        return
    if isinstance(a, (list, tuple)) and not isinstance(a, LayerConfig):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
        return
    assert a == b, f"{where}: {a!r} != {b!r}"


def ok_calls(server, method: str) -> float:
    """How many calls of ``method`` an in-process server answered with OK (its metrics)."""
    value = server.metrics.registry.get_sample_value(
        "normsvc_rpc_requests_total", {"method": method, "code": "OK"})
    return value or 0.0


class FlakyService:
    """A real gRPC server for NormService's UpdateStats that fails its first calls."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code, self.request_ids = failures, code, []
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.unary_unary_rpc_method_handler(
            self._update, request_deserializer=pb.UpdateStatsRequest.FromString,
            response_serializer=pb.UpdateStatsResponse.SerializeToString)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("normsvc.v1.NormService", {"UpdateStats": handler})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _update(self, request, context):
        self.request_ids.append(request.request_id)
        if len(self.request_ids) <= self.failures:
            context.abort(self.code, f"failure {len(self.request_ids)}")
        response = pb.UpdateStatsResponse()
        if request.HasField("packed"):  # what the client sends for moments with one count each
            stats = {name: RunningStats(np.zeros(1), np.ones(1), version=1) for name in request.packed.layers}
            pack_stats(stats, response.packed)
        for e in request.updates:
            s = response.stats.add(layer=e.layer).stats
            encode(np.zeros(1), s.mean)
            encode(np.ones(1), s.variance)
            s.version = 1
        return response
