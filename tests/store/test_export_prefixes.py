"""Export by prefix, under names without it (strip_prefix), and import under a prefix (add_prefix)."""

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from store_testing import np_moments

from normsvc import Store
from normsvc.errors import InvalidArgument, InvalidType

MODEL = ["resnet50/block1/bn", "resnet50/bn1", "resnet50/head/ln"]
OTHERS = ["resnet50x/bn", "vgg/bn1"]  # "resnet50x/bn" starts with "resnet50" but not with "resnet50/"


def _fill(store, rng):
    for name in MODEL + OTHERS:
        if name.endswith("ln"):
            layer = store.create_layer(name, kind="layer", convention="torch")
            layer.update(np_moments(rng.normal(size=(4, 6)), [1]))
        else:
            layer = store.create_layer(name, axis=1, convention="torch" if "block" in name else "keras")
            for _ in range(2):
                layer.update(np_moments(rng.normal(1.0, 2.0, size=(5, 3)), [0]))
    store.create_layer("resnet50/lazy")  # no batch yet: in the metadata only


def _keys(names, naming):
    if naming == "keras":
        return {f"{n}/{leaf}" for n in names for leaf in ("moving_mean", "moving_variance")}
    return {f"{n}.{leaf}" for n in names for leaf in ("running_mean", "running_var", "num_batches_tracked")}


def _metadata_layers(path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return json.loads(f.metadata()["normsvc"])["layers"]


def _state(store, name):
    s = store.layer(name).stats()
    return store.layer(name).config(), s.mean.tolist(), s.variance.tolist(), s.count, s.num_batches


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("naming", ["keras", "torch"])
def test_a_prefix_exported_under_the_models_own_names(store, tmp_path, rng, naming, dtype):
    _fill(store, rng)
    path = tmp_path / "model.safetensors"
    written = store.export(path, naming=naming, prefix="resnet50/", strip_prefix=True, dtype=dtype)
    assert written == MODEL + ["resnet50/lazy"]  # the store's names
    tensors = load_file(path)
    assert set(tensors) == _keys(["block1/bn", "bn1", "head/ln"], naming)
    assert sorted(_metadata_layers(path)) == ["block1/bn", "bn1", "head/ln", "lazy"]
    sep, mean, var = ("/", "moving_mean", "moving_variance") if naming == "keras" else (".", "running_mean",
                                                                                         "running_var")
    for name in MODEL:
        stats, short = store.layer(name).stats(), name[len("resnet50/"):]
        for leaf, want in ((mean, stats.mean), (var, stats.variance)):
            got = tensors[f"{short}{sep}{leaf}"]
            assert got.dtype == np.dtype(dtype) and got.shape == want.shape
            # float32: the stored float64 rounded once, nothing else
            np.testing.assert_array_equal(got, want.astype(dtype))
        if naming == "torch":
            assert int(tensors[f"{short}.num_batches_tracked"]) == stats.num_batches


def test_strip_prefix_as_a_string_with_named_layers(store, tmp_path, rng):
    _fill(store, rng)
    path = tmp_path / "two.safetensors"
    assert store.export(path, ["resnet50/bn1", "resnet50/block1/bn"], strip_prefix="resnet50/") == [
        "resnet50/bn1", "resnet50/block1/bn"]
    assert set(load_file(path)) == _keys(["bn1", "block1/bn"], "keras")
    # a prefix alone selects without renaming; "" selects and strips nothing
    assert store.export(path, prefix="vgg/") == ["vgg/bn1"]
    assert set(load_file(path)) == _keys(["vgg/bn1"], "keras")
    assert store.export(path, prefix="", strip_prefix="", naming="torch") == sorted(MODEL + OTHERS + ["resnet50/lazy"])


@pytest.mark.parametrize("naming", ["keras", "torch"])
def test_round_trip_back_under_a_namespace(store, tmp_path, rng, naming):
    _fill(store, rng)
    path = tmp_path / "model.safetensors"
    store.export(path, naming=naming, prefix="resnet50/", strip_prefix=True)
    with Store.open("memory://") as fresh:
        assert fresh.import_(path, naming=naming, add_prefix="copy/") == [
            "copy/block1/bn", "copy/bn1", "copy/head/ln", "copy/lazy"]
        for name in MODEL + ["resnet50/lazy"]:
            assert _state(fresh, "copy/" + name[len("resnet50/"):]) == _state(store, name), name
        # only some of the file's layers, named as in the file
        assert fresh.import_(path, naming=naming, layers=["bn1"], add_prefix="again/") == ["again/bn1"]
        assert _state(fresh, "again/bn1") == _state(store, "resnet50/bn1")
    # back into the layers it came from: the same values, one version on
    before = {name: store.layer(name).stats().version for name in MODEL}
    assert store.import_(path, naming=naming, add_prefix="resnet50/") == MODEL + ["resnet50/lazy"]
    for name in MODEL:
        assert store.layer(name).stats().version == before[name] + 1


def _raises(cls, field, match, fn, *args, **kwargs):
    with pytest.raises(cls, match=match) as info:
        fn(*args, **kwargs)
    assert info.value.field == field, info.value
    return info.value


@pytest.mark.parametrize("kwargs, cls, field, match", [
    (dict(layers="resnet50/"), InvalidArgument, "layers", r"prefix='resnet50/'"),
    (dict(layers=["vgg/bn1"], prefix="resnet50/"), InvalidArgument, "prefix", "both select layers"),
    (dict(strip_prefix=True), InvalidArgument, "strip_prefix", "expected prefix= too"),
    (dict(prefix="resnet50/", strip_prefix="vgg/"), InvalidArgument, "strip_prefix",
     "'resnet50/block1/bn' does not start with strip_prefix 'vgg/'"),
    (dict(layers=["vgg/bn1", "resnet50/bn1"], strip_prefix="vgg/"), InvalidArgument, "strip_prefix",
     "'resnet50/bn1' does not start with"),
    (dict(prefix="resnet50", strip_prefix=True), InvalidArgument, "strip_prefix", "would be '/block1/bn'"),
    (dict(layers=["vgg/bn1"], strip_prefix="vgg/bn1"), InvalidArgument, "strip_prefix", "would be ''"),
    (dict(prefix=7), InvalidType, "prefix", "prefix must be a string"),
    (dict(prefix="resnet50/", strip_prefix=["resnet50/"]), InvalidType, "strip_prefix", "must be a string"),
    (dict(prefix="nothing/"), InvalidArgument, "prefix", "no layer starts with prefix 'nothing/'"),
])
def test_bad_export_arguments_name_the_argument_and_write_nothing(store, assert_unchanged, tmp_path, rng,
                                                                  kwargs, cls, field, match):
    _fill(store, rng)
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "old.safetensors"
    path.write_bytes(b"the previous file")
    with assert_unchanged(store):
        _raises(cls, field, match, store.export, path, **kwargs)
    assert path.read_bytes() == b"the previous file"
    assert [p.name for p in path.parent.iterdir()] == ["old.safetensors"]  # no temporary file left


def test_bad_add_prefix_names_the_argument_and_imports_nothing(store, assert_unchanged, tmp_path, rng):
    _fill(store, rng)
    path = tmp_path / "model.safetensors"
    store.export(path, prefix="resnet50/", strip_prefix=True)
    with assert_unchanged(store):
        error = _raises(InvalidArgument, "add_prefix", r"'x//block1/bn' is not valid", store.import_, path,
                        add_prefix="x//")
        assert error.layer == "block1/bn"
        _raises(InvalidType, "add_prefix", "add_prefix must be a string", store.import_, path, add_prefix=5)
        _raises(InvalidArgument, "layers", r"\['nope'\] not in the file", store.import_, path,
                layers=["nope"], add_prefix="copy/")
    assert not store.list_layers("x")
