"""Layer lifecycle RPCs: CreateLayer, GetLayer, ListLayers, DeleteLayer, ResetStats, Freeze, Unfreeze."""

from __future__ import annotations

import grpc
import pytest
from server_util import decode, pb, moments_of, raises_code, rich_details, stats_arrays, update_request

C = grpc.StatusCode


def create(stub, name, **config):
    return stub.CreateLayer(pb.CreateLayerRequest(name=name, config=pb.LayerConfig(**config))).layer


def test_create_layer_resolves_the_convention_defaults(stub):
    layer = create(stub, "bn")
    cfg = layer.config
    assert layer.name == "bn"
    assert (cfg.kind, list(cfg.axis), cfg.convention) == (pb.LAYER_KIND_BATCH, [-1], pb.CONVENTION_KERAS)
    assert (cfg.momentum, cfg.epsilon, cfg.center, cfg.scale) == (0.99, 1e-3, True, True)
    torch = create(stub, "torch/bn", convention=pb.CONVENTION_TORCH, axis=[1], num_features=[3])
    assert (torch.config.momentum, torch.config.epsilon) == (0.1, 1e-5)
    mean, var = stats_arrays(torch.stats)
    assert mean.tolist() == [0, 0, 0] and var.tolist() == [1, 1, 1]
    assert torch.stats.version == 0 and not torch.stats.frozen
    cma = create(stub, "cma", convention=pb.CONVENTION_TORCH, cumulative_average=True)
    assert cma.config.cumulative_average and not cma.config.HasField("momentum")
    gn = create(stub, "gn", kind=pb.LAYER_KIND_GROUP, groups=4)
    assert gn.config.groups == 4 and list(gn.config.axis) == [-1]


def test_create_layer_is_idempotent_and_a_clash_is_already_exists(stub):
    first = create(stub, "bn", momentum=0.9)
    again = create(stub, "bn", momentum=0.9)
    assert again.config == first.config
    with raises_code(C.ALREADY_EXISTS, "bn") as info:
        create(stub, "bn", momentum=0.5)
    details = rich_details(info.value)
    assert details["ErrorInfo"].reason == "CONFIG_CONFLICT"
    assert details["ErrorInfo"].domain == "normsvc"
    assert details["ResourceInfo"].resource_name == "bn"


@pytest.mark.parametrize("name, config, field", [
    ("bad name!", {}, "name"),
    ("", {}, "name"),
    ("bn", {"groups": 4}, "config.groups"),
    ("bn", {"momentum": 1.5}, "config.momentum"),
    ("bn", {"epsilon": -1.0}, "config.epsilon"),
    ("bn", {"kind": 42}, "config.kind"),
    ("bn", {"convention": 9}, "config.convention"),
    ("bn", {"convention": pb.CONVENTION_TORCH, "cumulative_average": True, "momentum": 0.1}, "config.momentum"),
    ("bn", {"cumulative_average": True}, "config.momentum"),  # keras has no cumulative average
])
def test_create_layer_rejects_a_bad_config_with_a_field_violation(mstub, name, config, field):
    with raises_code(C.INVALID_ARGUMENT) as info:
        create(mstub, name, **config)
    violations = rich_details(info.value)["BadRequest"].field_violations
    assert [v.field for v in violations] == [field]
    assert violations[0].description == info.value.details()
    with raises_code(C.INVALID_ARGUMENT):  # and nothing was created
        mstub.ListLayers(pb.ListLayersRequest(page_size=-1))
    assert not mstub.ListLayers(pb.ListLayersRequest()).layers


def test_get_layer_returns_many_layers_in_request_order(stub):
    for name in ("a", "b", "c"):
        create(stub, name)
    layers = stub.GetLayer(pb.GetLayerRequest(names=["c", "a", "b"])).layers
    assert [layer.name for layer in layers] == ["c", "a", "b"]
    assert all(layer.HasField("stats") and layer.HasField("config") for layer in layers)


def test_get_layer_errors(stub):
    create(stub, "a")
    with raises_code(C.NOT_FOUND, "'missing'") as info:
        stub.GetLayer(pb.GetLayerRequest(names=["a", "missing"]))
    details = rich_details(info.value)
    assert details["ErrorInfo"].reason == "LAYER_NOT_FOUND"
    assert details["ErrorInfo"].metadata["layer"] == "missing"
    assert details["ResourceInfo"].resource_type == "normsvc.v1.Layer"
    with raises_code(C.INVALID_ARGUMENT, "names is empty"):
        stub.GetLayer(pb.GetLayerRequest())


def test_list_layers_pages_through_sorted_names(stub):
    names = [f"model/bn{i:02d}" for i in range(25)] + ["other/bn"]
    for name in reversed(names):
        create(stub, name)
    seen, token, pages = [], "", 0
    for _ in range(10):
        page = stub.ListLayers(pb.ListLayersRequest(prefix="model/", page_size=10, page_token=token))
        pages += 1
        seen += [layer.name for layer in page.layers]
        assert all(not layer.HasField("stats") for layer in page.layers)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3 and seen == names[:25]
    full = stub.ListLayers(pb.ListLayersRequest(include_stats=True)).layers
    assert [layer.name for layer in full] == sorted(names)
    assert all(layer.stats.HasField("updated_at") for layer in full)


def test_list_layers_errors(mstub):
    with raises_code(C.INVALID_ARGUMENT, "page_size"):
        mstub.ListLayers(pb.ListLayersRequest(page_size=-1))
    with raises_code(C.INVALID_ARGUMENT, "page_token"):
        mstub.ListLayers(pb.ListLayersRequest(page_token="not base64!"))


def test_delete_layer(stub):
    create(stub, "bn")
    stub.DeleteLayer(pb.DeleteLayerRequest(name="bn"))
    with raises_code(C.NOT_FOUND):
        stub.GetLayer(pb.GetLayerRequest(names=["bn"]))
    with raises_code(C.NOT_FOUND, "'bn'"):
        stub.DeleteLayer(pb.DeleteLayerRequest(name="bn"))
    with raises_code(C.INVALID_ARGUMENT):
        stub.DeleteLayer(pb.DeleteLayerRequest(name=""))


def test_reset_stats(stub, rng):
    create(stub, "bn", momentum=0.5)
    stub.UpdateStats(update_request({"bn": moments_of(rng.normal(5, 2, (64, 3)))}))
    stats = stub.ResetStats(pb.ResetStatsRequest(name="bn")).stats
    mean, var = stats_arrays(stats)
    assert mean.tolist() == [0, 0, 0] and var.tolist() == [1, 1, 1]
    assert (stats.version, stats.num_batches, stats.count) == (2, 0, 0)
    again = stub.ResetStats(pb.ResetStatsRequest(name="bn", request_id="r1")).stats
    retry = stub.ResetStats(pb.ResetStatsRequest(name="bn", request_id="r1")).stats
    assert again.version == retry.version == 3
    with raises_code(C.NOT_FOUND):
        stub.ResetStats(pb.ResetStatsRequest(name="nope"))


def test_freeze_blocks_updates_until_unfreeze(stub, rng):
    create(stub, "bn")
    m = moments_of(rng.normal(size=(16, 2)))
    frozen = stub.Freeze(pb.FreezeRequest(name="bn")).stats
    assert frozen.frozen and frozen.version == 1
    with raises_code(C.FAILED_PRECONDITION, "frozen") as info:
        stub.UpdateStats(update_request({"bn": m}))
    details = rich_details(info.value)
    assert details["ErrorInfo"].reason == "FROZEN_LAYER"
    assert details["PreconditionFailure"].violations[0].subject == "bn"
    assert stub.GetLayer(pb.GetLayerRequest(names=["bn"])).layers[0].stats.version == 1
    thawed = stub.Unfreeze(pb.UnfreezeRequest(name="bn")).stats
    assert not thawed.frozen and thawed.version == 2
    assert stub.UpdateStats(update_request({"bn": m})).stats[0].stats.version == 3
    with raises_code(C.NOT_FOUND):
        stub.Freeze(pb.FreezeRequest(name="nope"))
    with raises_code(C.NOT_FOUND):
        stub.Unfreeze(pb.UnfreezeRequest(name="nope"))


def test_resolved_config_round_trips_through_create(stub):
    """A client can recreate a layer from GetLayer's config (idempotent create)."""
    create(stub, "ln", kind=pb.LAYER_KIND_LAYER, axis=[-2, -1], convention=pb.CONVENTION_CUMULATIVE)
    cfg = stub.GetLayer(pb.GetLayerRequest(names=["ln"])).layers[0].config
    again = stub.CreateLayer(pb.CreateLayerRequest(name="ln", config=cfg)).layer
    assert again.config == cfg
    assert decode(again.stats.mean, field="mean").shape == ()
