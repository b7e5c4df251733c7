"""Prometheus metrics of one server (its own registry, so several servers can live in one process).

=====================================  =========  =======================
metric                                 type       labels
=====================================  =========  =======================
normsvc_rpc_requests_total             counter    method, code
normsvc_rpc_latency_seconds            histogram  method
normsvc_rpc_in_flight                  gauge      method
normsvc_layer_updates_total            counter    layer, rpc
normsvc_allreduce_steps_total          counter    outcome
normsvc_steps_closed_incomplete_total  counter
normsvc_streams_open                   gauge
normsvc_stream_bytes_reserved          gauge
=====================================  =========  =======================

``normsvc_layer_updates_total`` counts running-statistics updates per layer
(one per layer per UpdateStats / AllReduceMoments step / Normalize with update;
a step contribution counts when its step is applied).
``normsvc_steps_closed_incomplete_total`` counts (layer, step) pairs closed
before all their ranks came (see :mod:`normsvc.store.steps`).
``normsvc_streams_open`` and ``normsvc_stream_bytes_reserved`` show how much
of ``max_streams`` and ``max_stream_bytes`` is taken (:mod:`.limits`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "normsvc_rpc_requests", "RPCs handled, by method and status code",
            ["method", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            "normsvc_rpc_latency_seconds", "RPC handling time (streams: until the last message)",
            ["method"], buckets=_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "normsvc_rpc_in_flight", "RPCs being handled", ["method"], registry=self.registry,
        )
        self.layer_updates = Counter(
            "normsvc_layer_updates", "Running-statistics updates per layer",
            ["layer", "rpc"], registry=self.registry,
        )
        self.allreduce_steps = Counter(
            "normsvc_allreduce_steps", "AllReduceMoments steps by outcome (completed, timed_out, failed)",
            ["outcome"], registry=self.registry,
        )
        self.steps_closed_incomplete = Counter(
            "normsvc_steps_closed_incomplete", "Training steps of a layer closed before all their ranks came",
            registry=self.registry,
        )
        self.streams_open = Gauge(
            "normsvc_streams_open", "Calls holding a stream slot (streams, ranks waiting in AllReduceMoments)",
            registry=self.registry,
        )
        self.stream_bytes_reserved = Gauge(
            "normsvc_stream_bytes_reserved", "Bytes of NormalizeStream buffers reserved", registry=self.registry,
        )
        self._http = None
        self._outcomes: dict = {}  # outcome -> its child of allreduce_steps

    def allreduce_outcome(self, outcome: str) -> None:
        """Count an AllReduceMoments step by outcome (each step of every rank's call: the child is
        looked up once, since labels() validates and locks)."""
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self.allreduce_steps.labels(outcome)
        counter.inc()

    def follow_capacity(self, streams, budget) -> None:
        """Report the slots ``streams`` (StreamSlots) and the bytes ``budget`` (StreamBudget) hold."""
        self.streams_open.set_function(lambda: streams.open)
        self.stream_bytes_reserved.set_function(lambda: budget.used)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics on ``port`` (0: a free one); returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
