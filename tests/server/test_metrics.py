"""normsvc/server/metrics.py: a real in-process server with ``metrics_port=0``, scraped over HTTP
from 127.0.0.1: every metric of the module docstring is listed, and counters move by exactly one
per call."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_util import entry, moments_of, pb, raises_code, update_request

from normsvc.server import metrics as metrics_module

pytestmark = pytest.mark.timeout(120)

# name: (type, label names) -- the module docstring's table, written out by hand
DOCUMENTED = {
    "normsvc_rpc_requests_total": ("counter", {"method", "code"}),
    "normsvc_rpc_latency_seconds": ("histogram", {"method"}),
    "normsvc_rpc_in_flight": ("gauge", {"method"}),
    "normsvc_layer_updates_total": ("counter", {"layer", "rpc"}),
    "normsvc_allreduce_steps_total": ("counter", {"outcome"}),
    "normsvc_steps_closed_incomplete_total": ("counter", set()),
    "normsvc_streams_open": ("gauge", set()),
    "normsvc_stream_bytes_reserved": ("gauge", set()),
}


def docstring_table() -> dict:
    """The rows of the table in the module docstring: name -> (type, labels)."""
    lines = metrics_module.__doc__.splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=====")]
    rows = {}
    for line in lines[rules[1] + 1:rules[2]]:
        name, kind, *labels = line.replace(",", " ").split()
        rows[name] = (kind, set(labels))
    return rows


def fetch(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def scrape(server) -> dict:
    """{(sample name, frozenset of labels): value} for every sample on the server's /metrics."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(fetch(server)) for s in family.samples}


def value(samples, name, **labels) -> float:
    """A sample's value; a labelled child not created yet counts as 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_the_hand_written_table_is_the_docstring_table():
    assert docstring_table() == DOCUMENTED


def test_every_documented_metric_is_listed(start_server, connect):
    server = start_server(metrics_port=0)
    assert isinstance(server.metrics_port, int) and server.metrics_port > 0
    idle = fetch(server)
    types = {}
    for line in idle.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
    for name, (kind, _) in DOCUMENTED.items():
        assert types.get(name) == kind, name
    samples = scrape(server)
    # the unlabelled gauges have a value before any call: nothing is open or reserved
    assert value(samples, "normsvc_streams_open") == 0.0
    assert value(samples, "normsvc_stream_bytes_reserved") == 0.0
    assert value(samples, "normsvc_steps_closed_incomplete_total") == 0.0
    # once called, the labelled metrics carry exactly their documented labels
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"))
    stub.UpdateStats(update_request({"bn": moments_of(np.arange(8.0).reshape(4, 2))}))
    stub.AllReduceMoments(pb.AllReduceMomentsRequest(group="job", step=0, rank=0, world_size=1,
                                                     moments=[entry("bn", moments_of(np.ones((2, 2))))]))
    seen = {}
    for family in text_string_to_metric_families(fetch(server)):
        for s in family.samples:
            seen.setdefault(s.name, set()).update(set(s.labels) - {"le"})
    for name, (_, labels) in DOCUMENTED.items():
        sample = name + "_count" if DOCUMENTED[name][0] == "histogram" else name  # a histogram's samples
        assert seen[sample] == labels, name


def test_a_counter_moves_by_exactly_one_per_call(start_server, connect):
    server = start_server(metrics_port=0)
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"))
    for n in range(1, 4):
        before = scrape(server)
        stub.ListLayers(pb.ListLayersRequest())
        after = scrape(server)
        ok = dict(method="ListLayers", code="OK")
        assert value(after, "normsvc_rpc_requests_total", **ok) == n
        assert value(after, "normsvc_rpc_requests_total", **ok) - value(before, "normsvc_rpc_requests_total", **ok) == 1
        assert value(after, "normsvc_rpc_latency_seconds_count", method="ListLayers") == n
        assert value(after, "normsvc_rpc_in_flight", method="ListLayers") == 0
        # other methods' counters stay where they were
        assert value(after, "normsvc_rpc_requests_total", method="CreateLayer", code="OK") == 1
    for n in range(1, 3):
        stub.UpdateStats(update_request({"bn": moments_of(np.arange(6.0).reshape(3, 2))}))
        samples = scrape(server)
        assert value(samples, "normsvc_layer_updates_total", layer="bn", rpc="UpdateStats") == n
        assert value(samples, "normsvc_rpc_requests_total", method="UpdateStats", code="OK") == n
    for step in range(2):
        stub.AllReduceMoments(pb.AllReduceMomentsRequest(group="job", step=step, rank=0, world_size=1,
                                                         moments=[entry("bn", moments_of(np.ones((2, 2))))]))
        samples = scrape(server)
        assert value(samples, "normsvc_allreduce_steps_total", outcome="completed") == step + 1
        assert value(samples, "normsvc_layer_updates_total", layer="bn", rpc="AllReduceMoments") == step + 1
    assert value(samples, "normsvc_layer_updates_total", layer="bn", rpc="UpdateStats") == 2


def test_a_failed_call_counts_under_its_code(start_server, connect):
    server = start_server(metrics_port=0)
    stub = connect(server)
    for n in (1, 2):
        with raises_code(grpc.StatusCode.NOT_FOUND):
            stub.GetLayer(pb.GetLayerRequest(names=["missing"]))
        samples = scrape(server)
        assert value(samples, "normsvc_rpc_requests_total", method="GetLayer", code="NOT_FOUND") == n
        assert value(samples, "normsvc_rpc_requests_total", method="GetLayer", code="OK") == 0


def test_each_server_has_its_own_registry(start_server, connect):
    first, second = start_server(metrics_port=0), start_server(metrics_port=0)
    assert first.metrics_port != second.metrics_port
    connect(first).ListLayers(pb.ListLayersRequest())
    assert value(scrape(first), "normsvc_rpc_requests_total", method="ListLayers", code="OK") == 1
    assert value(scrape(second), "normsvc_rpc_requests_total", method="ListLayers", code="OK") == 0


def test_no_port_no_endpoint_but_a_registry(start_server, connect):
    server = start_server()
    assert server.metrics_port is None
    connect(server).ListLayers(pb.ListLayersRequest())
    assert server.metrics.registry.get_sample_value("normsvc_rpc_requests_total",
                                                    {"method": "ListLayers", "code": "OK"}) == 1
