"""normsvc.keras against Keras' own BatchNormalization (Keras 3, torch backend).

The references are plain ``keras.layers.BatchNormalization`` layers fed the
concatenated batches of every rank: what one process would have seen.  Two
worker processes (tests/keras_workers.py) train against a real server for the
data-parallel cases; everything else runs in this process against a Store or
an in-process server.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported

import inspect
import re
import subprocess
import sys
import uuid
from pathlib import Path

import keras
import numpy as np
import pytest
import torch

import keras_workers as kw
import normsvc
from normsvc.keras import SharedBatchNormalization, connect, load_moving_stats, share
from normsvc.testing import reference_moments, running_server

if keras.backend.backend() != "torch":  # Keras was imported before this module, with another backend
    pytest.skip(f"normsvc.keras trains on the torch backend; Keras runs on {keras.backend.backend()!r}",
                allow_module_level=True)

# Keras' variables hand numpy a torch tensor whose __array__ predates numpy 2's copy keyword: not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

WORKERS = Path(kw.__file__)
#: Keras 3.10 and 3.11's BatchNormalization have no batch renormalization.
KERAS_RENORM = "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters
needs_renorm = pytest.mark.skipif(not KERAS_RENORM, reason="this Keras' BatchNormalization has no renorm")
README = Path(__file__).resolve().parents[1] / "README.md"


def _plain_bn(**kwargs):
    return keras.layers.BatchNormalization(**kwargs)


def _reference_moving(batches, momentum):
    """Moving statistics of one plain Keras BatchNormalization after each batch: [(mean, variance)]."""
    bn = _plain_bn(momentum=momentum)
    out = []
    for x in batches:
        bn(x, training=True)
        out.append((bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()))
    return out


# --- two ranks against a real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both workers' results (rank -> {key: array}) and the server's final statistics (layer -> RunningStats)."""
    tmp = tmp_path_factory.mktemp("keras_ranks")
    run = uuid.uuid4().hex
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(WORKERS.parent)}
    with running_server() as server:
        procs = [subprocess.Popen([sys.executable, str(WORKERS), server.address, run, str(rank), "2",
                                   str(tmp / "gloo"), str(tmp / f"rank{rank}.npz")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in range(2)]
        failures = []
        for rank, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=150)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            if p.returncode:
                failures.append(f"rank {rank} exited {p.returncode}:\n{err[-3000:]}")
        assert not failures, "\n".join(failures)
        with normsvc.Client(server.address) as client:
            stats = {name: client.layer(name).stats() for name in (kw.SHARED_LAYER, kw.SYNC_LAYER)}
            assert client.list_layers() == sorted([kw.SHARED_LAYER, kw.SYNC_LAYER])
    results = {rank: dict(np.load(tmp / f"rank{rank}.npz")) for rank in range(2)}
    return results, stats


def test_shared_mode_moving_stats_equal_one_bn_fed_the_concatenated_batches(ranks):
    results, stats = ranks
    steps = [np.concatenate([kw.shared_batch(rank, step)[0] for rank in range(2)]) for step in range(kw.STEPS)]
    ref = _reference_moving(steps, kw.MOMENTUM)
    initial = (np.zeros(kw.FEATURES, np.float32), np.ones(kw.FEATURES, np.float32))
    for rank, r in results.items():
        assert int(r["shared/step"][0]) == kw.STEPS
        for step in range(kw.STEPS):
            last = int(r["shared/last_step"][step])
            assert -1 <= last <= step  # the answer holds every step applied so far, never a later one
            mean, variance = ref[last] if last >= 0 else initial
            np.testing.assert_allclose(r["shared/mean"][step], mean, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(r["shared/variance"][step], variance, rtol=1e-6, atol=1e-6)
        # after every rank's last step: exactly one BatchNormalization on the concatenated batches
        assert int(r["shared/pulled_last_step"][0]) == kw.STEPS - 1
        np.testing.assert_allclose(r["shared/pulled_mean"], ref[-1][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(r["shared/pulled_variance"], ref[-1][1], rtol=1e-6, atol=1e-6)
    # the last rank to contribute to a step gets that step back at once
    for step in range(kw.STEPS):
        assert max(int(results[rank]["shared/last_step"][step]) for rank in range(2)) == step
    final = stats[kw.SHARED_LAYER]
    assert final.num_batches == kw.STEPS and final.last_step == kw.STEPS - 1
    assert final.count == sum(kw.SHARED_BATCH) * 3 * kw.STEPS
    np.testing.assert_allclose(final.mean, ref[-1][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(final.variance, ref[-1][1], rtol=1e-6, atol=1e-6)


def test_sync_mode_outputs_and_gradients_equal_one_process_on_the_concatenated_batch(ranks):
    results, stats = ranks
    model = kw.sync_model(_plain_bn(momentum=kw.MOMENTUM, name="bn"))
    bn = model.get_layer("bn")
    bounds = np.cumsum([0, *kw.SYNC_BATCH])  # rank 0 has 6 samples, rank 1 has 10
    for step in range(kw.STEPS):
        x, r = (np.concatenate(parts) for parts in zip(*(kw.sync_batch(rank, step) for rank in range(2))))
        ref = kw.forward_backward(model, x, r)
        for rank in range(2):
            got = {key[len("sync/"):]: value[step] for key, value in results[rank].items() if key.startswith("sync/")}
            rows = slice(bounds[rank], bounds[rank + 1])
            np.testing.assert_allclose(got["y"], ref["y"][rows], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["dx"], ref["dx"][rows], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["mean"], bn.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got["variance"], bn.moving_variance.numpy(), rtol=1e-6, atol=1e-6)
            assert got["last_step"] == step  # the allreduce answers after its step's update
        # each rank's weight gradients are its share: summed (the trainer's all-reduce), one process's
        for name in ("kernel", "bias", "gamma", "beta"):
            total = sum(results[rank][f"sync/{name}"][step] for rank in range(2))
            np.testing.assert_allclose(total, ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    final = stats[kw.SYNC_LAYER]
    assert final.num_batches == kw.STEPS and final.count == sum(kw.SYNC_BATCH) * kw.STEPS
    np.testing.assert_allclose(final.variance, bn.moving_variance.numpy(), rtol=1e-6, atol=1e-6)


# --- one process, in-process store --------------------------------------------------------------------


@pytest.fixture
def store():
    s = normsvc.Store.open("memory://")
    yield s
    s.close()


def test_a_single_rank_trains_as_keras_does_with_a_mask(store, rng):
    shared = SharedBatchNormalization(store, momentum=0.8, epsilon=1e-2, name="bn")
    plain = _plain_bn(momentum=0.8, epsilon=1e-2)
    counted = 0
    for step in range(3):
        x = rng.normal(1.0, 2.0, size=(4, 6, 3)).astype(np.float32)
        mask = rng.random((4, 6)) < 0.7
        y_shared = shared(x, training=True, mask=torch.tensor(mask))
        y_plain = plain(x, training=True, mask=torch.tensor(mask))
        np.testing.assert_allclose(keras.ops.convert_to_numpy(y_shared), keras.ops.convert_to_numpy(y_plain),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(shared.moving_mean.numpy(), plain.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(shared.moving_variance.numpy(), plain.moving_variance.numpy(), rtol=1e-6,
                                   atol=1e-6)
        counted += int(mask.sum())
        assert shared.last_stats.count == counted  # masked positions are not counted
    assert shared.step == 3 and shared.service_name == "bn"
    stats = store.layer("bn").stats()
    assert (stats.num_batches, stats.last_step, stats.version) == (3, 2, 3)


def test_inference_and_a_frozen_layer_never_call_the_service(store, rng):
    shared = SharedBatchNormalization(store, name="bn")
    x = rng.normal(size=(8, 3)).astype(np.float32)
    shared(x, training=True)
    version = store.layer("bn").stats().version
    plain = _plain_bn()
    plain.build((None, 3))
    plain.set_weights(shared.get_weights())
    expected = keras.ops.convert_to_numpy(plain(x, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(shared(x, training=False)), expected, rtol=1e-6)
    shared.trainable = False  # frozen: inference mode, as Keras' BatchNormalization
    np.testing.assert_allclose(keras.ops.convert_to_numpy(shared(x, training=True)), expected, rtol=1e-6)
    assert store.layer("bn").stats().version == version and shared.step == 1


def test_a_step_the_run_already_applied_is_refused_not_skipped(store, rng):
    x = rng.normal(size=(8, 3)).astype(np.float32)
    SharedBatchNormalization(store, run="r", name="bn")(x, training=True)
    again = SharedBatchNormalization(store, run="r", name="bn")  # a rerun that reuses step 0 of run "r"
    with pytest.raises(normsvc.FailedPrecondition):
        again(x, training=True)
    assert again.step == 0 and store.layer("bn").stats().num_batches == 1
    SharedBatchNormalization(store, run="r2", name="bn")(x, training=True)  # a new run starts fresh
    assert store.layer("bn").stats().num_batches == 2


# --- share -----------------------------------------------------------------------------------------------


def _trained(model, rng, shape):
    model.compile(optimizer="sgd", loss="mse")
    for _ in range(2):
        x = rng.normal(0.5, 2.0, size=(8, *shape)).astype(np.float32)
        model.train_on_batch(x, np.zeros((8, *model.output_shape[1:]), np.float32))
    return model


def test_share_converts_a_sequential_model_and_keeps_its_weights(store, rng):
    model = _trained(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(),
                                       keras.layers.Dense(2), keras.layers.BatchNormalization(momentum=0.5)],
                                      name="seq"), rng, (4,))
    shared = share(model, store, prefix="p/")
    assert [type(layer).__name__ for layer in shared.layers] == [
        "Dense", "SharedBatchNormalization", "Dense", "SharedBatchNormalization"]
    assert [v.path for v in shared.variables] == [v.path for v in model.variables]
    for a, b in zip(model.get_weights(), shared.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert shared.layers[3].momentum == 0.5
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(shared(x)), keras.ops.convert_to_numpy(model(x)),
                               rtol=1e-6)
    shared(x, training=True)
    paths = [v.path.rsplit("/", 1)[0] for v in model.variables if v.path.endswith("/moving_mean")]
    assert store.list_layers() == sorted("p/" + p for p in paths)
    # the fresh service layers started from the trained model's statistics: one more step of the plain model
    model(x, training=True)
    for plain, converted in ((model.layers[1], shared.layers[1]), (model.layers[3], shared.layers[3])):
        stats = store.layer(converted.service_name).stats()
        for ours, keras_value in ((stats.mean, plain.moving_mean), (stats.variance, plain.moving_variance),
                                  (converted.moving_mean.numpy(), plain.moving_mean)):
            np.testing.assert_allclose(ours, keras_value.numpy(), rtol=1e-6, atol=1e-6)
        assert stats.num_batches == 1


def test_share_converts_a_functional_model_with_a_nested_model(store, rng):
    inner = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(name="bn2"),
                              keras.layers.Dense(2)], name="inner")
    inputs = keras.Input((4,))
    h = keras.layers.BatchNormalization(name="bn1")(keras.layers.Dense(3)(inputs))
    model = _trained(keras.Model(inputs, inner(h), name="func"), rng, (4,))
    shared = share(model, store, mode="shared", prefix="f/")
    kinds = [type(layer).__name__ for layer in normsvc.keras._all_layers(shared)]
    assert kinds.count("SharedBatchNormalization") == 2 and "BatchNormalization" not in kinds
    for a, b in zip(model.get_weights(), shared.get_weights()):
        np.testing.assert_array_equal(a, b)
    shared(rng.normal(size=(5, 4)).astype(np.float32), training=True)
    assert store.list_layers() == ["f/bn1", "f/inner/bn2"]  # prefix + the Keras paths


@needs_renorm
def test_share_refuses_batch_renormalization(store):
    renorm = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization(renorm=True, name="rn")])
    with pytest.raises(normsvc.InvalidArgument, match="'rn' has renorm=True"):
        share(renorm, store)


def test_share_refuses_what_it_cannot_clone(store):
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    with pytest.raises(normsvc.InvalidArgument, match="subclassed"):
        share(Sub(), store)
    with pytest.raises(normsvc.InvalidType, match="keras.Model"):
        share(keras.layers.BatchNormalization(), store)


# --- load_moving_stats ------------------------------------------------------------------------------


def _two_bn_model():
    return keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn1"), keras.layers.Dense(3),
                             keras.layers.BatchNormalization(name="bn2")], name="seq")


@pytest.fixture
def filled(store, rng):
    """A store with layers m/seq/bn1 (4 features) and m/seq/bn2 (3), each updated with its own data."""
    for name, width, loc in (("m/seq/bn1", 4, 1.0), ("m/seq/bn2", 3, -2.0)):
        store.create_layer(name, num_features=width, momentum=0.5)
        for _ in range(2):
            store.layer(name).update(reference_moments(rng.normal(loc, 3.0, size=(16, width)), axes=0))
    return store


def _assert_loaded(model, store):
    for layer in (model.get_layer("bn1"), model.get_layer("bn2")):
        stats = store.layer("m/" + layer.moving_mean.path.rsplit("/", 1)[0]).stats()
        np.testing.assert_allclose(layer.moving_mean.numpy(), stats.mean, rtol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), stats.variance, rtol=1e-6)
        assert not np.allclose(stats.mean, 0.0)


def test_load_moving_stats_from_a_store_a_client_and_a_file(filled, tmp_path):
    model = _two_bn_model()
    assert load_moving_stats(model, filled, prefix="m/") == ["m/seq/bn1", "m/seq/bn2"]
    _assert_loaded(model, filled)

    model = _two_bn_model()
    with running_server(filled) as server, normsvc.Client(server.address) as client:
        load_moving_stats(model, client, prefix="m/")
    _assert_loaded(model, filled)

    for dtype in ("float64", "float32"):
        path = tmp_path / f"stats-{dtype}.safetensors"
        filled.export(path, prefix="m/", strip_prefix=True, dtype=dtype)  # seq/bn1/moving_mean, ...
        model = _two_bn_model()
        assert load_moving_stats(model, path) == ["seq/bn1", "seq/bn2"]
        _assert_loaded(model, filled)
        model = _two_bn_model()
        load_moving_stats(model, str(path))
        _assert_loaded(model, filled)
    if not KERAS_RENORM:
        return
    # a renorm layer's inference reads moving_stddev: it follows the variance
    rn = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(renorm=True, name="bn1")], name="seq")
    load_moving_stats(rn, filled, prefix="m/")
    stats = filled.layer("m/seq/bn1").stats()
    np.testing.assert_allclose(rn.layers[0].moving_stddev.numpy(), np.sqrt(stats.variance + 1e-3), rtol=1e-6)


def test_load_moving_stats_names_what_is_missing_or_mis_shaped_and_changes_nothing(filled, tmp_path):
    model = _two_bn_model()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(normsvc.LayerNotFound, match=r"no layer 'x/seq/bn1' .*'seq/bn1/moving_mean'") as info:
        load_moving_stats(model, filled, prefix="x/")
    assert info.value.layer == "x/seq/bn1"
    filled.create_layer("x/seq/bn1", num_features=4)
    with running_server(filled) as server, normsvc.Client(server.address) as client:  # the same, remotely
        with pytest.raises(normsvc.LayerNotFound, match=r"no layer 'x/seq/bn2' .*'seq/bn2/moving_mean'") as info:
            load_moving_stats(model, client, prefix="x/")
    assert info.value.layer == "x/seq/bn2"
    filled.delete_layer("m/seq/bn2")
    filled.create_layer("m/seq/bn2", num_features=5)
    with pytest.raises(normsvc.InvalidArgument, match=r"'m/seq/bn2' has moving_mean of shape \[5\]: expected \[3\]"):
        load_moving_stats(model, filled, prefix="m/")
    path = tmp_path / "one.safetensors"
    filled.export(path, layers="m/seq/bn1", prefix=None, strip_prefix="m/")
    with pytest.raises(normsvc.LayerNotFound, match=r"no tensor 'seq/bn2/moving_mean' in .*one.safetensors"):
        load_moving_stats(model, path)
    with pytest.raises(normsvc.LayerNotFound, match="no safetensors file"):
        load_moving_stats(model, tmp_path / "absent.safetensors")
    for a, b in zip(before, model.get_weights()):  # all or nothing: bn1 was found, and still not written
        np.testing.assert_array_equal(a, b)
    with pytest.raises(normsvc.InvalidType, match="source="):
        load_moving_stats(model, 42)
    with pytest.raises(normsvc.FailedPrecondition, match="not built"):
        load_moving_stats(keras.Sequential([keras.layers.BatchNormalization()]), filled)


# --- serialization --------------------------------------------------------------------------------------


def test_get_config_round_trips_and_keeps_an_address_never_a_store(store, tmp_path, rng):
    layer = SharedBatchNormalization("127.0.0.1:9", momentum=0.9, epsilon=1e-4, mode="sync", rank=1, world_size=2,
                                     run="r", prefix="p/", name="bn")
    config = layer.get_config()
    assert config["target"] == "127.0.0.1:9" and config["mode"] == "sync" and config["prefix"] == "p/"
    again = SharedBatchNormalization.from_config(config)
    assert again.get_config() == config and again.target == "127.0.0.1:9"

    model = keras.Sequential([keras.Input((3,)), layer, keras.layers.Dense(1)], name="saved")
    model.layers[0].set_weights([np.full(3, v, np.float32) for v in (2.0, 0.5, -1.0, 4.0)])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")  # registered: no custom_objects needed
    bn = loaded.layers[0]
    assert isinstance(bn, SharedBatchNormalization)
    # built, the layer keeps its service name: a loaded Sequential's variables lose the model's name
    assert layer.get_config() == bn.get_config() == {**config, "layer_name": "p/saved/bn"}
    assert bn.moving_mean.path == "bn/moving_mean" and bn.service_name == "p/saved/bn"
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)

    # a Store cannot be saved: the loaded layer has no target until connect() gives it one
    local = keras.Sequential([keras.Input((3,)), SharedBatchNormalization(store, name="bn")], name="local")
    assert local.layers[0].get_config()["target"] is None
    local.save(tmp_path / "local.keras")
    loaded = keras.saving.load_model(tmp_path / "local.keras")
    x = rng.normal(size=(4, 3)).astype(np.float32)
    with pytest.raises(normsvc.FailedPrecondition, match="no target"):
        loaded(x, training=True)
    assert connect(loaded, store) == ["local/bn"]
    loaded(x, training=True)
    assert store.layer("local/bn").stats().num_batches == 1
    with running_server(store) as server, normsvc.Client(server.address) as client:
        assert SharedBatchNormalization(client).get_config()["target"] == server.address


# --- arguments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="global"), normsvc.InvalidArgument, "mode='global': expected 'shared' or 'sync'"),
    (dict(rank=0), normsvc.InvalidArgument, "expected both or neither"),
    (dict(rank=2, world_size=2), normsvc.InvalidArgument, "rank=2"),
    (dict(rank=0, world_size=0), normsvc.InvalidArgument, "world_size=0"),
    (dict(run=3), normsvc.InvalidArgument, "run=3"),
    (dict(synchronized=True), normsvc.InvalidArgument, "expected mode='sync'"),
    (dict(renorm=True), normsvc.InvalidArgument, "renorm=True"),
    (dict(layer_name=""), normsvc.InvalidArgument, "layer_name=''"),
    (dict(prefix=1), normsvc.InvalidType, "prefix=1"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=re.escape(match)):
        SharedBatchNormalization("127.0.0.1:9", **kwargs)


def test_bad_targets_are_named(store):
    with pytest.raises(normsvc.InvalidType, match="target=42"):
        SharedBatchNormalization(42)
    with pytest.raises(normsvc.InvalidArgument, match="target=''"):
        SharedBatchNormalization("")
    with pytest.raises(normsvc.InvalidArgument, match="mode='sync' needs a server"):
        SharedBatchNormalization(store, mode="sync")
    layer = SharedBatchNormalization(None, mode="sync", name="sbn")
    model = keras.Sequential([keras.Input((2,)), layer])
    with pytest.raises(normsvc.InvalidArgument, match="layer 'sbn' has mode='sync', which needs a server"):
        connect(model, store)
    with pytest.raises(normsvc.InvalidArgument, match="needs a server"):
        layer.target = store
    with pytest.raises(normsvc.InvalidType, match="target=42"):
        layer.target = 42
    assert layer.target is None


def test_a_bad_layer_name_is_refused_by_the_service_naming_it(store):
    with pytest.raises(normsvc.InvalidArgument, match="a/../b"):
        SharedBatchNormalization(store, layer_name="a/../b")(np.ones((2, 2), np.float32), training=True)


# --- packaging and docs ---------------------------------------------------------------------------------


def test_import_normsvc_does_not_import_keras():
    code = "import sys, normsvc; normsvc.Client; assert 'keras' not in sys.modules, 'keras imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_readme_example_runs(store):
    text = README.read_text()
    body = text.split("## Keras\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", body, flags=re.S)[0]
    with running_server() as server:
        env = dict(os.environ, NORMSVC_TARGET=server.address)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["1", "True"]
