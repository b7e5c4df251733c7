"""What each mutation does to a layer: the update conventions (against the golden framework sequences),
shapes learned from the first batch, one version per change, freeze and reset."""

import json
from pathlib import Path

import numpy as np
import pytest

from normsvc.store import FailedPrecondition, FrozenLayer, InvalidArgument
from store_testing import batch_moments, np_moments

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


RUNNING = [c for c in json.loads((GOLDEN / "index.json").read_text())["cases"] if c["kind"] == "running"]



@pytest.mark.parametrize("case", RUNNING, ids=[c["name"] for c in RUNNING])
def test_golden_sequences_on_every_backend(store, case):
    """The framework sequences of tests/golden (Keras momentum 0.9, torch 0.1 and None), on each backend."""
    kw, keys = case["kwargs"], case["keys"]
    with np.load(GOLDEN / case["file"]) as z:
        data = {k: z[k] for k in z.files}
    layer = store.create_layer("bn", kind=kw["kind"], axis=kw["axis"], momentum=kw["momentum"],
                               convention=kw["convention"])
    for step, batch in enumerate(data["batches"]):
        s = layer.update(np_moments(batch, case["reduce_axes"]))
        np.testing.assert_allclose(s.mean, data[keys["mean"]][step], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.variance, data[keys["variance"]][step], rtol=1e-5, atol=1e-6)
        assert s.num_batches == data[keys["num_batches"]][step] == step + 1
        assert s.version == step + 1
        assert s == layer.stats()
    assert s.count == data["batches"][0].size // s.mean.size * len(data["batches"])


def test_cumulative_matches_the_concatenation_channels_first(store, rng):
    layer = store.create_layer("bn", axis=1, convention="cumulative")
    batches = [1e3 + rng.normal(size=(int(rng.integers(1, 6)), 3, 4, 5)) * [[[2.0]], [[0.5]], [[1.0]]]
               for _ in range(15)]
    for b in batches:
        s = layer.update(np_moments(b, [0, 2, 3]))
    everything = np.concatenate(batches)
    np.testing.assert_allclose(s.mean, everything.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(s.variance, everything.var(axis=(0, 2, 3)), rtol=1e-9)
    assert s.count == everything.size / 3 and s.num_batches == 15


def test_cumulative_instance_layer_pools_every_sample(store, rng):
    layer = store.create_layer("in", kind="instance", axis=-1, convention="cumulative")
    batches = [rng.normal(loc=rng.normal(size=(n, 1, 1, 2)) * 3, size=(n, 4, 4, 2)) for n in (2, 3, 1, 4)]
    for b in batches:
        s = layer.update(np_moments(b, [1, 2]))  # per (N, C), as ops.instance_norm returns
    everything = np.concatenate(batches)
    np.testing.assert_allclose(s.mean, everything.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(s.variance, everything.var(axis=(0, 1, 2)), rtol=1e-10)


def test_torch_group_layer_averages_instances(store, rng):
    layer = store.create_layer("gn", kind="group", groups=2, axis=1, convention="torch")
    x = rng.normal(size=(3, 4, 5))
    g = x.reshape(3, 2, 10)
    s = layer.update(np_moments(g, [2]))
    np.testing.assert_allclose(s.mean, 0.1 * g.mean(axis=2).mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(s.variance, 0.9 + 0.1 * g.var(axis=2, ddof=1).mean(axis=0), rtol=1e-13)


def test_layer_kind_keeps_scalar_statistics(store, rng):
    layer = store.create_layer("ln", kind="layer", momentum=0.5)
    x = rng.normal(size=(6, 7, 8))
    s = layer.update(np_moments(x, [2]))  # per position (6, 7)
    np.testing.assert_allclose(s.mean, 0.5 * x.mean(axis=2).mean())
    np.testing.assert_allclose(s.variance, 0.5 + 0.5 * x.var(axis=2).mean())
    assert s.mean.shape == () and s.count == x.size


def test_first_batch_fixes_the_shape(store, assert_unchanged, rng):
    layer = store.create_layer("bn")
    assert layer.update(batch_moments(rng, c=4)).mean.shape == (4,)
    with assert_unchanged(store), pytest.raises(InvalidArgument, match=r"statistics shape \(5,\).*\(4,\)"):
        layer.update(batch_moments(rng, c=5))
    declared = store.create_layer("bn5", num_features=5)
    with assert_unchanged(store), pytest.raises(InvalidArgument, match=r"shape \(5,\)"):
        declared.update(batch_moments(rng, c=4))


def test_every_mutation_bumps_the_version_by_one(store, rng):
    layer = store.create_layer("bn")
    versions = [layer.stats().version]
    for step in (lambda: layer.update(batch_moments(rng)), layer.freeze, layer.unfreeze, layer.reset,
                 lambda: layer.update(batch_moments(rng))):
        versions.append(step().version)
    assert versions == [0, 1, 2, 3, 4, 5]
    assert layer.stats().updated_at >= layer.stats().updated_at > 0


def test_freeze_and_unfreeze_are_no_ops_when_already_there(store):
    layer = store.create_layer("bn")
    assert layer.unfreeze().version == 0
    assert layer.freeze().version == 1
    assert layer.freeze().version == 1 and layer.stats().frozen


def test_frozen_layer_rejects_updates(store, assert_unchanged, rng):
    layer = store.create_layer("bn")
    layer.update(batch_moments(rng))
    layer.freeze()
    with assert_unchanged(store), pytest.raises(FrozenLayer, match="'bn' is frozen") as info:
        layer.update(batch_moments(rng))
    assert isinstance(info.value, FailedPrecondition) and info.value.layer == "bn"
    layer.unfreeze()
    assert layer.update(batch_moments(rng)).num_batches == 2


def test_reset(store, rng):
    layer = store.create_layer("bn", convention="torch")
    layer.update(batch_moments(rng, c=3))
    layer.freeze()
    s = layer.reset()
    np.testing.assert_array_equal(s.mean, np.zeros(3))
    np.testing.assert_array_equal(s.variance, np.ones(3))
    assert (s.count, s.num_batches, s.frozen, s.version) == (0.0, 0, True, 3)
    cum = store.create_layer("cum", convention="cumulative")
    cum.update(batch_moments(rng, c=2))
    s = cum.reset()
    np.testing.assert_array_equal(s.variance, np.zeros(2))
    assert s.count == 0
