"""serve() and `normsvc serve`: health, reflection, metrics, the CLI and its environment, SIGTERM."""

from __future__ import annotations

import signal
import threading
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from server_util import ServerProcess, moments_of, pb, raises_code, update_request

from normsvc import cli, ops
from normsvc.store import Store
from normsvc.wire.tensors import Assembler, chunks

C = grpc.StatusCode


def test_reflection_lets_a_generic_client_list_and_call_the_service(memory_server, connect):
    stub = connect(memory_server)
    db = ProtoReflectionDescriptorDatabase(stub.channel)
    services = set(db.get_services())
    assert {"normsvc.v1.NormService", "grpc.health.v1.Health"} <= services
    # a client that never imported normsvc's stubs: descriptors from reflection, dynamic messages
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("normsvc.v1.NormService")
    method = service.methods_by_name["CreateLayer"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = stub.channel.unary_unary("/normsvc.v1.NormService/CreateLayer",
                                    request_serializer=request_cls.SerializeToString,
                                    response_deserializer=response_cls.FromString)
    response = call(request_cls(name="generic/bn"), timeout=10)
    assert response.layer.name == "generic/bn"
    assert len(service.methods) == 15


def test_health_goes_not_serving_on_shutdown(start_server, connect):
    server = start_server()
    health = health_pb2_grpc.HealthStub(connect(server).channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="normsvc.v1.NormService"), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 1})
    stopper.start()
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    stopper.join(30)
    assert server.wait(0)


def test_metrics_over_http(start_server, connect):
    server = start_server(metrics_port=0)
    stub = connect(server)
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"))
    with raises_code(C.NOT_FOUND):
        stub.GetLayer(pb.GetLayerRequest(names=["nope"]))
    stub.UpdateStats(update_request({"bn": moments_of(np.arange(8.0).reshape(4, 2))}))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'normsvc_rpc_requests_total{code="OK",method="CreateLayer"} 1.0' in text
    assert 'normsvc_rpc_requests_total{code="NOT_FOUND",method="GetLayer"} 1.0' in text
    assert 'normsvc_rpc_latency_seconds_count{method="UpdateStats"} 1.0' in text
    assert 'normsvc_layer_updates_total{layer="bn",rpc="UpdateStats"} 1.0' in text


def test_serve_options_come_from_the_environment(monkeypatch):
    for key, value in {"HOST": "0.0.0.0", "PORT": "0", "STORE": "memory://", "MAX_MESSAGE_MB": "8",
                       "TOKENS": "t.json", "TLS_CERT": "c.pem", "TLS_KEY": "k.pem", "TLS_CLIENT_CA": "ca.pem",
                       "METRICS_PORT": "9100", "DEVICE": "cpu", "GRACE": "3.5"}.items():
        monkeypatch.setenv(f"NORMSVC_{key}", value)
    args = cli.build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.store, args.max_message_mb) == ("0.0.0.0", 0, "memory://", 8)
    assert (args.tokens, args.tls_cert, args.tls_key, args.tls_client_ca) == ("t.json", "c.pem", "k.pem", "ca.pem")
    assert (args.metrics_port, args.device, args.grace) == (9100, "cpu", 3.5)
    flags = cli.build_parser().parse_args(["serve", "--port", "7", "--store", "sqlite:///x.db"])
    assert (flags.port, flags.store) == (7, "sqlite:///x.db")  # a flag wins over its variable
    monkeypatch.setenv("NORMSVC_PORT", "eighty")
    with pytest.raises(SystemExit, match="NORMSVC_PORT"):
        cli.build_parser().parse_args(["serve"])


def test_serve_refuses_bad_options(capsys):
    assert cli.main(["serve", "--port", "0", "--store", "memory://", "--tls-cert", "only-cert.pem"]) == 2
    assert "tls_cert and tls_key go together" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "0", "--store", "nosuch://"]) == 2


def test_subprocess_server_with_port_0_and_the_default_store(tmp_path, connect):
    """`normsvc serve --port 0` prints its port; without --store it keeps a sqlite file in ./.normsvc/."""
    proc = ServerProcess(["--port", "0", "--metrics-port", "0"], cwd=tmp_path)
    try:
        stub = connect(proc.port)
        health = health_pb2_grpc.HealthStub(stub.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING
        stub.CreateLayer(pb.CreateLayerRequest(name="bn"), timeout=30)
        assert "metrics on port" in proc.line
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert (tmp_path / ".normsvc" / "stats.db").exists()
    with Store.open(f"sqlite:///{tmp_path / '.normsvc' / 'stats.db'}") as store:
        assert store.list_layers() == ["bn"]


def test_sigterm_with_calls_in_flight_loses_none(tmp_path, connect, rng):
    """SIGTERM: calls in flight finish (a NormalizeStream held open across it), every acknowledged
    update is in the store, and the process exits 0."""
    db = tmp_path / "stats.db"
    proc = ServerProcess(env={"NORMSVC_PORT": "0", "NORMSVC_STORE": f"sqlite:///{db}", "NORMSVC_GRACE": "30"})
    try:
        stub = connect(proc.port)
        stub.CreateLayer(pb.CreateLayerRequest(name="bn"), timeout=30)
        stub.CreateLayer(pb.CreateLayerRequest(name="ln", config=pb.LayerConfig(kind=pb.LAYER_KIND_LAYER)),
                         timeout=30)
        x = rng.standard_normal((512, 1024), dtype=np.float32)  # 2 MiB in 32 chunks
        parts = list(chunks(x, 64 * 1024))
        half_sent, release = threading.Event(), threading.Event()

        def requests():
            yield pb.NormalizeStreamRequest(header=pb.NormalizeStreamHeader(
                layer="ln", dtype=pb.DTYPE_FLOAT32, shape=x.shape, mode=pb.MODE_TRAINING))
            for i, part in enumerate(parts):
                if i == len(parts) // 2:
                    half_sent.set()
                    release.wait(60)
                yield pb.NormalizeStreamRequest(chunk=part)

        stream_result = {}

        def held_open():
            try:
                responses = iter(connect(proc.port).NormalizeStream(requests(), timeout=90))
                first = next(responses)
                y = Assembler(first.result.dtype, first.result.shape, field="y")
                for msg in responses:
                    y.add(msg.chunk)
                stream_result["y"] = y.array()
            except grpc.RpcError as exc:
                stream_result["error"] = exc

        acked = [0] * 6
        stop_errors = []

        def writer(k):
            mine = connect(proc.port)
            request = update_request({"bn": moments_of(rng.normal(size=(8, 4)))})
            for _ in range(5000):  # until the server refuses new calls
                try:
                    mine.UpdateStats(request, timeout=30)
                except grpc.RpcError as exc:
                    stop_errors.append(exc.code())
                    return
                acked[k] += 1

        streamer = threading.Thread(target=held_open)
        streamer.start()
        assert half_sent.wait(60)
        writers = [threading.Thread(target=writer, args=(k,)) for k in range(len(acked))]
        for t in writers:
            t.start()
        pause = threading.Event()
        for _ in range(1200):  # let some updates through, then signal
            if sum(acked) >= 60:
                break
            pause.wait(0.05)
        proc.proc.send_signal(signal.SIGTERM)
        for t in writers:
            t.join(60)
        release.set()  # the held-open call finishes after the signal
        streamer.join(90)
        assert proc.proc.wait(timeout=60) == 0
    finally:
        release.set()
        proc.kill()
    assert "error" not in stream_result, stream_result.get("error")
    np.testing.assert_array_equal(stream_result["y"], ops.layer_norm(x, axis=-1, epsilon=1e-3)[0])
    with Store.open(f"sqlite:///{db}") as store:
        # every acknowledged update is there, and no refused one
        assert store.layer("bn").stats().num_batches == sum(acked) >= 60
        assert store.layer("ln").stats().num_batches == 1
    # calls that came after the signal were refused (never started), not failed half-way
    assert len(stop_errors) == len(acked) and set(stop_errors) <= {C.UNAVAILABLE, C.CANCELLED}, stop_errors


def test_device_option():
    from normsvc.server.serve import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_device("tpu")
    if resolve_device("auto") == "cpu":
        with pytest.raises(ValueError, match="device='cuda'"):
            resolve_device("cuda")
