"""Statistics a Store hands out are the caller's: writable, and shared with no one (memory and sqlite)."""

import numpy as np
from ownership import assert_owned, handed_out
from store_testing import np_moments

from normsvc import RunningStats


def test_every_result_is_the_callers_own(store, rng):
    store.create_layer("net/bn")  # shape learned from the first batch: 0-d statistics until then
    for label, value in handed_out(store, "net/bn", rng).items():
        assert_owned(value, label)


def test_writing_to_results_changes_nothing_stored(store, rng):
    bn = store.create_layer("bn", num_features=3, momentum=0.5)
    x = rng.standard_normal((6, 3))
    from_update = bn.update(np_moments(x, [0]))
    mine, theirs = bn.stats(), bn.stats()
    assert mine.mean is not theirs.mean and not np.shares_memory(mine.mean, theirs.mean)
    for stats in (from_update, mine):
        stats.mean[...] += 100.0
        stats.variance[:] = 0.0
    np.testing.assert_array_equal(theirs.mean, 0.5 * x.mean(axis=0))
    # the next update starts from the stored statistics, not from the arrays written above
    again = bn.update(np_moments(x, [0]))
    np.testing.assert_allclose(again.mean, 0.75 * x.mean(axis=0), rtol=1e-15)


def test_put_stats_keeps_no_reference_to_the_callers_arrays(store):
    store.create_layer("bn", num_features=2)
    mean, variance = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    returned = store.put_stats({"bn": RunningStats(mean, variance, 8.0, 2)})["bn"]
    mean[:] = variance[:] = -1.0
    returned.mean[:] = 7.0
    assert_owned(returned)
    stats = store.layer("bn").stats()
    assert stats.mean.tolist() == [1.0, 2.0] and stats.variance.tolist() == [3.0, 4.0]


def test_copy_owns_its_arrays_and_keeps_every_other_field():
    stats = RunningStats(np.arange(3.0), np.ones(3), 8.0, 2, 5, True, 12.5)
    copy = stats.copy()
    assert copy == stats and type(copy) is RunningStats
    assert not np.shares_memory(copy.mean, stats.mean) and not np.shares_memory(copy.variance, stats.variance)
    copy.mean[:] = -1.0
    assert stats.mean.tolist() == [0.0, 1.0, 2.0]
