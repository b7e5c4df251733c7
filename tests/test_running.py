"""normsvc.running: the update conventions against hand-computed values and numpy."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normsvc.moments import Moments
from normsvc.running import (
    DEFAULTS,
    RunningStats,
    apply_update,
    batch_statistics,
    fold,
    initial_state,
)


def batch_of(samples, axis=0):
    """Per-feature BatchStatistics of a (n, features) array."""
    return batch_statistics(Moments.from_samples(np.asarray(samples, dtype=np.float64), axis=axis), 0)


def run(convention, momentum, batches, shape=(1,)):
    s = initial_state(convention, shape)
    for b in batches:
        s = apply_update(s, batch_of(b), convention=convention, momentum=momentum)
    return s


def test_defaults_follow_the_frameworks():
    assert DEFAULTS == {"keras": (0.99, 1e-3), "torch": (0.1, 1e-5), "cumulative": (None, 1e-3)}


def test_initial_states():
    for convention in ("keras", "torch"):
        s = initial_state(convention, (3,))
        np.testing.assert_array_equal(s.mean, np.zeros(3))
        np.testing.assert_array_equal(s.variance, np.ones(3))
    s = initial_state("cumulative", (2,))
    np.testing.assert_array_equal(s.variance, np.zeros(2))
    assert (s.count, s.num_batches) == (0.0, 0)
    assert initial_state("keras").mean.shape == ()


def test_keras_by_hand():
    # batch [1, 3]: mean 2, biased variance 1; then [0, 4]: mean 2, variance 4
    s = run("keras", 0.9, [[[1.0], [3.0]], [[0.0], [4.0]]])
    # step 1: mean 0*.9 + 2*.1 = .2, var 1*.9 + 1*.1 = 1
    # step 2: mean .2*.9 + 2*.1 = .38, var 1*.9 + 4*.1 = 1.3
    np.testing.assert_allclose(s.mean, [0.38], rtol=1e-15)
    np.testing.assert_allclose(s.variance, [1.3], rtol=1e-15)
    assert (s.count, s.num_batches) == (4.0, 2)


def test_torch_by_hand_uses_unbiased_variance():
    # batch [1, 3]: unbiased variance 2; batch [0, 4]: unbiased variance 8
    s = run("torch", 0.1, [[[1.0], [3.0]], [[0.0], [4.0]]])
    # step 1: mean .9*0 + .1*2 = .2, var .9*1 + .1*2 = 1.1
    # step 2: mean .9*.2 + .1*2 = .38, var .9*1.1 + .1*8 = 1.79
    np.testing.assert_allclose(s.mean, [0.38], rtol=1e-15)
    np.testing.assert_allclose(s.variance, [1.79], rtol=1e-15)
    assert s.num_batches == 2


def test_torch_momentum_none_is_the_plain_average_of_batch_statistics():
    batches = [[[1.0], [3.0]], [[0.0], [4.0], [8.0]], [[10.0], [10.0], [11.0], [13.0]]]
    s = run("torch", None, batches)
    means = [np.mean(b) for b in batches]
    unbiased = [np.var(b, ddof=1) for b in batches]
    np.testing.assert_allclose(s.mean, [np.mean(means)], rtol=1e-14)
    np.testing.assert_allclose(s.variance, [np.mean(unbiased)], rtol=1e-14)
    assert s.num_batches == 3


def test_cumulative_is_the_pooled_population_and_differs_from_torch_cma():
    batches = [[[1.0], [3.0]], [[10.0], [12.0]]]
    s = run("cumulative", None, batches)
    everything = np.concatenate(batches)
    np.testing.assert_allclose(s.mean, [everything.mean()], rtol=1e-15)
    np.testing.assert_allclose(s.variance, [everything.var()], rtol=1e-15)  # 21.25: counts the spread of batch means
    assert s.count == 4.0
    cma = run("torch", None, batches)
    assert cma.variance[0] == pytest.approx(2.0)  # torch averages the within-batch variances only
    assert s.variance[0] == pytest.approx(21.25)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    seed=st.integers(0, 2**31 - 1),
    offset=st.sampled_from([0.0, 1e4]),
)
def test_cumulative_matches_numpy_on_the_concatenation(sizes, seed, offset):
    rng = np.random.default_rng(seed)
    batches = [offset + rng.normal(size=(n, 3)) * rng.uniform(0.1, 5) for n in sizes]
    s = run("cumulative", None, batches, shape=(3,))
    everything = np.concatenate(batches)
    np.testing.assert_allclose(s.mean, everything.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.variance, everything.var(axis=0), rtol=1e-9, atol=1e-12)
    assert s.count == everything.shape[0] and s.num_batches == len(sizes)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 12))
def test_cumulative_order_does_not_matter(seed, n):
    rng = np.random.default_rng(seed)
    batches = [rng.normal(size=(int(rng.integers(1, 6)), 2)) for _ in range(n)]
    forward = run("cumulative", None, batches, shape=(2,))
    backward = run("cumulative", None, batches[::-1], shape=(2,))
    np.testing.assert_allclose(forward.mean, backward.mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(forward.variance, backward.variance, rtol=1e-10, atol=1e-14)


def test_batch_statistics_of_instances_average_the_units():
    # two samples x one channel x four positions
    x = np.array([[[0.0, 2.0, 0.0, 2.0]], [[4.0, 8.0, 4.0, 8.0]]])
    m = Moments.from_samples(x, axis=2)  # (N, C) = (2, 1), count 4
    b = batch_statistics(m, sample_ndim=1)
    np.testing.assert_allclose(b.mean, [3.5])  # mean of the instance means 1 and 6
    np.testing.assert_allclose(b.variance, [2.5])  # mean of the instance variances 1 and 4
    assert (b.count, b.unit_count) == (8.0, 4.0)
    np.testing.assert_allclose(b.unbiased_variance(), [np.mean([np.var(u, ddof=1) for u in x[:, 0]])])
    np.testing.assert_allclose(b.pooled_m2 / b.count, [x.var()])


def test_torch_instance_norm_running_update():
    # torch InstanceNorm(track_running_stats): running = .9*running + .1*mean_n(instance stat), unbiased
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 5))
    b = batch_statistics(Moments.from_samples(x, axis=2), 1)
    s = apply_update(initial_state("torch", (2,)), b, convention="torch", momentum=0.1)
    np.testing.assert_allclose(s.mean, 0.1 * x.mean(axis=2).mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(s.variance, 0.9 + 0.1 * x.var(axis=2, ddof=1).mean(axis=0), rtol=1e-14)


def test_running_stats_equality_compares_values():
    a = RunningStats(np.zeros(2), np.ones(2), 1.0, 1, 1, False, 5.0)
    assert a == RunningStats(np.zeros(2), np.ones(2), 1.0, 1, 1, False, 5.0)
    assert a != RunningStats(np.zeros(2), np.ones(2), 1.0, 1, 2, False, 5.0)
    assert a != RunningStats(np.zeros(3), np.ones(3), 1.0, 1, 1, False, 5.0)


def test_unknown_convention():
    with pytest.raises(ValueError, match="convention"):
        apply_update(initial_state("keras", (1,)), batch_of([[1.0]]), convention="tf", momentum=0.9)


def test_docstring_examples():
    import doctest

    import normsvc.running
    import normsvc.store.store

    for module in (normsvc.running, normsvc.store.store):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# --- fold: the store's compiled hot path must be apply_update, bit for bit ----------------

CONVENTION_MOMENTA = [("keras", 0.99), ("keras", 0.5), ("torch", 0.1), ("torch", None), ("cumulative", None)]


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(CONVENTION_MOMENTA),
    shape=st.sampled_from([(1,), (7,), (3, 5)]),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    transposed=st.booleans(),
)
def test_fold_is_apply_update_bit_for_bit(case, shape, steps, seed, transposed):
    convention, momentum = case
    rng = np.random.default_rng(seed)
    slow = fast = initial_state(convention, shape)
    for _ in range(steps):
        n = int(rng.integers(2, 40))
        x = rng.normal(rng.normal(0, 100), rng.uniform(0.01, 10), size=(n,) + shape)
        m = Moments.from_samples(x)
        if transposed and len(shape) == 2:  # non-contiguous statistics arrays
            m = Moments(m.count, np.ascontiguousarray(m.mean.T).T, np.ascontiguousarray(m.m2.T).T)
        slow = apply_update(slow, batch_statistics(m, 0), convention=convention, momentum=momentum)
        fast = fold(fast, m, convention=convention, momentum=momentum)
        assert fast is not None
        assert fast.mean.shape == shape and fast.variance.shape == shape
        assert np.array_equal(fast.mean, slow.mean) and np.array_equal(fast.variance, slow.variance)
        assert (fast.count, fast.num_batches, fast.version, fast.frozen) == (
            slow.count, slow.num_batches, slow.version, slow.frozen)


def _moments(count=4.0, mean=(1.0, 2.0), m2=(4.0, 8.0)):
    return Moments(np.float64(count) if np.ndim(count) == 0 else np.asarray(count, float), np.asarray(mean, float),
                   np.asarray(m2, float))


@pytest.mark.parametrize("convention, moments", [
    ("keras", _moments(mean=(np.nan, 2.0))),
    ("keras", _moments(mean=(np.inf, 2.0))),
    ("keras", _moments(m2=(4.0, np.nan))),
    ("keras", _moments(m2=(-1e-300, 8.0))),
    ("keras", _moments(count=0.0)),
    ("keras", _moments(count=-4.0)),
    ("keras", _moments(count=np.inf)),
    ("keras", _moments(count=np.nan)),
    ("keras", _moments(count=[4.0, 4.0])),  # one count per feature: the general path decides
    ("keras", _moments(mean=(1.0, 2.0, 3.0), m2=(1.0, 1.0, 1.0))),  # another shape
    ("keras", _moments(count=0.5, m2=(1.7e308, 1.0))),  # the variance overflows
    ("torch", _moments(count=1.0)),  # no unbiased variance from one sample
    ("cumulative", _moments(mean=(-1.7e308, 2.0))),  # the step from the running mean 1.7e308 overflows
])
def test_fold_declines_what_the_general_path_must_report(convention, moments):
    state = initial_state(convention, (2,))
    if convention == "cumulative":
        state = RunningStats(np.array([1.7e308, 0.0]), np.ones(2), count=1.0)
    assert fold(state, moments, convention=convention, momentum=DEFAULTS[convention][0]) is None
