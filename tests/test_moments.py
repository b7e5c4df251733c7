"""The Moments value type: the merge law, conversions, validation, doctests."""

from __future__ import annotations

import dataclasses
import doctest
import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import importlib
from normsvc import Moments, ops
from normsvc.moments import merge_all

FAST = settings(max_examples=50, deadline=None)


def assert_same_moments(got: Moments, want: Moments, rtol: float = 1e-12) -> None:
    """count exact; mean to rtol of the data scale; m2 to rtol of itself (plus a floor)."""
    np.testing.assert_array_equal(np.broadcast_to(got.count, got.shape), np.broadcast_to(want.count, want.shape))
    scale = max(1.0, float(np.abs(want.mean).max(initial=0)))
    np.testing.assert_allclose(got.mean, want.mean, rtol=0, atol=rtol * scale)
    np.testing.assert_allclose(got.m2, want.m2, rtol=rtol, atol=rtol * float(np.abs(want.m2).max(initial=0)))


def random_moments(r: np.random.Generator, shape: tuple, max_count: int = 9) -> Moments:
    """Moments of a random batch with a per-group count (some groups may be empty)."""
    count = r.integers(0, max_count + 1, size=shape).astype(np.float64)
    mean = np.where(count > 0, r.normal(0, 3, size=shape), 0.0)
    var = np.where(count > 0, r.uniform(0, 4, size=shape), 0.0)
    return Moments.from_variance(count, mean, var)


def test_doctests():
    result = doctest.testmod(importlib.import_module("normsvc.moments"))
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------
# The merge law


@FAST
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    data=st.data(),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_merging_the_moments_of_any_split_gives_the_moments_of_the_whole(shape, data, dtype, seed):
    r = np.random.default_rng(seed)
    ndim = len(shape)
    axes = data.draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    split_axis = data.draw(st.sampled_from(axes))
    n = shape[split_axis] * 3  # long enough to split into several pieces
    shape = shape[:split_axis] + (n,) + shape[split_axis + 1 :]
    x = (r.normal(r.uniform(-5, 5), r.uniform(0.1, 3), size=shape)).astype(dtype)
    cuts = sorted(data.draw(st.lists(st.integers(1, n - 1), max_size=4, unique=True)))
    pieces = np.split(x, cuts, axis=split_axis)

    parts = [ops.moments(p, axes) for p in pieces]
    whole = ops.moments(x, axes)
    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = p.merge(right)
    # Chan's update is exact in real arithmetic; in float64 it loses a few ulps
    # per merge (at most 4 merges here), so 1e-12 relative is tight.  For
    # float32 input the design allows the kernel itself to accumulate in
    # float32 (pairwise): the pieces and the whole may then differ by ~log2(n)
    # float32 ulps, hence 1e-6 (about 16 ulps).
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    assert_same_moments(left, whole, rtol)
    assert_same_moments(right, whole, rtol)
    # and against the numpy two-pass answer
    xs = x.astype(np.float64)
    np.testing.assert_allclose(left.variance, xs.var(axis=tuple(axes)), rtol=10 * rtol, atol=1e-14)


@FAST
@given(seed=st.integers(0, 2**32 - 1), shape=st.lists(st.integers(1, 4), max_size=3).map(tuple))
def test_merge_is_associative_and_commutative(seed, shape):
    r = np.random.default_rng(seed)
    a, b, c = (random_moments(r, shape) for _ in range(3))
    assert_same_moments(a.merge(b).merge(c), a.merge(b.merge(c)))
    assert_same_moments(a.merge(b), b.merge(a))


@FAST
@given(seed=st.integers(0, 2**32 - 1), shape=st.lists(st.integers(1, 4), max_size=3).map(tuple))
def test_merge_with_per_group_counts_matches_pooled_samples(seed, shape):
    """Counts that differ per group (including empty groups) merge like pooled samples."""
    r = np.random.default_rng(seed)
    size = int(np.prod(shape))
    na, nb = r.integers(0, 6, size=size), r.integers(0, 6, size=size)
    xa = [r.normal(2, 1.5, size=k) for k in na]
    xb = [r.normal(-1, 0.5, size=k) for k in nb]

    def moments_of(samples):
        count = np.array([len(s) for s in samples], np.float64).reshape(shape)
        mean = np.array([s.mean() if len(s) else 0.0 for s in samples]).reshape(shape)
        m2 = np.array([((s - s.mean()) ** 2).sum() if len(s) else 0.0 for s in samples]).reshape(shape)
        return Moments(count, mean, m2)

    merged = moments_of(xa).merge(moments_of(xb))
    assert_same_moments(merged, moments_of([np.concatenate([p, q]) for p, q in zip(xa, xb)]))


@settings(max_examples=40, deadline=None)
@given(ranks=st.integers(1, 6), seed=st.integers(0, 2**32 - 1), per_group=st.booleans())
def test_merge_all_gives_the_bits_of_merging_in_order(ranks, seed, per_group):
    # the compiled pass (scalar counts) and the pairwise fallback (per-group counts) both give what
    # repeated Moments.merge gives, bit for bit, empty batches included; and the whole batch's moments
    r = np.random.default_rng(seed)
    batches = [r.normal(r.uniform(-1e3, 1e3), r.uniform(0.1, 10), size=(int(r.integers(0, 5)), 3)) for _ in range(ranks)]
    parts = [Moments.from_samples(b) if len(b) else Moments(np.float64(0), np.zeros(3), np.zeros(3)) for b in batches]
    if per_group:
        parts = [Moments(np.full(3, m.count), m.mean, m.m2) for m in parts]
    merged = merge_all(parts)
    sequential = functools.reduce(Moments.merge, parts)
    for got, want in ((merged.count, sequential.count), (merged.mean, sequential.mean), (merged.m2, sequential.m2)):
        assert got.shape == want.shape and got.tobytes() == want.tobytes()
    whole = np.concatenate(batches)
    assert float(np.max(merged.count)) == len(whole)
    if len(whole):
        np.testing.assert_allclose(merged.mean, whole.mean(0), rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(merged.variance, whole.var(0), rtol=1e-9, atol=1e-9)


def test_merging_zero_count_moments_is_the_identity(rng):
    m = Moments.from_samples(rng.normal(3, 2, size=(20, 5)))
    zero = Moments(0.0, np.zeros(5), np.zeros(5))
    for merged in (m.merge(zero), zero.merge(m)):
        np.testing.assert_array_equal(merged.count, 20.0)
        np.testing.assert_array_equal(merged.mean, m.mean)
        np.testing.assert_array_equal(merged.m2, m.m2)


def test_two_empty_moments_merge_to_an_empty_one():
    zero = Moments(0.0, np.zeros(3), np.zeros(3))
    with np.errstate(all="raise"):  # no 0/0 warnings leak out either
        e = zero.merge(zero)
        var = e.variance
    assert np.all(e.count == 0)
    assert np.all(np.isfinite(e.mean)) and np.all(np.isfinite(e.m2))
    np.testing.assert_array_equal(var, 0.0)
    assert np.isnan(e.unbiased_variance()).all()


def test_merge_keeps_precision_where_raw_sums_do_not():
    """Two halves around 1e8 with unit spread: Chan's merge keeps the variance,
    sum(x**2) - n*mean**2 in float64 does not (the test shows the difference)."""
    r = np.random.default_rng(7)
    a, b = r.normal(1e8, 1.0, 5000), r.normal(1e8 + 0.5, 1.0, 5000)
    whole = np.concatenate([a, b])
    exact = whole.var()
    merged = Moments.from_samples(a).merge(Moments.from_samples(b))
    assert abs(float(merged.variance) - exact) / exact < 1e-9
    naive = (np.sum(whole * whole) - whole.size * whole.mean() ** 2) / whole.size
    assert abs(naive - exact) / exact > 1e-3


def test_merge_rejects_other_types_and_shapes():
    m = Moments(2.0, np.zeros(3), np.zeros(3))
    with pytest.raises(TypeError, match=r"can only merge Moments with Moments, got ndarray"):
        m.merge(np.zeros(3))
    with pytest.raises(ValueError, match=r"cannot merge Moments of shape \(3,\) with shape \(4,\)"):
        m.merge(Moments(2.0, np.zeros(4), np.zeros(4)))


# ---------------------------------------------------------------------------
# Conversions


def test_from_variance_round_trip(rng):
    x = rng.normal(1, 2, size=(30, 4, 3))
    m = Moments.from_samples(x)
    r = Moments.from_variance(m.count, m.mean, m.variance)
    np.testing.assert_array_equal(r.count, m.count)
    np.testing.assert_array_equal(r.mean, m.mean)
    np.testing.assert_allclose(r.m2, m.m2, rtol=1e-15)
    np.testing.assert_allclose(r.variance, x.var(axis=0), rtol=1e-13)


def test_from_samples_and_unbiased_variance_match_numpy(rng):
    x = rng.normal(-4, 0.5, size=(17, 6))
    for axis in (0, 1):
        m = Moments.from_samples(x, axis=axis)
        np.testing.assert_array_equal(m.count, x.shape[axis])
        np.testing.assert_allclose(m.mean, x.mean(axis=axis), rtol=1e-14)
        np.testing.assert_allclose(m.variance, x.var(axis=axis), rtol=1e-13)
        np.testing.assert_allclose(m.unbiased_variance(), x.var(axis=axis, ddof=1), rtol=1e-13)


def test_unbiased_variance_is_nan_for_one_sample_like_numpy():
    m = Moments(np.array([1.0, 2.0]), np.array([3.0, 1.0]), np.array([0.0, 2.0]))
    u = m.unbiased_variance()
    assert np.isnan(u[0]) and u[1] == 2.0


def test_ops_moments_agree_with_from_samples(rng):
    x = rng.normal(size=(12, 7)).astype(np.float32)
    m, r = ops.moments(x, 0), Moments.from_samples(x, axis=0)
    assert_same_moments(m, r, rtol=1e-12)
    assert m.count.dtype == m.mean.dtype == m.m2.dtype == np.float64


def test_reshape_keeps_the_statistics(rng):
    m = Moments.from_samples(rng.normal(size=(5, 6)))
    r = m.reshape((2, 3))
    assert r.shape == (2, 3)
    np.testing.assert_array_equal(r.mean.ravel(), m.mean)
    np.testing.assert_array_equal(r.variance.ravel(), m.variance)
    per_group = Moments(np.arange(1.0, 7.0), np.zeros(6), np.ones(6)).reshape((3, 2))
    np.testing.assert_array_equal(per_group.count, np.arange(1.0, 7.0).reshape(3, 2))


# ---------------------------------------------------------------------------
# Construction


def test_fields_are_float64_and_frozen():
    m = Moments(3, [1, 2], [4, 5])
    assert m.count.dtype == m.mean.dtype == m.m2.dtype == np.float64
    np.testing.assert_array_equal(m.variance, [4 / 3, 5 / 3])
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.mean = np.zeros(2)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((2.0, np.zeros(3), np.zeros(4)), ValueError, r"Moments\.m2 shape \(4,\) must equal mean shape \(3,\)"),
        ((np.ones(4), np.zeros(3), np.zeros(3)), ValueError,
         r"Moments\.count shape \(4,\) does not broadcast to mean shape \(3,\)"),
        # count must broadcast *to* the mean's shape, not merely with it
        ((np.ones((2, 3)), np.zeros(3), np.zeros(3)), ValueError,
         r"Moments\.count shape \(2, 3\) does not broadcast to mean shape \(3,\)"),
        ((2.0, "abc", np.zeros(3)), TypeError, r"Moments\.mean must be numeric, got 'abc'"),
        (("n", np.zeros(3), np.zeros(3)), TypeError, r"Moments\.count must be numeric, got 'n'"),
    ],
    ids=["m2 shape", "count shape", "count larger than mean", "mean not numeric", "count not numeric"],
)
def test_invalid_construction_is_rejected(args, exc, match):
    with pytest.raises(exc, match=match):
        Moments(*args)


def test_from_variance_rejects_non_numeric_variance():
    with pytest.raises(TypeError, match=r"Moments\.variance must be numeric, got 'x'"):
        Moments.from_variance(3, [0.0], "x")
