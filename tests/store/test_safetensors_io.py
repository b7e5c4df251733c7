"""Export and import of running statistics as safetensors, with Keras and PyTorch names."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from normsvc import Store
from normsvc.store import InvalidArgument, LayerNotFound
from store_testing import np_moments


def _fill(store, rng):
    """A few layers of every flavour, each with some history."""
    specs = {
        "enc/bn1": dict(axis=1, convention="torch"),
        "enc/bn2": dict(axis=-1, momentum=0.9),
        "cma": dict(convention="torch", momentum=None, axis=1),
        "precise": dict(convention="cumulative"),
        "in": dict(kind="instance", axis=1, convention="torch"),
        "ln": dict(kind="layer"),
    }
    for name, kw in specs.items():
        layer = store.create_layer(name, **kw)
        for _ in range(3):
            if kw.get("kind") == "instance":
                layer.update(np_moments(rng.normal(size=(4, 3, 5)), [2]))
            elif kw.get("kind") == "layer":
                layer.update(np_moments(rng.normal(size=(4, 6)), [1]))
            else:
                layer.update(np_moments(rng.normal(np.pi, 1 / 3, size=(5, 3, 2)), [0, 2] if kw.get("axis") == 1 else [0, 1]))
    store.create_layer("lazy", num_features=None)  # no batch yet: shape unknown
    return list(specs) + ["lazy"]


def _stats(store, name):
    s = store.layer(name).stats()
    return s.mean.tolist(), s.variance.tolist(), s.count, s.num_batches


@pytest.mark.parametrize("naming", ["keras", "torch"])
def test_round_trip_is_exact(store, tmp_path, rng, naming):
    names = _fill(store, rng)
    path = tmp_path / "stats.safetensors"
    assert sorted(store.export(path, naming=naming)) == sorted(names)
    with Store.open("memory://") as fresh:
        assert sorted(fresh.import_(path, naming=naming)) == sorted(names)
        for name in names:
            assert _stats(fresh, name) == _stats(store, name), name
            assert fresh.layer(name).config() == store.layer(name).config()
    # importing over the originals replaces their statistics with the same values, one version each
    before = {n: store.layer(n).stats().version for n in names}
    store.import_(path, naming=naming)
    for name in names:
        want = before[name] + (0 if name == "lazy" else 1)
        assert store.layer(name).stats().version == want


def test_keras_names(store, tmp_path, rng):
    store.create_layer("model/bn", num_features=3)
    store.layer("model/bn").update(np_moments(rng.normal(size=(4, 3)), [0]))
    path = tmp_path / "k.safetensors"
    store.export(path, naming="keras")
    tensors = load_file(str(path))
    assert set(tensors) == {"model/bn/moving_mean", "model/bn/moving_variance"}
    assert tensors["model/bn/moving_mean"].dtype == np.float64
    np.testing.assert_array_equal(tensors["model/bn/moving_variance"], store.layer("model/bn").stats().variance)


def test_torch_names(store, tmp_path, rng):
    layer = store.create_layer("layer1.0.bn1", axis=1, convention="torch")
    layer.update(np_moments(rng.normal(size=(4, 3, 2)), [0, 2]))
    layer.update(np_moments(rng.normal(size=(4, 3, 2)), [0, 2]))
    path = tmp_path / "t.safetensors"
    store.export(path, naming="torch", dtype="float32")
    tensors = load_file(str(path))
    assert set(tensors) == {"layer1.0.bn1.running_mean", "layer1.0.bn1.running_var",
                            "layer1.0.bn1.num_batches_tracked"}
    assert tensors["layer1.0.bn1.running_var"].dtype == np.float32
    nbt = tensors["layer1.0.bn1.num_batches_tracked"]
    assert nbt.dtype == np.int64 and nbt.shape == () and int(nbt) == 2


def test_file_is_safetensors_not_pickle(store, tmp_path, rng):
    store.create_layer("bn").update(np_moments(rng.normal(size=(4, 3)), [0]))
    path = tmp_path / "s.safetensors"
    store.export(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert "normsvc" in header["__metadata__"] and raw[:2] != b"\x80\x04"


def test_export_a_subset(store, tmp_path, rng):
    _fill(store, rng)
    path = tmp_path / "s.safetensors"
    assert store.export(path, layers=["enc/bn1", "ln"]) == ["enc/bn1", "ln"]
    assert {k.rsplit("/", 1)[0] for k in load_file(str(path))} == {"enc/bn1", "ln"}
    with pytest.raises(LayerNotFound):
        store.export(path, layers=["enc/bn1", "nope"])
    with pytest.raises(InvalidArgument):
        store.export(path, naming="jax")
    with pytest.raises(InvalidArgument):
        store.export(path, dtype="float16")


def test_import_a_plain_torch_state_dict(store, tmp_path):
    """A file saved by torch (no normsvc metadata, weights and biases alongside) imports its running stats."""
    path = tmp_path / "model.safetensors"
    save_file({
        "conv1.weight": np.ones((3, 3, 3, 3), np.float32),
        "bn1.weight": np.ones(3, np.float32),
        "bn1.bias": np.zeros(3, np.float32),
        "bn1.running_mean": np.array([0.5, -1.0, 2.0], np.float32),
        "bn1.running_var": np.array([1.5, 0.25, 3.0], np.float32),
        "bn1.num_batches_tracked": np.array(7, np.int64),
        "layer1.0.bn2.running_mean": np.zeros(2, np.float32),
        "layer1.0.bn2.running_var": np.ones(2, np.float32),
        "layer1.0.bn2.num_batches_tracked": np.array(0, np.int64),
    }, str(path))
    store.create_layer("bn1", axis=1, convention="torch", momentum=0.01)
    store.layer("bn1").freeze()
    assert sorted(store.import_(path, naming="torch")) == ["bn1", "layer1.0.bn2"]
    bn1 = store.layer("bn1")
    s = bn1.stats()
    np.testing.assert_array_equal(s.mean, [0.5, -1.0, 2.0])
    np.testing.assert_array_equal(s.variance, [1.5, 0.25, 3.0])
    assert (s.num_batches, s.count, s.frozen) == (7, 0.0, True)  # frozen flag untouched
    assert bn1.config().momentum == 0.01  # an existing layer keeps its config
    created = store.layer("layer1.0.bn2").config()
    assert (created.convention, created.axis, created.momentum) == ("torch", 1, 0.1)


def test_import_only_some_layers(store, tmp_path, rng):
    with Store.open("memory://") as source:
        _fill(source, rng)
        path = tmp_path / "s.safetensors"
        source.export(path, naming="torch")
    assert store.import_(path, naming="torch", layers=["ln", "enc/bn2"]) == ["enc/bn2", "ln"]
    assert store.list_layers() == ["enc/bn2", "ln"]
    with pytest.raises(InvalidArgument, match="not in"):
        store.import_(path, naming="torch", layers=["zz"])


def _file(tmp_path, tensors, name="bad.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_rejected_imports_change_nothing(store, assert_unchanged, tmp_path, rng):
    store.create_layer("bn", num_features=3).update(np_moments(rng.normal(size=(4, 3)), [0]))
    cases = [
        ({"bn/moving_mean": np.zeros(4), "bn/moving_variance": np.ones(4)}, "shape"),
        ({"bn/moving_mean": np.array([0, np.nan, 0]), "bn/moving_variance": np.ones(3)}, "NaN"),
        ({"bn/moving_mean": np.zeros(3), "bn/moving_variance": np.array([1, -1, 1.0])}, "negative"),
        ({"bn/moving_mean": np.zeros(3)}, "no variance"),
        ({"bn/moving_mean": np.zeros(3), "bn/moving_variance": np.ones(2)}, "differs"),
        ({"bad name/moving_mean": np.zeros(3), "bad name/moving_variance": np.ones(3)}, "not valid"),
        # one good layer and one bad one: neither is written
        ({"new/moving_mean": np.zeros(3), "new/moving_variance": np.ones(3),
          "bn/moving_mean": np.zeros(5), "bn/moving_variance": np.ones(5)}, "shape"),
    ]
    for i, (tensors, message) in enumerate(cases):
        path = _file(tmp_path, tensors, f"bad{i}.safetensors")
        with assert_unchanged(store), pytest.raises(InvalidArgument, match=message):
            store.import_(path, naming="keras")
    with assert_unchanged(store):
        with pytest.raises(InvalidArgument, match="no file"):
            store.import_(tmp_path / "missing.safetensors")
        pickled = tmp_path / "model.pt"
        pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # the start of a pickle: never loaded
        with pytest.raises(InvalidArgument, match="not a readable safetensors"):
            store.import_(pickled)
        with pytest.raises(InvalidArgument):
            store.import_(_file(tmp_path, {"x": np.zeros(1)}), naming="onnx")


def _with_metadata(tmp_path, text, tensors=None, name="meta.safetensors"):
    path = tmp_path / name
    tensors = {"new/moving_mean": np.zeros(3), "new/moving_variance": np.ones(3)} if tensors is None else tensors
    save_file(tensors, str(path), metadata={"normsvc": text})
    return path


def _meta(layers, **top):
    return json.dumps({"format": 1, "naming": "keras", "layers": layers, **top})


GOOD_CONFIG = {"kind": "batch", "axis": -1, "convention": "keras"}
MALFORMED = {
    "not json": ("{layers:", "not valid JSON"),
    "a list": ("[1, 2]", "expected a JSON object"),
    "layers a list": (_meta([1, 2]), "'layers' in the normsvc metadata is \\[1, 2\\]: expected an object"),
    "entry a list": (_meta({"new": [1, 2]}), "entry 'new' .* is \\[1, 2\\]: expected an object"),
    "entry key": (_meta({"new": {"config": GOOD_CONFIG, "mean": 0}}), "unknown keys \\['mean'\\]"),
    "top key": (_meta({}, extra=1), "unknown keys \\['extra'\\]"),
    "newer format": (json.dumps({"format": 2, "layers": {}}), "format 2: this normsvc reads format 1"),
    "num_batches 2**70": (_meta({"new": {"num_batches": 2**70}}), "num_batches=1180591620717411303424 .*2\\*\\*63"),
    "num_batches 1e30": (_meta({"new": {"num_batches": 1e30}}), "num_batches of .* is 1e\\+30: expected an integer"),
    "num_batches -1": (_meta({"new": {"num_batches": -1}}), "num_batches=-1"),
    "count NaN": ('{"format": 1, "layers": {"new": {"count": NaN}}}', "NaN is not a finite number"),
    "count Infinity": ('{"format": 1, "layers": {"new": {"count": -Infinity}}}', "-Infinity is not a finite number"),
    "count 1e400": ('{"format": 1, "layers": {"new": {"count": 1e400}}}', "count=inf .*expected a finite number"),
    "count a string": (_meta({"new": {"count": "12"}}), "count of layer 'new' is '12': expected a number"),
    "config a list": (_meta({"new": {"config": [1, 2]}}), "config of layer 'new' is a list: expected a mapping"),
    "config key": (_meta({"new": {"config": {**GOOD_CONFIG, "colour": 1}}}), "unknown keys \\['colour'\\]"),
    "kind": (_meta({"new": {"config": {**GOOD_CONFIG, "kind": "weight"}}}), "kind='weight': expected one of"),
    "convention": (_meta({"new": {"config": {**GOOD_CONFIG, "convention": "tf"}}}), "convention='tf'"),
    "momentum": (_meta({"new": {"config": {**GOOD_CONFIG, "momentum": 1e30}}}), "momentum=1e\\+30"),
    "epsilon": (_meta({"new": {"config": {**GOOD_CONFIG, "epsilon": -1}}}), "epsilon=-1.0"),
    "axis": (_meta({"new": {"config": {**GOOD_CONFIG, "axis": [1, 1]}}}), "names an axis twice"),
    "groups": (_meta({"new": {"config": {"kind": "group", "groups": 0}}}), "groups=0"),
    "shape": (_meta({"new": {"config": {**GOOD_CONFIG, "num_features": [4]}}}), "keeps statistics of shape \\(4,\\)"),
    "lazy entry": (_meta({"lazy": {"config": {"momentum": 2}}}), "layer 'lazy'.*momentum=2"),
    "bad name": (_meta({"bad name": {}}), "'bad name' is not valid"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_metadata_is_rejected_and_changes_nothing(store, assert_unchanged, tmp_path, rng, case):
    store.create_layer("bn", num_features=3).update(np_moments(rng.normal(size=(4, 3)), [0]))
    text, message = MALFORMED[case]
    tensors = {"bn/moving_mean": np.zeros(3), "bn/moving_variance": np.ones(3),
               "new/moving_mean": np.zeros(3), "new/moving_variance": np.ones(3)}
    path = _with_metadata(tmp_path, text, tensors)
    with assert_unchanged(store), pytest.raises(InvalidArgument, match=message) as info:
        store.import_(path)
    assert info.value.field == "path" and str(path) in info.value.message
    assert store.list_layers() == ["bn"]


def test_num_batches_tracked_must_be_an_integer_scalar(store, assert_unchanged, tmp_path):
    for bad in (np.array(2.0), np.array([1, 2], np.int64), np.array(-3, np.int64), np.array(2**64 - 1, np.uint64)):
        path = _file(tmp_path, {"bn.running_mean": np.zeros(2), "bn.running_var": np.ones(2),
                                "bn.num_batches_tracked": bad})
        with assert_unchanged(store), pytest.raises(InvalidArgument, match="num_batches") as info:
            store.import_(path, naming="torch")
        assert info.value.field == "path"
    assert store.list_layers() == []


def test_a_config_from_the_file_creates_the_layer(store, tmp_path):
    config = {"kind": "group", "axis": 1, "groups": 3, "convention": "torch", "momentum": None, "epsilon": 1e-4}
    path = _with_metadata(tmp_path, _meta({"gn": {"config": config, "count": 12.0, "num_batches": 4}}),
                          {"gn/moving_mean": np.arange(3.0), "gn/moving_variance": np.ones(3)})
    assert store.import_(path) == ["gn"]
    gn = store.layer("gn")
    assert gn.config().to_dict() == {**config, "center": True, "scale": True, "num_features": None}
    s = gn.stats()
    assert (s.mean.tolist(), s.count, s.num_batches, s.version) == ([0.0, 1.0, 2.0], 12.0, 4, 1)


def test_import_is_one_transaction(store, tmp_path, monkeypatch):
    """Creating the layers and writing their statistics is one backend call (one transaction)."""
    names = [f"net/bn{i}" for i in range(50)]
    tensors = {}
    for n in names:
        tensors[f"{n}/moving_mean"], tensors[f"{n}/moving_variance"] = np.zeros(2), np.ones(2)
    path = _file(tmp_path, tensors, "many.safetensors")
    calls = []

    def spy(method):
        original = getattr(store.backend, method)
        return lambda *args, **kwargs: calls.append(method) or original(*args, **kwargs)

    for method in ("insert", "mutate", "delete"):
        monkeypatch.setattr(store.backend, method, spy(method))
    assert store.import_(path) == sorted(names)
    assert calls == ["mutate"]
    assert all(store.layer(n).stats().version == 1 for n in names)


def test_import_from_the_files_bytes(store, tmp_path, rng):
    # ImportStats hands the store the bytes it received: no temporary file, and no path in any message
    store.create_layer("net/bn", num_features=3).update(np_moments(rng.normal(size=(8, 3)), [0]))
    path = tmp_path / "stats.safetensors"
    store.export(path, naming="torch")
    data = path.read_bytes()
    assert store.import_(data, naming="torch", add_prefix="copy/") == ["copy/net/bn"]
    np.testing.assert_array_equal(store.layer("copy/net/bn").stats().mean, store.layer("net/bn").stats().mean)
    for bad in (b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", data[: len(data) // 2]):
        with pytest.raises(InvalidArgument, match="^the file") as info:
            store.import_(bad, naming="torch", add_prefix="other/")
        assert info.value.field == "path" and str(tmp_path) not in str(info.value)
    assert not store.list_layers("other/")


@pytest.mark.parametrize("naming, sep", [("keras", "/"), ("torch", ".")])
def test_renorm_statistics_travel_with_their_layer(store, tmp_path, rng, naming, sep):
    layer = store.create_layer("m/bn", renorm=True, renorm_clipping={"rmax": 2.0}, num_features=3)
    for _ in range(2):
        layer.update(np_moments(rng.normal(1.0, 2.0, size=(6, 3)), [0]))
    path = tmp_path / "r.safetensors"
    store.export(path, naming=naming)
    tensors = load_file(str(path))
    stats = layer.stats()
    for leaf, value in zip(("moving_stddev", "renorm_mean", "renorm_stddev"), stats.renorm):
        np.testing.assert_array_equal(tensors[f"m/bn{sep}{leaf}"], value)
    with Store.open("memory://") as fresh:
        fresh.import_(path, naming=naming)
        back = fresh.layer("m/bn").stats()
        assert fresh.layer("m/bn").config() == layer.config()
        for got, want in zip(back.renorm, stats.renorm):
            np.testing.assert_array_equal(got, want)
    # all three of renorm's tensors or none; and only for a layer with renorm
    del tensors[f"m/bn{sep}renorm_stddev"]
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(InvalidArgument, match="no renorm_stddev tensor in the file"):
        store.import_(tmp_path / "partial.safetensors", naming=naming)
    plain = {k: v for k, v in load_file(str(path)).items()}
    store.create_layer("plain", num_features=3)
    save_file({k.replace("m/bn", "plain"): v for k, v in plain.items()}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InvalidArgument, match="'plain' has no renorm: expected no moving_stddev"):
        store.import_(tmp_path / "plain.safetensors", naming=naming)
    assert layer.stats() == stats
