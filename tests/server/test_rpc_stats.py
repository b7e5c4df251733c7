"""UpdateStats (many layers per call, all-or-nothing, idempotent), ExportStats/ImportStats, concurrency."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors
from server_util import entry, moments_of, pb, raises_code, rich_details, stats_arrays, update_request

from normsvc import Moments
from normsvc.wire.packed import pack_moments, unpack_stats
from normsvc.store import Store

C = grpc.StatusCode


def create(stub, name, **config):
    return stub.CreateLayer(pb.CreateLayerRequest(name=name, config=pb.LayerConfig(**config))).layer


def test_update_stats_of_many_layers_matches_the_store_in_process(stub, rng):
    """One call pushes 40 layers; the server's statistics equal an in-process store's, bit for bit."""
    reference = Store.open("memory://")
    names = [f"net/block{i}/bn" for i in range(40)]
    for name in names:
        create(stub, name, momentum=0.9)
        reference.create_layer(name, momentum=0.9)
    for step in range(3):
        updates = {name: moments_of(rng.normal(i, 1 + i / 10, (32, 8))) for i, name in enumerate(names)}
        response = stub.UpdateStats(update_request(updates))
        expected = reference.update_many(updates)
        assert [s.layer for s in response.stats] == names
        for got in response.stats:
            want = expected[got.layer]
            mean, var = stats_arrays(got.stats)
            np.testing.assert_array_equal(mean, want.mean)
            np.testing.assert_array_equal(var, want.variance)
            assert (got.stats.version, got.stats.num_batches, got.stats.count) == (step + 1, step + 1, 32 * (step + 1))


def test_update_stats_is_all_or_nothing(stub, rng):
    for name in ("a", "b", "frozen"):
        create(stub, name)
    good = moments_of(rng.normal(size=(8, 4)))
    stub.UpdateStats(update_request({"a": good, "b": good, "frozen": good}))
    stub.Freeze(pb.FreezeRequest(name="frozen"))
    with raises_code(C.NOT_FOUND, "'missing'"):
        stub.UpdateStats(update_request({"a": good, "missing": good}))
    with raises_code(C.FAILED_PRECONDITION, "'frozen'"):
        stub.UpdateStats(update_request({"a": good, "frozen": good}))
    with raises_code(C.INVALID_ARGUMENT, "'b'") as info:  # b keeps 4 features
        stub.UpdateStats(update_request({"a": good, "b": moments_of(rng.normal(size=(8, 3)))}))
    assert rich_details(info.value)["BadRequest"].field_violations[0].field == "updates[1].moments.mean"
    layers = stub.GetLayer(pb.GetLayerRequest(names=["a", "b"])).layers
    assert [layer.stats.version for layer in layers] == [1, 1]


def packed_request(updates: dict, **fields) -> pb.UpdateStatsRequest:
    request = pb.UpdateStatsRequest(**fields)
    pack_moments(updates, request.packed)
    return request


def test_packed_updates_equal_per_layer_updates(stub, rng):
    """The packed form of a 53-layer-like step: the same statistics, bit for bit, as LayerMoments."""
    for i in range(12):  # p/i goes packed, q/i the same moments per layer
        for name in (f"p/{i}", f"q/{i}"):
            create(stub, name, momentum=0.9, convention=pb.CONVENTION_TORCH if i % 2 else pb.CONVENTION_KERAS,
                   num_features=[4 + i])
    for step in range(3):
        packed = {f"p/{i}": moments_of(rng.normal(i, 1 + i / 10, (16, 4 + i))) for i in range(12)}
        a = stub.UpdateStats(packed_request(packed, request_id=f"s{step}", step=step, rank=0, world_size=1))
        b = stub.UpdateStats(update_request({n.replace("p/", "q/"): m for n, m in packed.items()}))
        assert not a.stats and not b.HasField("packed") and list(a.packed.layers) == list(packed)
        got = unpack_stats(a.packed)
        for entry_b in b.stats:
            want = entry_b.stats
            g = got[entry_b.layer.replace("q/", "p/")]
            mean, var = stats_arrays(want)
            assert np.array_equal(g.mean, mean) and np.array_equal(g.variance, var)
            assert (g.version, g.num_batches, g.count, g.last_step) == (want.version, want.num_batches,
                                                                         want.count, step)
        # a retry of the packed request: the same answer, nothing applied twice
        again = stub.UpdateStats(packed_request(packed, request_id=f"s{step}", step=step, rank=0, world_size=1))
        assert list(again.packed.version) == list(a.packed.version)


def test_packed_requests_are_checked_like_per_layer_ones(stub, rng):
    for name in ("a", "b", "frozen"):
        create(stub, name, num_features=[4])
    stub.Freeze(pb.FreezeRequest(name="frozen"))
    good = moments_of(rng.normal(size=(8, 4)))
    both = packed_request({"a": good})
    both.updates.add().CopyFrom(entry("a", good))
    with raises_code(C.INVALID_ARGUMENT, "both updates (with 1 layer entries) and packed are set: expected one of them") as info:
        stub.UpdateStats(both)
    assert rich_details(info.value)["BadRequest"].field_violations[0].field == "packed"
    with raises_code(C.INVALID_ARGUMENT, "expected at least one layer"):
        stub.UpdateStats(packed_request({}))
    with raises_code(C.INVALID_ARGUMENT, "repeats layer 'a'") as info:
        request = packed_request({"a": good, "b": good})
        request.packed.layers[1] = "a"
        stub.UpdateStats(request)
    assert rich_details(info.value)["BadRequest"].field_violations[0].field == "packed.layers[1]"
    with raises_code(C.NOT_FOUND, "'missing'"):
        stub.UpdateStats(packed_request({"a": good, "missing": good}))
    with raises_code(C.FAILED_PRECONDITION, "'frozen'"):
        stub.UpdateStats(packed_request({"a": good, "frozen": good}))
    with raises_code(C.INVALID_ARGUMENT, "'b'") as info:  # b keeps 4 features
        stub.UpdateStats(packed_request({"a": good, "b": moments_of(rng.normal(size=(8, 3)))}))
    assert rich_details(info.value)["BadRequest"].field_violations[0].field == "packed.mean"
    with raises_code(C.INVALID_ARGUMENT, "positive sample count") as info:
        stub.UpdateStats(packed_request({"a": Moments(np.float64(0), np.zeros(4), np.zeros(4))}))
    assert rich_details(info.value)["BadRequest"].field_violations[0].field == "packed.count"
    bad = packed_request({"a": good, "b": good})
    bad.packed.dims[:] = [4]
    with raises_code(C.INVALID_ARGUMENT, "packed.dims") as info:
        stub.UpdateStats(bad)
    layers = stub.GetLayer(pb.GetLayerRequest(names=["a", "b"])).layers
    assert [layer.stats.version for layer in layers] == [0, 0]  # nothing changed


def test_the_client_sends_per_group_counts_per_layer(server, rng):
    """Moments whose count differs per statistic do not pack: the client sends them as LayerMoments."""
    from normsvc import Client

    with Client(server.address) as client:
        client.create_layer("cum", convention="cumulative", num_features=3)
        client.create_layer("bn", num_features=3)
        x = rng.normal(size=(6, 3))
        per_group = Moments(np.full(3, 6.0), x.mean(0), ((x - x.mean(0)) ** 2).sum(0))
        stats = client.update_many({"cum": per_group, "bn": Moments.from_samples(x)})
    np.testing.assert_allclose(stats["cum"].mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(stats["cum"].variance, x.var(0), rtol=1e-13)
    assert stats["bn"].version == 1


def _bad(m: pb.Moments, what: str) -> pb.Moments:
    m = pb.Moments.FromString(m.SerializeToString())
    if what == "nan":
        m.mean.data = np.array([np.nan, 0.0]).tobytes()
    elif what == "short":
        m.variance.data = m.variance.data[:-1]
    elif what == "dtype":
        m.mean.dtype = pb.DTYPE_UNSPECIFIED
    elif what == "negative_variance":
        m.variance.data = np.array([-1.0, 1.0]).tobytes()
    elif what == "missing":
        m.ClearField("count")
    elif what == "shape":
        m.variance.shape[:] = [1, 2]
    elif what == "negative_dim":
        m.mean.shape[:] = [-2]
    return m


@pytest.mark.parametrize("what, field", [
    ("nan", "updates[1].moments.mean.data"),
    ("short", "updates[1].moments.variance.data"),
    ("dtype", "updates[1].moments.mean.dtype"),
    ("negative_variance", "updates[1].moments.variance"),
    ("missing", "updates[1].moments.count"),
    ("shape", "updates[1].moments.variance"),
    ("negative_dim", "updates[1].moments.mean.shape"),
])
def test_update_stats_rejects_bad_tensors_naming_the_field(mstub, what, field):
    create(mstub, "a")
    create(mstub, "b")
    good = entry("a", Moments.from_variance(4.0, [1.0, 2.0], [1.0, 1.0]))
    bad = pb.LayerMoments(layer="b", moments=_bad(good.moments, what))
    with raises_code(C.INVALID_ARGUMENT) as info:
        mstub.UpdateStats(pb.UpdateStatsRequest(updates=[good, bad]))
    violation = rich_details(info.value)["BadRequest"].field_violations[0]
    assert violation.field == field
    assert "expected" in violation.description
    assert mstub.GetLayer(pb.GetLayerRequest(names=["a"])).layers[0].stats.version == 0


def test_update_stats_request_errors(mstub):
    create(mstub, "a")
    m = Moments.from_variance(4.0, [1.0], [1.0])
    with raises_code(C.INVALID_ARGUMENT, "updates is empty"):
        mstub.UpdateStats(pb.UpdateStatsRequest())
    with raises_code(C.INVALID_ARGUMENT, "repeats layer 'a'"):
        mstub.UpdateStats(pb.UpdateStatsRequest(updates=[entry("a", m), entry("a", m)]))
    with raises_code(C.INVALID_ARGUMENT, "count"):  # a batch of zero samples
        mstub.UpdateStats(update_request({"a": Moments.from_variance(0.0, [1.0], [1.0])}))


def test_a_retried_request_id_is_applied_once(stub, rng):
    create(stub, "a")
    update = update_request({"a": moments_of(rng.normal(size=(8, 2)))}, request_id="step-1")
    first = stub.UpdateStats(update).stats[0].stats
    retry = stub.UpdateStats(update).stats[0].stats
    assert first.version == retry.version == 1 and retry.num_batches == 1
    assert stats_arrays(first)[0].tolist() == stats_arrays(retry)[0].tolist()


def test_concurrent_clients_lose_no_update(server, connect):
    """32 clients x 200 UpdateStats on one layer, each on its own channel: exact counts."""
    clients, per_client = 32, 200
    stub = connect(server)
    create(stub, "shared", convention=pb.CONVENTION_CUMULATIVE)
    create(stub, "other")
    errors = []

    def client(k):
        mine = connect(server)
        one = Moments.from_variance(2.0, [float(k)], [0.0])
        request = update_request({"shared": one, "other": one})
        try:
            for _ in range(per_client):
                mine.UpdateStats(request, timeout=60)
        except grpc.RpcError as exc:  # reported below; the test fails
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    layers = stub.GetLayer(pb.GetLayerRequest(names=["shared", "other"])).layers
    n = clients * per_client
    for layer in layers:
        assert (layer.stats.version, layer.stats.num_batches, layer.stats.count) == (n, n, 2 * n)
    mean, var = stats_arrays(layers[0].stats)
    # cumulative: the pooled mean of k = 0..31 (each weighted equally) and its population variance
    np.testing.assert_allclose(mean, [np.mean(np.arange(clients))], rtol=1e-9)
    np.testing.assert_allclose(var, [np.var(np.arange(clients))], rtol=1e-9)
    registry = server.metrics.registry
    assert registry.get_sample_value("normsvc_layer_updates_total", {"layer": "shared", "rpc": "UpdateStats"}) == n
    assert registry.get_sample_value("normsvc_rpc_requests_total", {"method": "UpdateStats", "code": "OK"}) == n


def test_export_and_import_round_trip(stub, rng):
    create(stub, "enc/bn", momentum=0.5)
    create(stub, "torch/bn", convention=pb.CONVENTION_TORCH)
    stub.UpdateStats(update_request({
        "enc/bn": moments_of(rng.normal(3, 2, (64, 4))),
        "torch/bn": moments_of(rng.normal(-1, 1, (64, 2))),
    }))
    exported = stub.ExportStats(pb.ExportStatsRequest(naming=pb.NAMING_KERAS))
    assert list(exported.layers) == ["enc/bn", "torch/bn"]
    tensors = load_safetensors(exported.safetensors)
    before = stub.GetLayer(pb.GetLayerRequest(names=["enc/bn"])).layers[0].stats
    np.testing.assert_array_equal(tensors["enc/bn/moving_mean"], stats_arrays(before)[0])

    torch_file = stub.ExportStats(pb.ExportStatsRequest(names=["torch/bn"], naming=pb.NAMING_TORCH,
                                                        dtype=pb.DTYPE_FLOAT32))
    torch_tensors = load_safetensors(torch_file.safetensors)
    assert torch_tensors["torch/bn.running_var"].dtype == np.float32
    assert int(torch_tensors["torch/bn.num_batches_tracked"]) == 1

    stub.ResetStats(pb.ResetStatsRequest(name="enc/bn"))
    stub.DeleteLayer(pb.DeleteLayerRequest(name="torch/bn"))
    imported = stub.ImportStats(pb.ImportStatsRequest(safetensors=exported.safetensors, naming=pb.NAMING_KERAS))
    assert sorted(imported.layers) == ["enc/bn", "torch/bn"]
    after = stub.GetLayer(pb.GetLayerRequest(names=["enc/bn", "torch/bn"])).layers
    np.testing.assert_array_equal(stats_arrays(after[0].stats)[0], stats_arrays(before)[0])
    assert after[1].config.convention == pb.CONVENTION_TORCH


def test_export_import_errors(mstub):
    with raises_code(C.NOT_FOUND):
        mstub.ExportStats(pb.ExportStatsRequest(names=["nope"]))
    with raises_code(C.INVALID_ARGUMENT):
        mstub.ExportStats(pb.ExportStatsRequest(naming=7))
    with raises_code(C.INVALID_ARGUMENT):
        mstub.ImportStats(pb.ImportStatsRequest(safetensors=b"not a safetensors file"))
