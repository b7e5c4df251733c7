"""Bearer tokens with roles and layer prefixes; TLS and mutual TLS (certificates made with openssl)."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_util import encode, moments_of, pb, raises_code, read, rich_details, update_request

from normsvc.server.auth import TokenTable

C = grpc.StatusCode

TOKENS = {"tokens": [
    {"name": "reader", "token": "r-token", "role": "read"},
    {"name": "trainer", "token": "w-token", "role": "write", "prefixes": ["team-a/"]},
    {"name": "ops", "token": "a-token", "role": "admin"},
    {"name": "team-admin", "token": "ta-token", "role": "admin", "prefixes": ["team-a/"]},
]}


def auth(token):
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def secured(start_server, connect, tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    server = start_server(tokens=str(path))
    stub = connect(server)
    admin = auth("a-token")
    for name in ("team-a/bn", "team-b/bn"):
        stub.CreateLayer(pb.CreateLayerRequest(name=name), metadata=admin)
    return server, stub


def test_no_or_unknown_token_is_unauthenticated(secured):
    _, stub = secured
    with raises_code(C.UNAUTHENTICATED, "Bearer"):
        stub.GetLayer(pb.GetLayerRequest(names=["team-a/bn"]))
    with raises_code(C.UNAUTHENTICATED, "unknown token"):
        stub.GetLayer(pb.GetLayerRequest(names=["team-a/bn"]), metadata=auth("guess"))
    with raises_code(C.UNAUTHENTICATED):
        stub.GetLayer(pb.GetLayerRequest(names=["team-a/bn"]), metadata=(("authorization", "Basic eDp5"),))


def test_roles_nest_read_write_admin(secured, rng):
    _, stub = secured
    reader, trainer, admin = auth("r-token"), auth("w-token"), auth("a-token")
    m = update_request({"team-a/bn": moments_of(rng.normal(size=(8, 2)))})
    stub.GetLayer(pb.GetLayerRequest(names=["team-a/bn", "team-b/bn"]), metadata=reader)
    stub.ListLayers(pb.ListLayersRequest(), metadata=reader)
    with raises_code(C.PERMISSION_DENIED, "needs role 'write'"):
        stub.UpdateStats(m, metadata=reader)
    stub.UpdateStats(m, metadata=trainer)
    with raises_code(C.PERMISSION_DENIED, "needs role 'admin'"):
        stub.DeleteLayer(pb.DeleteLayerRequest(name="team-a/bn"), metadata=trainer)
    with raises_code(C.PERMISSION_DENIED, "needs role 'admin'"):
        stub.Freeze(pb.FreezeRequest(name="team-a/bn"), metadata=trainer)
    stub.Freeze(pb.FreezeRequest(name="team-a/bn"), metadata=admin)
    # Normalize: inference (or no update) is a read; training with an update is a write
    x = encode(rng.normal(size=(8, 2)))
    stub.Normalize(pb.NormalizeRequest(layer="team-b/bn", x=x, mode=pb.MODE_INFERENCE), metadata=reader)
    stub.Normalize(pb.NormalizeRequest(layer="team-b/bn", x=x, mode=pb.MODE_TRAINING, update=False),
                   metadata=reader)
    with raises_code(C.PERMISSION_DENIED, "needs role 'write'"):
        stub.Normalize(pb.NormalizeRequest(layer="team-b/bn", x=x, mode=pb.MODE_TRAINING), metadata=reader)
    header = pb.NormalizeStreamRequest(header=pb.NormalizeStreamHeader(
        layer="team-b/bn", dtype=pb.DTYPE_FLOAT64, shape=[1, 2], mode=pb.MODE_TRAINING))
    chunk = pb.NormalizeStreamRequest(chunk=np.array([[1.0, 2.0]]).tobytes())
    with raises_code(C.PERMISSION_DENIED, "needs role 'write'"):
        list(stub.NormalizeStream(iter([header, chunk]), metadata=reader))


def test_prefixes_limit_the_layers_a_token_touches(secured, rng):
    _, stub = secured
    trainer, team_admin = auth("w-token"), auth("ta-token")
    m = moments_of(rng.normal(size=(8, 2)))
    with raises_code(C.PERMISSION_DENIED, "'team-b/bn'"):
        stub.UpdateStats(update_request({"team-a/bn": m, "team-b/bn": m}), metadata=trainer)
    with raises_code(C.PERMISSION_DENIED, "team-b/bn"):
        stub.GetLayer(pb.GetLayerRequest(names=["team-b/bn"]), metadata=trainer)
    with raises_code(C.PERMISSION_DENIED, "team-b/new"):
        stub.CreateLayer(pb.CreateLayerRequest(name="team-b/new"), metadata=trainer)
    stub.CreateLayer(pb.CreateLayerRequest(name="team-a/new"), metadata=trainer)
    with raises_code(C.PERMISSION_DENIED, "prefix 'team'"):
        stub.ListLayers(pb.ListLayersRequest(prefix="team"), metadata=trainer)
    names = [l.name for l in stub.ListLayers(pb.ListLayersRequest(prefix="team-a/"), metadata=trainer).layers]
    assert names == ["team-a/bn", "team-a/new"]
    with raises_code(C.PERMISSION_DENIED, "every layer"):
        stub.ExportStats(pb.ExportStatsRequest(), metadata=trainer)
    exported = stub.ExportStats(pb.ExportStatsRequest(names=["team-a/bn"]), metadata=trainer)
    with raises_code(C.PERMISSION_DENIED, "every layer"):
        stub.ImportStats(pb.ImportStatsRequest(safetensors=exported.safetensors), metadata=team_admin)
    stub.ImportStats(pb.ImportStatsRequest(safetensors=exported.safetensors, names=["team-a/bn"]),
                     metadata=team_admin)
    with raises_code(C.PERMISSION_DENIED):
        next(stub.WatchLayer(pb.WatchLayerRequest(names=["team-a/bn", "team-b/bn"]), metadata=trainer))
    with raises_code(C.PERMISSION_DENIED):
        stub.AllReduceMoments(pb.AllReduceMomentsRequest(
            world_size=1, moments=[pb.LayerMoments(layer="team-b/bn")]), metadata=trainer)


def test_export_prefix_and_import_add_prefix_are_what_a_token_must_cover(secured):
    _, stub = secured
    trainer, team_admin = auth("w-token"), auth("ta-token")
    exported = stub.ExportStats(pb.ExportStatsRequest(prefix="team-a/", strip_prefix="team-a/"), metadata=trainer)
    assert list(exported.layers) == ["team-a/bn"]
    with raises_code(C.PERMISSION_DENIED, "prefix 'team-b/'"):
        stub.ExportStats(pb.ExportStatsRequest(prefix="team-b/"), metadata=trainer)
    # the file names "bn": the layers an import writes are add_prefix + the file's names
    with raises_code(C.PERMISSION_DENIED, "every layer"):
        stub.ImportStats(pb.ImportStatsRequest(safetensors=exported.safetensors), metadata=team_admin)
    with raises_code(C.PERMISSION_DENIED, "'team-b/bn'"):
        stub.ImportStats(pb.ImportStatsRequest(safetensors=exported.safetensors, names=["bn"],
                                               add_prefix="team-b/"), metadata=team_admin)
    imported = stub.ImportStats(pb.ImportStatsRequest(safetensors=exported.safetensors, add_prefix="team-a/copy/"),
                                metadata=team_admin)
    assert list(imported.layers) == ["team-a/copy/bn"]
    imported = stub.ImportStats(pb.ImportStatsRequest(safetensors=exported.safetensors, names=["bn"],
                                                      add_prefix="team-a/"), metadata=team_admin)
    assert list(imported.layers) == ["team-a/bn"]


@pytest.mark.parametrize("name", ["team-a/../team-b/x", "team-a/./x", "team-a/..", "team-a/x/../../team-b/bn"])
def test_a_prefix_ending_with_a_slash_is_a_namespace_no_name_escapes(secured, name):
    _, stub = secured
    trainer, admin = auth("w-token"), auth("a-token")  # trainer: write under "team-a/"
    with raises_code(C.INVALID_ARGUMENT, "'..'") as info:
        stub.CreateLayer(pb.CreateLayerRequest(name=name), metadata=trainer)
    assert rich_details(info.value)["BadRequest"].field_violations[0].field == "name"
    exported = stub.ExportStats(pb.ExportStatsRequest(prefix="team-a/", strip_prefix="team-a/"), metadata=admin)
    with raises_code(C.INVALID_ARGUMENT, "is not valid") as info:  # "bn" under add_prefix name + "/"
        stub.ImportStats(pb.ImportStatsRequest(safetensors=exported.safetensors, add_prefix=name + "/"),
                         metadata=admin)
    assert rich_details(info.value)["BadRequest"].field_violations[0].field == "add_prefix"
    names = [layer.name for layer in stub.ListLayers(pb.ListLayersRequest(), metadata=admin).layers]
    assert names == ["team-a/bn", "team-b/bn"]
    stub.CreateLayer(pb.CreateLayerRequest(name="team-a/..x/bn"), metadata=trainer)  # dots inside a part are fine


def test_tokens_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    for doc, message in (
        ("not json", "not JSON"),
        ('{"tokens": [{"token": "x", "role": "root"}]}', "role 'root'"),
        ('{"tokens": [{"role": "read"}]}', "non-empty string 'token'"),
        ('{"tokens": [{"token": "x", "role": "read", "prefixes": "a/"}]}', "prefixes"),
        ('{"tokens": [{"token": "x", "role": "read", "prefixes": ["../"]}]}', "prefix '../' begins no valid"),
        ('{"tokens": [{"token": "x", "role": "read", "prefixes": ["/team/"]}]}', "prefix '/team/'"),
        ('{"tokens": [{"token": "x", "role": "read", "prefixes": ["team//"]}]}', "prefix 'team//'"),
        ('{"tokens": [{"token": "x", "role": "read", "prefixes": ["team/./"]}]}', "prefix 'team/./'"),
        ('{"tokens": [{"token": "x", "role": "read"}, {"token": "x", "role": "admin"}]}', "twice"),
        ('[]', "expected"),
    ):
        bad.write_text(doc)
        with pytest.raises(ValueError, match=message):
            TokenTable.load(bad)


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _health(stub):
    return health_pb2_grpc.HealthStub(stub.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


@needs_openssl
def test_tls(start_server, connect, pki):
    server = start_server(tls_cert=pki["server"], tls_key=pki["server_key"])
    assert server.tls == "tls"
    creds = grpc.ssl_channel_credentials(root_certificates=read(pki["ca"]))
    stub = connect(server, credentials=creds, host="localhost")
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), timeout=10)
    assert _health(stub) == health_pb2.HealthCheckResponse.SERVING
    with raises_code(C.UNAVAILABLE):  # plaintext to a TLS port
        connect(server).GetLayer(pb.GetLayerRequest(names=["bn"]), timeout=5)
    wrong_ca = grpc.ssl_channel_credentials(root_certificates=read(pki["otherca"]))
    with raises_code(C.UNAVAILABLE):
        connect(server, credentials=wrong_ca, host="localhost").GetLayer(pb.GetLayerRequest(names=["bn"]), timeout=5)


@needs_openssl
def test_mutual_tls(start_server, connect, pki, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    server = start_server(tls_cert=pki["server"], tls_key=pki["server_key"], tls_client_ca=pki["ca"],
                          tokens=str(tokens))
    assert server.tls == "mtls"
    root = read(pki["ca"])
    good = grpc.ssl_channel_credentials(root, private_key=read(pki["client_key"]), certificate_chain=read(pki["client"]))
    stub = connect(server, credentials=good, host="localhost")
    stub.CreateLayer(pb.CreateLayerRequest(name="bn"), metadata=auth("a-token"), timeout=10)
    with raises_code(C.UNAUTHENTICATED):  # a client certificate and a token are both needed
        stub.GetLayer(pb.GetLayerRequest(names=["bn"]), timeout=10)
    no_cert = grpc.ssl_channel_credentials(root)
    with raises_code(C.UNAVAILABLE):
        connect(server, credentials=no_cert, host="localhost").GetLayer(
            pb.GetLayerRequest(names=["bn"]), metadata=auth("a-token"), timeout=5)
    intruder = grpc.ssl_channel_credentials(root, private_key=read(pki["intruder_key"]),
                                            certificate_chain=read(pki["intruder"]))
    with raises_code(C.UNAVAILABLE):
        connect(server, credentials=intruder, host="localhost").GetLayer(
            pb.GetLayerRequest(names=["bn"]), metadata=auth("a-token"), timeout=5)


def test_tls_arguments_are_checked(start_server, pki):
    with pytest.raises(ValueError, match="together"):
        start_server(tls_cert=pki["server"])
    with pytest.raises(ValueError, match="mutual TLS"):
        start_server(tls_client_ca=pki["ca"])
