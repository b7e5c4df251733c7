"""Client.export(prefix=, strip_prefix=) and import_(add_prefix=) against a real server, as the Store's."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from normsvc import Moments, Store
from normsvc._proto import normsvc_pb2 as pb
from normsvc.client import Client, operations
from normsvc.errors import InvalidArgument, InvalidType, StoreError

pytestmark = pytest.mark.timeout(120)

MODEL = ["resnet50/block1/bn", "resnet50/bn1"]


def _populate(api):
    rng = np.random.default_rng(3)
    for name in MODEL + ["vgg/bn1"]:
        layer = api.create_layer(name, convention="torch" if "block" in name else "keras")
        for _ in range(2):
            layer.update(Moments.from_samples(rng.normal(1.0, 2.0, size=(5, 3))))


def _outcome(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except StoreError as exc:
        return type(exc), exc.field, exc.layer, str(exc)


@pytest.fixture
def client(server):
    with Client(server.address) as c:
        _populate(c)
        yield c


@pytest.fixture
def store():
    with Store.open("memory://") as s:
        _populate(s)
        yield s


@pytest.mark.parametrize("naming", ["keras", "torch"])
def test_the_client_exports_as_the_store_does(client, store, tmp_path, naming):
    for api in (store, client):
        path = tmp_path / f"{type(api).__name__}.safetensors"
        assert api.export(path, naming=naming, prefix="resnet50/", strip_prefix=True, dtype="float32") == MODEL
    local, remote = load_file(tmp_path / "Store.safetensors"), load_file(tmp_path / "Client.safetensors")
    sep = "/" if naming == "keras" else "."
    leaves = ["moving_mean", "moving_variance"] if naming == "keras" else [
        "running_mean", "running_var", "num_batches_tracked"]
    assert set(remote) == {f"{n}{sep}{leaf}" for n in ("block1/bn", "bn1") for leaf in leaves} == set(local)
    for key, value in local.items():
        np.testing.assert_array_equal(remote[key], value)
    mean = "moving_mean" if naming == "keras" else "running_mean"
    stats = client.layer("resnet50/bn1").stats()
    assert remote[f"bn1{sep}{mean}"].dtype == np.float32
    np.testing.assert_array_equal(remote[f"bn1{sep}{mean}"], stats.mean.astype(np.float32))


def test_round_trip_under_another_namespace(client, tmp_path):
    path = tmp_path / "model.safetensors"
    client.export(path, prefix="resnet50/", strip_prefix="resnet50/", naming="torch")
    assert client.import_(path, naming="torch", add_prefix="copy/") == ["copy/block1/bn", "copy/bn1"]
    assert client.import_(path, naming="torch", layers="bn1", add_prefix="again/") == ["again/bn1"]
    for name in MODEL:
        short = name[len("resnet50/"):]
        original, copy = client.layer(name), client.layer("copy/" + short)
        assert copy.config() == original.config()
        a, b = original.stats(), copy.stats()
        assert (a.mean.tolist(), a.variance.tolist(), a.count, a.num_batches) == (
            b.mean.tolist(), b.variance.tolist(), b.count, b.num_batches)


@pytest.mark.parametrize("kwargs", [
    dict(layers="resnet50/"),
    dict(layers=["vgg/bn1"], prefix="resnet50/"),
    dict(strip_prefix=True),
    dict(prefix="resnet50/", strip_prefix="vgg/"),
    dict(prefix="resnet50", strip_prefix=True),
    dict(prefix=7),
    dict(strip_prefix=3.5),
    dict(prefix="nothing/"),
])
def test_bad_export_arguments_fail_as_the_stores_and_change_nothing(client, store, tmp_path, kwargs):
    before = client.describe(prefix="")
    path = tmp_path / "stats.safetensors"
    expected = _outcome(store.export, path, **kwargs)
    got = _outcome(client.export, path, **kwargs)
    assert isinstance(expected, tuple) and issubclass(expected[0], InvalidArgument) and expected[1]
    assert got == expected
    assert not path.exists()
    assert repr(client.describe(prefix="")) == repr(before)


def test_bad_add_prefix_fails_as_the_stores_and_imports_nothing(client, store, tmp_path):
    path = tmp_path / "model.safetensors"
    store.export(path, prefix="resnet50/", strip_prefix=True)
    names = client.list_layers()
    for add_prefix, cls in (("x//", InvalidArgument), (5, InvalidType)):
        expected, got = _outcome(store.import_, path, add_prefix=add_prefix), _outcome(client.import_, path,
                                                                                        add_prefix=add_prefix)
        assert got[:3] == expected[:3] and got[0] is cls and got[1] == "add_prefix"
    assert "'x//block1/bn' is not valid" in _outcome(client.import_, path, add_prefix="x//")[3]
    assert client.list_layers() == names


def test_the_request_carries_the_prefixes(tmp_path):
    path = tmp_path / "stats.safetensors"
    op = operations.export(path, None, "keras", "float32", "resnet50/", True)
    request = next(op).request
    assert (request.prefix, request.strip_prefix, list(request.names)) == ("resnet50/", "resnet50/", [])
    request = next(operations.export(path, ["a/bn"], "torch", "float64", None, "a/")).request
    assert (request.prefix, request.strip_prefix, list(request.names)) == ("", "a/", ["a/bn"])
    path.write_bytes(b"a file")
    request = next(operations.import_(path, "keras", ["bn1"], "resnet50/")).request
    assert (request.add_prefix, list(request.names), request.safetensors) == ("resnet50/", ["bn1"], b"a file")
    assert isinstance(request, pb.ImportStatsRequest)
