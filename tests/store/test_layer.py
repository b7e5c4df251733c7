"""Layer: handles share state; normalize in training (batch statistics + one update), inference (running
statistics) and on frozen layers.

References are plain numpy: training output against ``ops`` (tested against the
frameworks elsewhere), inference against ``(x - mean) / sqrt(var + eps)`` with
the layer's running statistics broadcast by hand.
"""

import numpy as np
import pytest

from normsvc import ops
from normsvc.store import FrozenLayer, InvalidArgument, NoStatistics
from store_testing import np_moments


def bcast(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


def test_batch_training_normalizes_with_batch_statistics_and_updates_once(store, rng):
    layer = store.create_layer("bn", axis=1, momentum=0.9)
    x = rng.normal(2.0, 3.0, size=(4, 3, 5)).astype(np.float32)
    y = layer.normalize(x, training=True)
    want, m = ops.batch_norm(x, axis=1, epsilon=1e-3)
    np.testing.assert_array_equal(y, want)
    assert y.dtype == np.float32
    s = layer.stats()
    assert (s.version, s.num_batches, s.count) == (1, 1, 20.0)
    np.testing.assert_allclose(s.mean, 0.1 * m.mean, rtol=1e-12)
    np.testing.assert_allclose(s.variance, 0.9 + 0.1 * m.variance, rtol=1e-12)


def test_training_without_update(store, rng):
    layer = store.create_layer("bn")
    y = layer.normalize(rng.normal(size=(6, 2)), training=True, update=False)
    assert y.shape == (6, 2) and layer.stats().version == 0


@pytest.mark.parametrize("convention", ["keras", "torch", "cumulative"])
def test_batch_inference_uses_the_running_statistics(store, rng, convention):
    layer = store.create_layer("bn", axis=1, convention=convention)
    for _ in range(3):
        layer.update(np_moments(rng.normal(1.0, 2.0, size=(8, 3, 4)), [0, 2]))
    s = layer.stats()
    x = rng.normal(size=(5, 3, 4))
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    y = layer.normalize(x, training=False, gamma=gamma, beta=beta)
    eps = layer.config().epsilon
    want = (x - bcast(s.mean, 3, 1)) / np.sqrt(bcast(s.variance, 3, 1) + eps) * bcast(gamma, 3, 1) + bcast(beta, 3, 1)
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
    assert layer.stats() == s


def test_inference_before_any_batch_uses_the_initial_values(store, rng):
    layer = store.create_layer("bn", convention="torch")  # mean 0, variance 1, shape not known yet
    x = rng.normal(size=(3, 4))
    np.testing.assert_allclose(layer.normalize(x, training=False), x / np.sqrt(1 + 1e-5), rtol=1e-12)
    cum = store.create_layer("cum", convention="cumulative")
    with pytest.raises(NoStatistics, match="no samples yet"):
        cum.normalize(x, training=False)


def test_frozen_layer_normalizes_with_running_statistics_even_in_training(store, rng):
    layer = store.create_layer("bn", momentum=0.5)
    layer.update(np_moments(rng.normal(3.0, 2.0, size=(10, 4)), [0]))
    layer.freeze()
    s = layer.stats()
    x = rng.normal(size=(6, 4))
    y = layer.normalize(x, training=True)
    np.testing.assert_allclose(y, (x - s.mean) / np.sqrt(s.variance + 1e-3), rtol=1e-12)
    np.testing.assert_array_equal(y, layer.normalize(x, training=False))
    assert layer.stats() == s  # no update, no version bump
    with pytest.raises(FrozenLayer):
        layer.update(np_moments(x, [0]))


def test_training_update_with_request_id_applies_once(store, rng):
    layer = store.create_layer("bn")
    x = rng.normal(size=(6, 4))
    layer.normalize(x, training=True, request_id="step-7")
    layer.normalize(x, training=True, request_id="step-7")
    assert layer.stats().num_batches == 1


def test_instance_layer(store, rng):
    layer = store.create_layer("in", kind="instance", axis=1, convention="torch")
    x = rng.normal(size=(4, 3, 6, 5))
    y = layer.normalize(x, training=True)
    np.testing.assert_array_equal(y, ops.instance_norm(x, axis=1, epsilon=1e-5)[0])
    s = layer.stats()
    per_instance = x.reshape(4, 3, -1)
    np.testing.assert_allclose(s.mean, 0.1 * per_instance.mean(axis=2).mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(s.variance, 0.9 + 0.1 * per_instance.var(axis=2, ddof=1).mean(axis=0), rtol=1e-10)
    x2 = rng.normal(size=(2, 3, 4, 4))
    y2 = layer.normalize(x2, training=False)
    want = (x2 - bcast(s.mean, 4, 1)) / np.sqrt(bcast(s.variance, 4, 1) + 1e-5)
    np.testing.assert_allclose(y2, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(InvalidArgument, match="statistics of shape"):
        layer.normalize(rng.normal(size=(2, 5, 4, 4)), training=False)


def test_group_layer(store, rng):
    layer = store.create_layer("gn", kind="group", groups=2, axis=-1, momentum=0.0)
    x = rng.normal(size=(3, 5, 4))  # channels-last, 4 channels in 2 groups
    gamma, beta = rng.normal(size=4), rng.normal(size=4)
    y = layer.normalize(x, training=True, gamma=gamma, beta=beta)
    np.testing.assert_array_equal(y, ops.group_norm(x, groups=2, axis=-1, gamma=gamma, beta=beta)[0])
    s = layer.stats()
    g = x.reshape(3, 5, 2, 2)
    np.testing.assert_allclose(s.mean, g.mean(axis=(1, 3)).mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(s.variance, g.var(axis=(1, 3)).mean(axis=0), rtol=1e-10)
    y2 = layer.normalize(x, training=False, gamma=gamma, beta=beta)
    mean_c, var_c = np.repeat(s.mean, 2), np.repeat(s.variance, 2)  # group -> its channels
    np.testing.assert_allclose(y2, (x - mean_c) / np.sqrt(var_c + 1e-3) * gamma + beta, rtol=1e-10, atol=1e-12)


def test_layer_norm_layer(store, rng):
    layer = store.create_layer("ln", kind="layer", axis=-1, momentum=0.0)
    x = rng.normal(1.0, 2.0, size=(4, 3, 8))
    gamma = rng.normal(size=8)
    y = layer.normalize(x, training=True, gamma=gamma)
    np.testing.assert_array_equal(y, ops.layer_norm(x, axis=-1, gamma=gamma)[0])
    s = layer.stats()
    np.testing.assert_allclose(s.mean, x.mean(axis=-1).mean(), rtol=1e-10)
    np.testing.assert_allclose(s.variance, x.var(axis=-1).mean(), rtol=1e-10)
    y2 = layer.normalize(x, training=False, gamma=gamma)
    np.testing.assert_allclose(y2, (x - s.mean) / np.sqrt(s.variance + 1e-3) * gamma, rtol=1e-10, atol=1e-12)


def test_rms_layer(store, rng):
    layer = store.create_layer("rms", kind="rms", axis=[1, 2], momentum=0.0, epsilon=1e-6)
    x = rng.normal(0.5, 2.0, size=(4, 3, 5))
    gamma = rng.normal(size=(3, 5))
    y = layer.normalize(x, training=True, gamma=gamma)
    np.testing.assert_array_equal(y, ops.rms_norm(x, axis=[1, 2], epsilon=1e-6, gamma=gamma)[0])
    s = layer.stats()
    ms = float(s.variance + s.mean**2)
    np.testing.assert_allclose(ms, (x**2).mean(), rtol=1e-10)
    y2 = layer.normalize(x, training=False, gamma=gamma)
    np.testing.assert_allclose(y2, x / np.sqrt(ms + 1e-6) * gamma, rtol=1e-10, atol=1e-12)
    with pytest.raises(InvalidArgument) as info:
        layer.normalize(x, training=False, gamma=np.ones(4))
    assert info.value.field == "gamma"


def test_affine_flags(store, rng):
    x = rng.normal(size=(4, 3))
    no_scale = store.create_layer("a", scale=False)
    with pytest.raises(InvalidArgument) as info:
        no_scale.normalize(x, training=True, gamma=np.ones(3))
    assert info.value.field == "gamma"
    no_center = store.create_layer("b", center=False)
    with pytest.raises(InvalidArgument) as info:
        no_center.normalize(x, training=False, beta=np.ones(3))
    assert info.value.field == "beta"
    rms = store.create_layer("r", kind="rms")
    with pytest.raises(InvalidArgument, match="no offset"):
        rms.normalize(x, training=True, beta=np.ones(3))
    assert all(store.layer(n).stats().version == 0 for n in "abr")


def test_bad_inputs_change_nothing(store, assert_unchanged, rng):
    layer = store.create_layer("bn", axis=1)
    layer.normalize(rng.normal(size=(4, 3, 2)), training=True)
    for x, field in [
        (rng.normal(size=(4, 5, 2)), "x"),  # other channel count than the layer's statistics
        (np.array(["a", "b"]), "x"),
        (np.zeros((0, 3)), "x"),
        (rng.normal(size=(4,)), "axis"),
    ]:
        for training in (True, False):
            with assert_unchanged(store), pytest.raises(InvalidArgument) as info:
                layer.normalize(x, training=training)
            assert info.value.field == field
    with pytest.raises(InvalidArgument) as info:
        layer.normalize(rng.normal(size=(4, 3, 2)), training=True, gamma=np.ones(4))
    assert info.value.field == "gamma"
    with pytest.raises(InvalidArgument):
        layer.normalize(rng.normal(size=(4, 3)), training="yes")


@pytest.mark.parametrize("update", [True, False])
def test_return_moments_gives_the_batch_moments_of_the_ops(store, rng, update):
    layer = store.create_layer("gn", kind="group", groups=2, axis=-1)
    x = rng.normal(1.0, 2.0, size=(4, 5, 6)).astype(np.float32)
    y, m = layer.normalize(x, training=True, update=update, return_moments=True)
    want_y, want = ops.group_norm(x, groups=2, axis=-1, epsilon=1e-3)
    np.testing.assert_array_equal(y, want_y)
    for field in ("count", "mean", "m2"):
        np.testing.assert_array_equal(getattr(m, field), getattr(want, field))
    assert layer.stats().version == (1 if update else 0)


def test_return_moments_is_none_without_batch_statistics(store, rng):
    layer = store.create_layer("bn")
    x = rng.normal(size=(8, 3))
    y, m = layer.normalize(x, training=False, return_moments=True)
    assert m is None and y.shape == x.shape
    layer.freeze()
    y2, m2 = layer.normalize(x, training=True, return_moments=True)  # frozen: running statistics
    assert m2 is None
    np.testing.assert_array_equal(y2, y)


def test_normalize_takes_the_ops_device_argument():
    import normsvc

    store = normsvc.Store.open("memory://")
    layer = store.create_layer("dev/bn", kind="batch", axis=-1)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    y_cpu = layer.normalize(x, training=False, device="cpu")
    np.testing.assert_array_equal(y_cpu, layer.normalize(x, training=False))
    with pytest.raises(normsvc.InvalidArgument, match="device"):
        layer.normalize(x, training=False, device="tpu")
    if not normsvc.cuda_available():
        with pytest.raises(RuntimeError, match="(?i)cuda"):
            layer.normalize(x, training=True, device="cuda")
        assert layer.stats().version == 0  # nothing applied by the failed call


def test_layer_handles_share_state(store):
    a = store.create_layer("bn")
    b = store.layer("bn")
    a.update(np_moments(np.ones((2, 3)), axes=[0]))
    assert b.stats().version == 1
    assert repr(b) == "Layer('bn')"


def test_config_is_a_method_and_the_property_spelling_warns(store):
    layer = store.create_layer("bn", momentum=0.5)
    assert layer.config().momentum == 0.5
    with pytest.warns(DeprecationWarning, match=r"call config\(\)"):
        assert layer.config.momentum == 0.5
