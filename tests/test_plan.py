"""The reduction plan: the docstring table, transposed cases, size-1 axes, roles."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from normsvc.errors import InvalidArgument
import normsvc.plan as plan_module
from normsvc.plan import normalize_axes, plan_for, plan_for_moments, plan_from_roles
from reference import REFERENCES

FAST = settings(max_examples=80, deadline=None)

# Distinct sizes > 1, so every factor of a view is identifiable.
N, H, W, C, G, M, K = 2, 3, 5, 12, 4, 7, 11
DOC_ROWS = {
    "batch, channels-last (N,H,W,C)": ("batch", (N, H, W, C), (3,), None, (C,)),
    "batch, channels-first (N,C,H,W)": ("batch", (N, C, H, W), (1,), None, (C,)),
    "layer over last axis (M, K)": ("layer", (M, K), (1,), None, (M,)),
    "instance, channels-last": ("instance", (N, H, W, C), (3,), None, (N, C)),
    "instance, channels-first": ("instance", (N, C, H, W), (1,), None, (N, C)),
    "group G, channels-last": ("group", (N, H, W, C), (3,), G, (N, G)),
    "group G, channels-first": ("group", (N, C, H, W), (1,), G, (N, G)),
}


def docstring_table() -> dict:
    """The rows of the view table in normsvc/plan.py's docstring, evaluated."""
    doc = plan_module.__doc__
    tables = re.findall(r"^=+(?:  +=+)+\n(.*?)^=+(?:  +=+)+\n(.*?)^=+(?:  +=+)+$", doc, re.S | re.M)
    header, body = next((h, b) for h, b in tables if h.split()[-5:] == ["A", "B", "C", "D", "E"])
    sizes = dict(N=N, H=H, W=W, C=C, G=G, M=M, K=K)
    rows = {}
    for line in body.strip().splitlines():
        name, *cells = re.split(r"\s{2,}", line.strip())
        rows[name] = tuple(eval(c.replace("/", "//"), {}, dict(sizes)) for c in cells)  # noqa: S307
    return rows


def test_the_docstring_table_lists_exactly_the_known_rows():
    assert set(docstring_table()) == set(DOC_ROWS)


@pytest.mark.parametrize("name", list(DOC_ROWS))
def test_the_docstring_table_holds(name, rng):
    kind, shape, axis, groups, stat_shape = DOC_ROWS[name]
    p = plan_for(shape, kind, axis, groups)
    assert p.view == docstring_table()[name]
    assert p.perm is None  # the common layouts never transpose
    assert p.stat_shape == stat_shape
    assert p.count * int(np.prod(stat_shape)) == int(np.prod(shape))
    x = rng.normal(size=shape)
    v = p.to_view(x)
    assert v.shape == p.view and v.flags.c_contiguous
    assert np.shares_memory(v, x)  # no transpose: a view, not a copy


def test_rms_plans_like_layer():
    assert plan_for((M, K), "rms", (1,)) == plan_for((M, K), "layer", (1,))


# ---------------------------------------------------------------------------
# Transposed cases and size-1 axes

TRANSPOSED = [
    ("batch", (4, 3, 5, 2), (1, 3), None),  # two feature axes with a reduced axis between
    ("batch", (3, 4, 5), (0, 2), None),
    ("layer", (6, 5), (0,), None),  # normalize the leading axis
    ("layer", (3, 4, 5), (0, 2), None),
    ("moments", (3, 4, 5), (1,), None),  # reduce the middle axis
]


def _plan(shape, kind, axis, groups=None):
    return plan_for_moments(shape, tuple(axis)) if kind == "moments" else plan_for(shape, kind, axis, groups)


@pytest.mark.parametrize("kind, shape, axis, groups", TRANSPOSED, ids=str)
def test_transposed_plans_round_trip_and_reduce_the_right_axes(kind, shape, axis, groups, rng):
    p = _plan(shape, kind, axis, groups)
    assert p.perm is not None
    x = rng.normal(size=shape)
    v = p.to_view(x)
    assert v.shape == p.view and v.flags.c_contiguous
    np.testing.assert_array_equal(p.from_view(v), x)
    _assert_stats_map_back(p, v, x, kind, axis)


@pytest.mark.parametrize(
    "kind, axis, flat, padded, view",
    [
        ("batch", (1, 3), (4, 3, 5, 2), (4, 3, 1, 2), (1, 4, 6, 1, 1)),
        ("batch", (0, 2), (3, 4, 5), (3, 1, 5), (1, 1, 15, 1, 1)),
        ("layer", (0,), (6, 5), (6, 1), (1, 1, 1, 6, 1)),
        ("layer", (0, 2), (3, 4, 5), (3, 1, 5), (1, 1, 1, 15, 1)),
        ("moments", (1,), (3, 4, 5), (3, 4, 1), (3, 4, 1, 1, 1)),
    ],
    ids=str,
)
def test_size_one_axes_do_not_force_a_transpose(kind, axis, flat, padded, view, rng):
    # the same axis pattern with a real extent there does need one (control)
    assert _plan(flat, kind, axis).perm is not None
    p = _plan(padded, kind, axis)
    assert p.perm is None
    assert p.view == view
    x = rng.normal(size=padded)
    v = p.to_view(x)
    assert np.shares_memory(v, x)
    np.testing.assert_array_equal(p.from_view(v), x)
    _assert_stats_map_back(p, v, x, kind, axis)


def _assert_stats_map_back(p, v, x, kind, axis):
    """Per-(a, c) means of the view, mapped back, equal numpy's over the reduced axes."""
    got = p.stats_from_view(v.mean(axis=(1, 3, 4)))
    if kind == "moments":
        want = x.mean(axis=axis)
    else:
        want = REFERENCES[kind](x, axis=list(axis)).mean
    assert got.shape == want.shape == p.stat_shape
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------
# Any roles: the view reduces, maps back and lays out affine tables correctly


@st.composite
def role_cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=5)))
    axes = st.sets(st.integers(0, len(shape) - 1))
    return shape, draw(axes), draw(axes), draw(st.integers(0, 2**32 - 1))


@FAST
@given(case=role_cases())
def test_any_roles_give_a_faithful_view(case):
    shape, stat, affine = case[:3]
    r = np.random.default_rng(case[3])
    p = plan_from_roles(shape, stat, affine)
    ndim = len(shape)
    x = r.normal(size=shape)
    v = p.to_view(x)
    assert v.shape == p.view and v.flags.c_contiguous
    np.testing.assert_array_equal(p.from_view(v), x)

    # statistics: per (a, c) over b, d, e
    reduced = tuple(i for i in range(ndim) if i not in stat)
    A, _, Cv, D, _ = p.view
    got = p.stats_from_view(v.mean(axis=(1, 3, 4)))
    want = x.mean(axis=reduced) if reduced else x
    assert got.shape == want.shape == p.stat_shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert p.count * max(int(np.prod(p.stat_shape)), 1) == x.size

    # a table of per-statistic values broadcasts back to where it came from
    s_axes = tuple(sorted(stat))
    s_vals = r.normal(size=tuple(shape[a] for a in s_axes))
    s_tab = p.table(p.expand(s_vals, s_axes), p.stat_axes, A, Cv)
    back = p.from_view(np.ascontiguousarray(np.broadcast_to(s_tab.reshape(A, 1, Cv, 1, 1), p.view)))
    np.testing.assert_array_equal(back, np.broadcast_to(p.expand(s_vals, s_axes), shape))

    # and so does a table of affine parameters, per (c, d)
    f_axes = tuple(sorted(affine))
    f_vals = r.normal(size=tuple(shape[a] for a in f_axes))
    f_tab = p.table(p.expand(f_vals, f_axes), p.affine_axes, Cv, D)
    back = p.from_view(np.ascontiguousarray(np.broadcast_to(f_tab.reshape(1, 1, Cv, D, 1), p.view)))
    np.testing.assert_array_equal(back, np.broadcast_to(p.expand(f_vals, f_axes), shape))


@FAST
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5).map(tuple),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_group_plans_reduce_contiguous_channel_groups(shape, data, seed):
    ch = data.draw(st.integers(1, len(shape) - 1))
    groups = data.draw(st.sampled_from([d for d in range(1, shape[ch] + 1) if shape[ch] % d == 0]))
    p = plan_for(shape, "group", (ch,), groups)
    assert p.stat_shape == (shape[0], groups)
    x = np.random.default_rng(seed).normal(size=shape)
    v = p.to_view(x)
    np.testing.assert_array_equal(p.from_view(v), x)
    got = p.stats_from_view(v.mean(axis=(1, 3, 4)))
    want = REFERENCES["group"](x, groups=groups, axis=ch).mean
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# Axis validation


def test_normalize_axes_accepts_ints_negatives_lists_and_numpy_ints():
    assert normalize_axes(-1, 4) == (3,)
    assert normalize_axes([3, -4, 1], 4) == (0, 1, 3)
    assert normalize_axes((np.int64(2),), 3) == (2,)
    assert normalize_axes([], 3) == ()


@pytest.mark.parametrize(
    "axis, exc, match",
    [
        (3, ValueError, r"axes=3 is out of range for an input of rank 3: expected values in \[-3, 2\]"),
        ([0, -4], ValueError, r"axes=\[0, -4\] is out of range"),
        ([0, -3], ValueError, r"axes=\[0, -3\] names the same axis twice for an input of rank 3"),
        (1.5, TypeError, r"axes must be an int or a list of ints, got 1\.5"),
        ([True], TypeError, r"got \[True\]"),
        ("0", TypeError, r"got '0'"),
    ],
    ids=["out of range", "negative out of range", "duplicate", "float", "bool in list", "str"],
)
def test_normalize_axes_errors_name_the_value(axis, exc, match):
    with pytest.raises(exc, match=match):
        normalize_axes(axis, 3, name="axes")


def test_plan_for_rejects_an_unknown_kind():
    with pytest.raises(InvalidArgument, match=r"kind='batchnorm': expected one of batch, layer"):
        plan_for((2, 3), "batchnorm", (1,))
