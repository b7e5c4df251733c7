"""normsvc.keras against Keras' own BatchNormalization (Keras 3, torch backend).

The references are plain ``keras.layers.BatchNormalization`` layers fed the
concatenated batches of every rank: what one process would have seen.  Two
worker processes (tests/keras_workers.py) train against a real server for the
data-parallel cases; everything else runs in this process against a Store or
an in-process server.  Batch renormalization and virtual batches follow the
golden files of tf_keras 2.21 (tests/golden/tf_keras/, as
tests/test_golden_tf_keras.py reads them); float64 numpy is the reference for
virtual batches over several ranks, which neither Keras has.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported

import contextlib
import json
import re
import subprocess
import sys
import time
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
README = Path(__file__).resolve().parents[1] / "README.md"
#: The test extra allows keras>=3.10, and Keras' BatchNormalization has renorm only in later 3.x releases
#: (keras-team/keras#22047): with an older Keras the renorm tests skip, saying why (never a silent pass).
KERAS_RENORM = kw.keras_has_renorm()
NO_KERAS_RENORM = (f"keras {keras.__version__}'s BatchNormalization has no renorm, which SharedBatchNormalization"
                   "(renorm=True) builds on: install a Keras that has it to test batch renormalization")
needs_renorm = pytest.mark.skipif(not KERAS_RENORM, reason=NO_KERAS_RENORM)
GOLDEN = Path(__file__).parent / "golden" / "tf_keras"
GOLDEN_CASES = {case["name"]: case for case in json.loads((GOLDEN / "index.json").read_text())["cases"]}
#: tf_keras ran in float32: float32's tolerances (as tests/test_golden_tf_keras.py)
GOLDEN_TOL = dict(rtol=2e-5, atol=2e-5)
#: Keras' initial moving variables, renorm's included, in kw.MOVING's order
INITIAL = (0.0, 1.0, 1.0, 0.0, 1.0)


def _plain_bn(**kwargs):
    return keras.layers.BatchNormalization(**kwargs)


def _reference_moving(batches, momentum, **options):
    """Moving variables of one plain Keras BatchNormalization after each batch: [(mean, variance, ...)]
    (with renorm also moving_stddev, renorm_mean and renorm_stddev)."""
    bn = _plain_bn(momentum=momentum, **options)
    out = []
    for x in batches:
        bn(x, training=True)
        out.append(tuple(getattr(bn, leaf).numpy().copy() for leaf in _leaves(bn)))
    return out


def _leaves(layer) -> tuple:
    """The names of a BatchNormalization's moving variables (kw.MOVING with renorm, the first two without)."""
    return kw.MOVING if getattr(layer, "renorm", False) else kw.MOVING[:2]


def _service_values(stats) -> dict:
    """A RunningStats as {Keras variable name: array}."""
    return dict(zip(kw.MOVING, (stats.mean, stats.variance, *(stats.renorm or ()))))


def _numpy(y) -> np.ndarray:
    return keras.ops.convert_to_numpy(y)


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
        names = [kw.SHARED_LAYER, kw.SYNC_LAYER] + ([kw.RENORM_LAYER, kw.RENORM_SYNC_LAYER] if KERAS_RENORM else [])
        with normsvc.Client(server.address) as client:
            stats = {name: client.layer(name).stats() for name in names}
            assert client.list_layers() == sorted(names)
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


@needs_renorm
def test_shared_mode_with_renorm_equals_one_renorm_bn_fed_the_concatenated_batches(ranks):
    results, stats = ranks
    steps = [np.concatenate([kw.shared_batch(rank, step)[0] for rank in range(2)]) for step in range(kw.STEPS)]
    ref = _reference_moving(steps, kw.MOMENTUM, **kw.RENORM)
    initial = tuple(np.full(kw.FEATURES, value, np.float32) for value in INITIAL)
    for rank, r in results.items():
        held = initial  # the renorm averages the layer holds before each call: the previous call's answer
        for step in range(kw.STEPS):
            # the output: this rank's batch renormalized towards the averages it held, as Keras renormalizes
            plain = _plain_bn(momentum=kw.MOMENTUM, **kw.RENORM)
            plain.build((None, 3, kw.FEATURES))
            plain.renorm_mean.assign(held[3])
            plain.renorm_stddev.assign(held[4])
            x = kw.shared_batch(rank, step)[0]
            np.testing.assert_allclose(r["renorm/y"][step], _numpy(plain(x, training=True)), rtol=1e-5, atol=1e-5)
            last = int(r["renorm/last_step"][step])
            assert -1 <= last <= step
            held = ref[last] if last >= 0 else initial
            for leaf, want in zip(kw.MOVING, held):
                np.testing.assert_allclose(r[f"renorm/{leaf}"][step], want, rtol=1e-6, atol=1e-6,
                                           err_msg=f"rank {rank}, step {step}: {leaf}")
        for leaf, want in zip(kw.MOVING, ref[-1]):
            np.testing.assert_allclose(r[f"renorm/pulled_{leaf}"], want, rtol=1e-6, atol=1e-6, err_msg=leaf)
    for step in range(kw.STEPS):
        assert max(int(results[rank]["renorm/last_step"][step]) for rank in range(2)) == step
    final = stats[kw.RENORM_LAYER]
    assert final.num_batches == kw.STEPS and final.last_step == kw.STEPS - 1
    for leaf, want in zip(kw.MOVING, ref[-1]):
        np.testing.assert_allclose(_service_values(final)[leaf], want, rtol=1e-6, atol=1e-6, err_msg=leaf)


@pytest.mark.parametrize("scenario", ["sync", pytest.param("renorm_sync", marks=needs_renorm)])
def test_sync_mode_outputs_and_gradients_equal_one_process_on_the_concatenated_batch(ranks, scenario):
    results, stats = ranks
    options = kw.RENORM if scenario == "renorm_sync" else {}
    model = kw.sync_model(_plain_bn(momentum=kw.MOMENTUM, name="bn", **options))
    bn = model.get_layer("bn")
    bounds = np.cumsum([0, *kw.SYNC_BATCH])  # rank 0 has 6 samples, rank 1 has 10
    prefix = f"{scenario}/"
    for step in range(kw.STEPS):
        x, r = (np.concatenate(parts) for parts in zip(*(kw.sync_batch(rank, step) for rank in range(2))))
        ref = kw.forward_backward(model, x, r)
        for rank in range(2):
            got = {key[len(prefix):]: value[step] for key, value in results[rank].items() if key.startswith(prefix)}
            rows = slice(bounds[rank], bounds[rank + 1])
            np.testing.assert_allclose(got["y"], ref["y"][rows], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["dx"], ref["dx"][rows], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got["mean"], bn.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got["variance"], bn.moving_variance.numpy(), rtol=1e-6, atol=1e-6)
            for leaf in _leaves(bn)[2:]:
                np.testing.assert_allclose(got[leaf], getattr(bn, leaf).numpy(), rtol=1e-6, atol=1e-6, err_msg=leaf)
            assert got["last_step"] == step  # the allreduce answers after its step's update
        # each rank's weight gradients are its share: summed (the trainer's all-reduce), one process's
        for name in ("kernel", "bias", "gamma", "beta"):
            total = sum(results[rank][f"{prefix}{name}"][step] for rank in range(2))
            np.testing.assert_allclose(total, ref[name], rtol=1e-5, atol=1e-5, err_msg=name)
    final = stats[kw.RENORM_SYNC_LAYER if options else kw.SYNC_LAYER]
    assert final.num_batches == kw.STEPS and final.count == sum(kw.SYNC_BATCH) * kw.STEPS
    for leaf in _leaves(bn):
        np.testing.assert_allclose(_service_values(final)[leaf], getattr(bn, leaf).numpy(), rtol=1e-6, atol=1e-6)


# --- one process, in-process store --------------------------------------------------------------------


@pytest.fixture
def store():
    s = normsvc.Store.open("memory://")
    yield s
    s.close()


@pytest.mark.parametrize("options", [{}, pytest.param(kw.RENORM, marks=needs_renorm)],
                         ids=lambda options: "renorm" if options else "plain")
def test_a_single_rank_trains_as_keras_does_with_a_mask(store, rng, options):
    shared = SharedBatchNormalization(store, momentum=0.8, epsilon=1e-2, name="bn", **options)
    plain = _plain_bn(momentum=0.8, epsilon=1e-2, **options)
    counted = 0
    for step in range(3):
        x = rng.normal(1.0 + step, 2.0, size=(4, 6, 3)).astype(np.float32)  # drifting: renorm's r and d clip
        mask = rng.random((4, 6)) < 0.7
        y_shared = shared(x, training=True, mask=torch.tensor(mask))
        y_plain = plain(x, training=True, mask=torch.tensor(mask))
        np.testing.assert_allclose(_numpy(y_shared), _numpy(y_plain), rtol=1e-5, atol=1e-5)
        assert _leaves(shared) == _leaves(plain) == (kw.MOVING if options else kw.MOVING[:2])
        for leaf in _leaves(plain):
            np.testing.assert_allclose(getattr(shared, leaf).numpy(), getattr(plain, leaf).numpy(), rtol=1e-6,
                                       atol=1e-6, err_msg=leaf)
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


# --- batch renormalization and virtual batches: tf_keras' golden files ---------------------------------------


def _golden(name: str) -> tuple[dict, dict, dict, int]:
    """(case, arrays, SharedBatchNormalization options, steps): the steps are those whose clipping is the
    first step's (a layer's clipping is fixed; some cases relax theirs step by step)."""
    case = GOLDEN_CASES[name]
    with np.load(GOLDEN / case["file"], allow_pickle=False) as data:
        g = {key: data[key] for key in data.files}
    args = case["args"]
    options = dict(axis=args["axis"], momentum=args["momentum"], epsilon=args["epsilon"])
    if args["virtual_batch_size"] is not None:
        options["virtual_batch_size"] = args["virtual_batch_size"]
    keys = args.get("clipping_keys", [])
    if args["renorm"]:
        options |= dict(renorm=True, renorm_momentum=args["renorm_momentum"],
                        renorm_clipping={key: float(g[key][0]) for key in keys})
    steps = next((t for t in range(case["steps"]) if any(g[key][t] != g[key][0] for key in keys)), case["steps"])
    return case, g, options, steps


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


def test_sync_mode_reduces_over_one_stream_per_thread_that_close_ends(server, rng):
    """Every reduction of a training step (forward and backward, both layers) is a message of the
    thread's one open stream, none a unary call; close ends it, and training again opens another."""
    from normsvc.keras import close

    run = uuid.uuid4().hex
    with normsvc.Client(server.address) as client:
        inputs = keras.Input((4,))
        h = SharedBatchNormalization(client, mode="sync", rank=0, world_size=1, run=run, prefix="stream/",
                                     name="bn1")(keras.layers.Dense(6)(inputs))
        outputs = SharedBatchNormalization(client, mode="sync", rank=0, world_size=1, run=run, prefix="stream/",
                                           name="bn2")(keras.layers.Dense(3)(h))
        model = keras.Model(inputs, outputs)
        model.compile("sgd", "mse")
        x, y = rng.normal(size=(24, 4)).astype("float32"), rng.normal(size=(24, 3)).astype("float32")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 3 steps
        registry = server.metrics.registry
        # per step and layer: one forward reduction that updates the statistics, one backward that does not
        assert registry.get_sample_value("normsvc_allreduce_steps_total", {"outcome": "completed"}) == 3 * 2 * 2
        assert registry.get_sample_value("normsvc_rpc_requests_total",
                                         {"method": "AllReduceMoments", "code": "OK"}) is None  # no unary call
        assert server.streams.open == 1  # one training thread: one stream for both layers and every step
        close(model)
        deadline = time.monotonic() + 10
        while server.streams.open and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.streams.open == 0
        model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)
        assert server.streams.open == 1
        assert client.layer("stream/bn1").stats().num_batches == 4
        close(model)


@pytest.mark.parametrize("target", ["store", "server"])
@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_the_shared_layer_follows_tf_keras_step_by_step(name, target, store, server):
    case, g, options, steps = _golden(name)
    if options.get("renorm") and not KERAS_RENORM:
        pytest.skip(NO_KERAS_RENORM)
    with contextlib.ExitStack() as stack:
        service = store if target == "store" else stack.enter_context(normsvc.Client(server.address))
        layer = SharedBatchNormalization(service, rank=0, world_size=1, run=uuid.uuid4().hex,
                                         layer_name=f"golden/{name}/{uuid.uuid4().hex}", **options)
        layer.build(g["x"].shape[1:])
        layer.gamma.assign(g["gamma"])
        layer.beta.assign(g["beta"])
        for t in range(steps):
            y = layer(g["x"][t], training=True)
            np.testing.assert_allclose(_numpy(y), g["y"][t], **GOLDEN_TOL, err_msg=f"y at step {t}")
            held = _service_values(service.layer(layer.service_name).stats())
            for leaf in _leaves(layer):
                np.testing.assert_allclose(getattr(layer, leaf).numpy(), g[leaf][t], **GOLDEN_TOL,
                                           err_msg=f"{leaf} at step {t}")
                np.testing.assert_allclose(held[leaf], g[leaf][t], **GOLDEN_TOL, err_msg=f"service {leaf}, step {t}")
        assert layer.step == steps and steps >= 1
        if steps == case["steps"]:
            y = layer(g["x"][-1], training=False)
            np.testing.assert_allclose(_numpy(y), g["y_infer"], **GOLDEN_TOL)


@needs_renorm
@pytest.mark.parametrize("name", sorted(n for n, c in GOLDEN_CASES.items()
                                        if c["args"]["renorm"] and c["args"]["virtual_batch_size"] is None))
def test_keras_own_renorm_follows_tf_keras(name):
    """The reference the data-parallel renorm tests use agrees with tf_keras."""
    case, g, options, steps = _golden(name)
    plain = _plain_bn(**options)
    plain.build(g["x"].shape[1:])
    plain.gamma.assign(g["gamma"])
    plain.beta.assign(g["beta"])
    for t in range(steps):
        np.testing.assert_allclose(_numpy(plain(g["x"][t], training=True)), g["y"][t], **GOLDEN_TOL)
        for leaf in kw.MOVING:
            np.testing.assert_allclose(getattr(plain, leaf).numpy(), g[leaf][t], **GOLDEN_TOL, err_msg=leaf)


@pytest.mark.parametrize("options", [{}, pytest.param(kw.RENORM, marks=needs_renorm)],
                         ids=lambda options: "renorm" if options else "plain")
def test_virtual_batches_of_two_ranks_take_one_update_per_step(store, rng, options):
    """Two ranks (two layers, one store) with virtual batches: each step is one update with the averages
    over every rank's virtual batches, checked against float64 numpy; each rank's output normalizes
    each of its virtual batches (sample i in virtual batch i % (B / v)) with its own statistics."""
    v, m, eps, sizes, c = 2, 0.9, 1e-3, (4, 6), 3
    run = uuid.uuid4().hex
    ranks = [SharedBatchNormalization(store, momentum=m, epsilon=eps, virtual_batch_size=v, rank=rank, world_size=2,
                                      run=run, layer_name="vbn", **options) for rank in range(2)]
    rm, clip = options.get("renorm_momentum"), options.get("renorm_clipping", {})
    # history[k]: the statistics after k steps.  Rank 0 contributes first, so its answer to step s is
    # history[s] (step s still open) and rank 1's is history[s + 1]: what each holds at the next step.
    history = [{leaf: np.full(c, value) for leaf, value in zip(kw.MOVING, INITIAL)}]
    for step in range(3):
        xs = [rng.normal(rank + step, 1.0 + rank, size=(sizes[rank], 2, c)).astype(np.float32) for rank in range(2)]
        ys = [_numpy(layer(x, training=True)) for layer, x in zip(ranks, xs)]
        ghosts = [[x.astype(np.float64)[i::len(x) // v] for i in range(len(x) // v)] for x in xs]
        for rank, (x, y) in enumerate(zip(xs, ys)):
            held = history[max(step - 1 + rank, 0)]
            r, d = np.ones(c), np.zeros(c)
            if options:  # this rank's averages against the renorm averages it held
                mean = np.mean([g.mean(axis=(0, 1)) for g in ghosts[rank]], axis=0)
                stddev = np.sqrt(np.mean([g.var(axis=(0, 1)) for g in ghosts[rank]], axis=0) + eps)
                floor = np.maximum(held["renorm_stddev"], np.sqrt(eps))
                r = np.clip(stddev / floor, clip["rmin"], clip["rmax"])
                d = np.clip((mean - held["renorm_mean"]) / floor, -clip["dmax"], clip["dmax"])
            for i, g in enumerate(ghosts[rank]):
                want = (g - g.mean(axis=(0, 1))) / np.sqrt(g.var(axis=(0, 1)) + eps) * r + d
                np.testing.assert_allclose(y[i::len(x) // v], want, rtol=1e-5, atol=1e-5)
        every = ghosts[0] + ghosts[1]
        bm = np.mean([g.mean(axis=(0, 1)) for g in every], axis=0)
        bv = np.mean([g.var(axis=(0, 1)) for g in every], axis=0)
        s, old = np.sqrt(bv + eps), history[-1]
        new = {"moving_mean": old["moving_mean"] * m + bm * (1 - m)}
        if options:
            new["moving_stddev"] = old["moving_stddev"] * m + s * (1 - m)
            new["moving_variance"] = np.maximum(new["moving_stddev"] ** 2 - eps, 0)
            new["renorm_mean"] = old["renorm_mean"] * rm + bm * (1 - rm)
            new["renorm_stddev"] = old["renorm_stddev"] * rm + s * (1 - rm)
        else:
            new["moving_variance"] = old["moving_variance"] * m + bv * (1 - m)
        history.append(new)
        stats = store.layer("vbn").stats()
        assert stats.last_step == step and stats.count == sum(sizes) * 2 * (step + 1)
        for leaf in _leaves(ranks[0]):
            np.testing.assert_allclose(_service_values(stats)[leaf], new[leaf], rtol=1e-6, atol=1e-7, err_msg=leaf)
            for rank, layer in enumerate(ranks):
                np.testing.assert_allclose(getattr(layer, leaf).numpy(), history[step + rank][leaf], rtol=1e-6,
                                           atol=1e-6, err_msg=f"rank {rank}: {leaf}")
    assert store.layer("vbn").config().virtual_batch_size == v


def test_virtual_batches_name_what_they_cannot_take(store):
    layer = SharedBatchNormalization(store, virtual_batch_size=4, name="vb")
    with pytest.raises(normsvc.InvalidArgument, match=r"a batch of 6 with virtual_batch_size=4: expected a "
                                                      r"positive multiple"):
        layer(np.ones((6, 3), np.float32), training=True)
    with pytest.raises(normsvc.InvalidArgument, match="virtual_batch_size=4 takes no mask"):
        layer(np.ones((4, 3), np.float32), training=True, mask=torch.ones((4,), dtype=torch.bool))
    with pytest.raises(normsvc.InvalidArgument, match="axis=0 is the batch axis"):
        SharedBatchNormalization(store, axis=0, virtual_batch_size=2, name="vb0").build((4, 3))
    assert layer.step == 0 and store.list_layers() == []
    # inference normalizes every sample with the moving statistics: any batch size
    assert _numpy(layer(np.ones((3, 3), np.float32), training=False)).shape == (3, 3)


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
def test_share_keeps_batch_renormalization_and_seeds_its_statistics(store, rng):
    clipping = {"rmax": 1.5, "dmax": 0.5}
    model = _trained(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
                                       keras.layers.BatchNormalization(renorm=True, renorm_clipping=clipping,
                                                                       renorm_momentum=0.7, name="rn")],
                                      name="rseq"), rng, (4,))
    shared = share(model, store)
    bn, plain = shared.get_layer("rn"), model.get_layer("rn")
    assert isinstance(bn, SharedBatchNormalization)
    assert (bn.renorm, bn.renorm_clipping, bn.renorm_momentum) == (True, clipping, 0.7)
    assert [v.path for v in shared.variables] == [v.path for v in model.variables]
    for a, b in zip(model.get_weights(), shared.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(plain.renorm_mean.numpy(), 0.0)  # trained: the renorm statistics count
    x = rng.normal(1.0, 2.0, size=(6, 4)).astype(np.float32)
    np.testing.assert_allclose(_numpy(shared(x, training=True)), _numpy(model(x, training=True)), rtol=1e-5,
                               atol=1e-5)
    config = store.layer("rseq/rn").config()
    assert (config.renorm, config.renorm_clipping, config.renorm_momentum) == (True, clipping, 0.7)
    # the fresh service layer started from the trained model's five statistics: one step of the plain model
    stats = store.layer("rseq/rn").stats()
    assert stats.num_batches == 1
    for leaf in kw.MOVING:
        want = getattr(plain, leaf).numpy()
        np.testing.assert_allclose(_service_values(stats)[leaf], want, rtol=1e-6, atol=1e-6, err_msg=leaf)
        np.testing.assert_allclose(getattr(bn, leaf).numpy(), want, rtol=1e-6, atol=1e-6, err_msg=leaf)


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


@needs_renorm
def test_load_moving_stats_reads_renorm_statistics_when_the_source_has_them(filled, tmp_path, rng):
    def renorm_model():
        return keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(renorm=True, name="bn1")],
                                name="seq")

    # a source without them: moving_stddev follows the variance (a renorm layer's inference reads it)
    rn = renorm_model()
    load_moving_stats(rn, filled, prefix="m/")
    stats = filled.layer("m/seq/bn1").stats()
    np.testing.assert_allclose(rn.layers[0].moving_stddev.numpy(), np.sqrt(stats.variance + 1e-3), rtol=1e-6)
    np.testing.assert_array_equal(rn.layers[0].renorm_mean.numpy(), np.zeros(4))

    filled.create_layer("r/seq/bn1", num_features=4, momentum=0.5, renorm=True, renorm_momentum=0.6)
    for _ in range(2):
        filled.layer("r/seq/bn1").update(reference_moments(rng.normal(2.0, 3.0, size=(16, 4)), axes=0))
    want = _service_values(filled.layer("r/seq/bn1").stats())
    path = tmp_path / "renorm.safetensors"
    filled.export(path, layers="r/seq/bn1", prefix=None, strip_prefix="r/")
    with running_server(filled) as server, normsvc.Client(server.address) as client:
        for source, prefix in ((filled, "r/"), (client, "r/"), (path, None)):
            rn = renorm_model()
            load_moving_stats(rn, source, prefix=prefix)
            for leaf in kw.MOVING:
                np.testing.assert_allclose(getattr(rn.layers[0], leaf).numpy(), want[leaf], rtol=1e-6, err_msg=leaf)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(name="bn1")], name="seq")
    load_moving_stats(plain, filled, prefix="r/")  # a layer without renorm takes the mean and the variance
    np.testing.assert_allclose(plain.layers[0].moving_variance.numpy(), want["moving_variance"], rtol=1e-6)

    from safetensors.numpy import save_file

    partial = tmp_path / "partial.safetensors"
    save_file({f"seq/bn1/{leaf}": want[leaf] for leaf in kw.MOVING[:4]}, partial)
    rn = renorm_model()
    with pytest.raises(normsvc.InvalidArgument, match=r"but no seq/bn1/renorm_stddev: expected all three"):
        load_moving_stats(rn, partial)
    np.testing.assert_array_equal(rn.layers[0].moving_stddev.numpy(), np.ones(4))  # nothing changed


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


def test_get_config_round_trips_renorm_and_virtual_batches(tmp_path):
    options = dict(virtual_batch_size=4) | (kw.RENORM if KERAS_RENORM else {})
    layer = SharedBatchNormalization("127.0.0.1:9", momentum=0.9, name="bn", **options)
    config = layer.get_config()
    assert {key: config[key] for key in options} == options
    again = SharedBatchNormalization.from_config(config)
    assert again.get_config() == config and again.virtual_batch_size == 4
    model = keras.Sequential([keras.Input((3,)), layer], name="vsaved")
    weights = [np.full(3, 0.5 + i, np.float32) for i in range(len(model.get_weights()))]
    model.set_weights(weights)
    model.save(tmp_path / "v.keras")
    loaded = keras.saving.load_model(tmp_path / "v.keras")
    assert loaded.layers[0].get_config() == layer.get_config()
    assert len(weights) == (7 if KERAS_RENORM else 4)
    for a, b in zip(weights, loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


# --- arguments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mode="global"), normsvc.InvalidArgument, "mode='global': expected 'shared' or 'sync'"),
    (dict(rank=0), normsvc.InvalidArgument, "expected both or neither"),
    (dict(rank=2, world_size=2), normsvc.InvalidArgument, "rank=2"),
    (dict(rank=0, world_size=0), normsvc.InvalidArgument, "world_size=0"),
    (dict(run=3), normsvc.InvalidArgument, "run=3"),
    (dict(synchronized=True), normsvc.InvalidArgument, "expected mode='sync'"),
    (dict(virtual_batch_size=0), normsvc.InvalidArgument, "virtual_batch_size=0: expected a positive int"),
    (dict(virtual_batch_size=True), normsvc.InvalidArgument, "virtual_batch_size must be an int"),
    (dict(virtual_batch_size=2, mode="sync"), normsvc.InvalidArgument, "nothing to synchronize"),
    (dict(layer_name=""), normsvc.InvalidArgument, "layer_name=''"),
    (dict(prefix=1), normsvc.InvalidType, "prefix=1"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=re.escape(match)):
        SharedBatchNormalization("127.0.0.1:9", **kwargs)


@needs_renorm
@pytest.mark.parametrize("kwargs, match", [
    (dict(renorm_clipping={"rmaxx": 2.0}), "expected a dict with keys among rmin, rmax, dmax"),
    (dict(renorm_clipping={"rmin": 2.0, "rmax": 1.0}), "rmin=2.0 > rmax=1.0"),
    (dict(renorm_clipping={"dmax": -1.0}), "dmax=-1.0"),
    (dict(renorm_momentum=1.5), "renorm_momentum=1.5: expected a number in [0, 1]"),
])
def test_bad_renorm_arguments_are_named(kwargs, match):
    with pytest.raises(normsvc.InvalidArgument, match=re.escape(match)):
        SharedBatchNormalization("127.0.0.1:9", renorm=True, **kwargs)


def test_renorm_without_a_keras_that_has_it_is_refused_naming_the_version(monkeypatch):
    monkeypatch.setattr(normsvc.keras, "_KERAS_RENORM", False)
    with pytest.raises(normsvc.FailedPrecondition, match=re.escape(f"this Keras ({keras.__version__}) has no")):
        SharedBatchNormalization("127.0.0.1:9", renorm=True)


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
