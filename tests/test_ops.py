"""normsvc.ops against the float64 references in tests/reference.py.

Tolerances: see Y_RTOL / STAT_RTOL in reference.py (fractions of the size of
the terms being added, per input dtype).
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normsvc
from normsvc import Moments, ops
from normsvc.kernels import cpu
from reference import (
    LAYOUTS,
    REFERENCES,
    STAT_RTOL,
    assert_stats_close,
    assert_y_close,
    ref_moments,
    ref_normalize,
    with_layout,
)

DTYPES = (np.float16, np.float32, np.float64)
NORMS = {
    "batch": ops.batch_norm,
    "layer": ops.layer_norm,
    "instance": ops.instance_norm,
    "group": ops.group_norm,
    "rms": ops.rms_norm,
}
# numba compiles (or loads its cache) on first use: no per-example deadline.
FAST = settings(max_examples=60, deadline=None)


def _values(seed: int, shape: tuple) -> np.ndarray:
    """Normal data with a random offset and scale (float64)."""
    r = np.random.default_rng(seed)
    return r.normal(r.uniform(-3, 3), r.uniform(0.3, 3), size=shape)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def norm_cases(draw, kinds=tuple(NORMS)):
    """(kind, x, kwargs) with shapes of rank 1..5, dims 1..7, every axis spelling."""
    kind = draw(st.sampled_from(kinds))
    min_rank = 2 if kind in ("instance", "group") else 1
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=min_rank, max_size=5)))
    ndim = len(shape)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    x = with_layout(_values(draw(st.integers(0, 2**32 - 1)), shape), dtype, layout)
    kwargs = {}
    affine = draw(st.sampled_from(["none", "gamma", "beta", "both"]))
    if kind == "rms" and affine in ("beta", "both"):
        affine = "gamma"
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind in ("batch", "layer", "rms"):
        axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
        if affine != "none":
            # gamma/beta are laid out along the axes in increasing order; keep the
            # spelling in that order so the expected parameter shape is unambiguous
            axes = sorted(axes)
        affine_shape = tuple(shape[a] for a in sorted(axes))
        spelled = [a - ndim if draw(st.booleans()) else a for a in axes]
        kwargs["axis"] = spelled[0] if len(spelled) == 1 and draw(st.booleans()) else spelled
    else:
        ch = draw(st.integers(1, ndim - 1))
        kwargs["axis"] = ch - ndim if draw(st.booleans()) else ch
        affine_shape = (shape[ch],)
        if kind == "group":
            kwargs["groups"] = draw(st.sampled_from(_divisors(shape[ch]) + [-1]))
    if affine in ("gamma", "both"):
        kwargs["gamma"] = r.normal(1.0, 0.5, size=affine_shape)
    if affine in ("beta", "both"):
        kwargs["beta"] = r.normal(0.0, 1.0, size=affine_shape)
    eps = draw(st.sampled_from([None, 1e-5, 0.1]))
    if eps is not None:
        kwargs["epsilon"] = eps
    return kind, x, kwargs


# ---------------------------------------------------------------------------
# Training mode, inference mode, moments and normalize against the references


@FAST
@given(case=norm_cases())
def test_norms_match_reference_in_training_mode(case):
    kind, x, kwargs = case
    before = x.copy()
    y, m = NORMS[kind](x, **kwargs)
    ref = REFERENCES[kind](x, **kwargs)
    np.testing.assert_array_equal(x, before, err_msg="the input was modified")
    assert y.dtype == x.dtype
    assert_y_close(y, ref, x.dtype)
    assert isinstance(m, Moments)
    assert_stats_close(m.mean, m.variance, x, ref, x.dtype)
    assert np.all(m.count == x.size // max(ref.mean.size, 1))


@FAST
@given(case=norm_cases(kinds=("batch", "layer", "instance", "group")), seed=st.integers(0, 2**32 - 1))
def test_norms_in_inference_mode_use_the_given_statistics(case, seed):
    kind, x, kwargs = case
    stat_shape = REFERENCES[kind](x, **kwargs).mean.shape
    r = np.random.default_rng(seed)
    mean = r.normal(0, 2, size=stat_shape)
    variance = r.uniform(0.1, 4, size=stat_shape)
    y, m = NORMS[kind](x, mean=mean, variance=variance, **kwargs)
    assert m is None
    assert y.dtype == x.dtype
    assert_y_close(y, REFERENCES[kind](x, mean=mean, variance=variance, **kwargs), x.dtype)


@FAST
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=5).map(tuple),
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    keepdims=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_moments_match_reference(shape, data, dtype, layout, keepdims, seed):
    ndim = len(shape)
    axes = data.draw(st.lists(st.integers(-ndim, ndim - 1), max_size=ndim, unique_by=lambda a: a % ndim))
    if len(axes) == 1 and data.draw(st.booleans()):
        axes = axes[0]
    x = with_layout(_values(seed, shape), dtype, layout)
    m = ops.moments(x, axes, keepdims=keepdims)
    mean, var = ref_moments(x, axes, keepdims=keepdims)
    tol = STAT_RTOL[np.dtype(dtype)]
    scale = float(np.abs(x.astype(np.float64)).max())
    assert m.mean.shape == mean.shape and m.variance.shape == var.shape
    assert m.mean.dtype == np.float64
    np.testing.assert_allclose(m.mean, mean, rtol=0, atol=tol * scale)
    np.testing.assert_allclose(m.variance, var, rtol=0, atol=tol * scale * scale)
    assert np.all(m.count == x.size // max(mean.size, 1))


@FAST
@given(data=st.data(), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**32 - 1))
def test_normalize_broadcasts_like_tf_batch_normalization(data, dtype, layout, seed):
    shape = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple))
    r = np.random.default_rng(seed)
    x = with_layout(_values(seed, shape), dtype, layout)

    def param(low, high, optional):
        if optional and data.draw(st.booleans()):
            return None
        # a trailing slice of x's shape with some sides set to 1 (never a larger broadcast)
        lead = data.draw(st.integers(0, len(shape)))
        pshape = tuple(s if data.draw(st.booleans()) else 1 for s in shape[lead:])
        return r.uniform(low, high, size=pshape)

    mean, variance = param(-2, 2, False), param(0.05, 3, False)
    offset, scale = param(-1, 1, True), param(-2, 2, True)
    eps = data.draw(st.sampled_from([1e-3, 1e-5, 0.5]))
    y = ops.normalize(x, mean, variance, offset=offset, scale=scale, epsilon=eps)
    assert y.dtype == x.dtype
    ref = ref_normalize(x, mean, variance, offset=offset, scale=scale, epsilon=eps)
    assert_y_close(y, ref, dtype)


# ---------------------------------------------------------------------------
# Above the serial threshold: the parallel kernels

LARGE = [
    ("batch", (32, 16, 16, 64), dict(axis=-1)),
    ("batch", (32, 64, 16, 16), dict(axis=1)),
    ("batch", (16, 8, 32, 16), dict(axis=[1, 3])),  # needs a transpose
    ("instance", (32, 16, 16, 64), dict(axis=-1)),
    ("instance", (32, 64, 16, 16), dict(axis=1)),
    ("group", (32, 16, 16, 64), dict(axis=-1, groups=8)),
    ("group", (32, 64, 16, 16), dict(axis=1, groups=8)),
    ("layer", (2048, 256), dict(axis=-1)),
    ("layer", (64, 32, 40), dict(axis=[1, 2])),
    ("layer", (256, 300), dict(axis=0)),  # statistics per column
    ("rms", (2048, 256), dict(axis=-1)),
]


def _affine_shape(kind, shape, kwargs):
    """gamma/beta shape: per channel (instance, group), else along the axes in increasing order."""
    ndim = len(shape)
    if kind in ("instance", "group"):
        return (shape[kwargs["axis"] % ndim],)
    return tuple(shape[a] for a in sorted(int(a) % ndim for a in np.atleast_1d(kwargs["axis"])))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind, shape, kwargs", LARGE, ids=lambda v: str(v).replace(" ", ""))
def test_large_inputs_take_the_parallel_path_correctly(kind, shape, kwargs, dtype, rng):
    assert np.prod(shape) >= cpu.SERIAL_BELOW  # the case is meant to be parallel
    x = rng.normal(0.5, 2.0, size=shape).astype(dtype)
    pshape = _affine_shape(kind, shape, kwargs)
    kw = dict(kwargs, gamma=rng.normal(1, 0.3, size=pshape))
    if kind != "rms":
        kw["beta"] = rng.normal(0, 1, size=pshape)
    y, m = NORMS[kind](x, **kw)
    ref = REFERENCES[kind](x, **kw)
    assert_y_close(y, ref, dtype)
    assert_stats_close(m.mean, m.variance, x, ref, dtype)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_large_non_contiguous_input(layout, rng):
    x = with_layout(rng.normal(size=(16, 32, 16, 16)), np.float32, layout)
    y, m = ops.batch_norm(x, axis=1)
    ref = REFERENCES["batch"](x, axis=1)
    assert_y_close(y, ref, np.float32)
    assert_stats_close(m.mean, m.variance, x, ref, np.float32)


# ---------------------------------------------------------------------------
# Large offsets: |mean| = 1e4 and 1e5 times the standard deviation

OFFSET_CASES = [
    ("batch", (256, 64), dict(axis=-1)),  # serial path
    ("batch", (64, 16, 16, 32), dict(axis=-1)),  # channels-last, parallel
    ("batch", (64, 32, 16, 16), dict(axis=1)),  # channels-first, parallel
    ("layer", (512, 256), dict(axis=-1)),
    ("instance", (4, 8, 32, 32), dict(axis=1)),
    ("group", (8, 16, 16, 32), dict(axis=-1, groups=4)),
]


@pytest.mark.parametrize("ratio", [1e4, 1e5])
@pytest.mark.parametrize("kind, shape, kwargs", OFFSET_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_float32_variance_survives_a_large_offset(kind, shape, kwargs, ratio, rng):
    """float32 data with |mean| = ratio * std: variance within 1e-4 of the float64 answer.

    The float64 answer is the variance of the very same float32 values, so
    any difference is the implementation's rounding.  The naive float32
    formula E[x**2] - E[x]**2 loses everything here: x**2 ~ ratio**2 * std**2
    carries a float32 rounding error of ~6e-8 * ratio**2 * std**2, which is
    6 (ratio 1e4) to 600 (ratio 1e5) times the variance itself.  The test
    computes that naive value too and asserts it misses the bound, so the
    bound discriminates.
    """
    std = rng.uniform(0.01, 10)
    sign = rng.choice([-1.0, 1.0])
    x = (sign * ratio * std + std * rng.normal(size=shape)).astype(np.float32)
    y, m = NORMS[kind](x, **kwargs)
    ref = REFERENCES[kind](x, **kwargs)

    rel = np.abs(m.variance - ref.variance) / ref.variance
    assert rel.max() <= 1e-4, f"variance relative error {rel.max():.3g}"
    assert (np.abs(m.mean - ref.mean) / np.sqrt(ref.variance)).max() <= 1e-4
    assert_y_close(y, ref, np.float32)

    # the naive single-pass float32 formula fails the same bound
    naive = _naive_float32_variance(kind, x, kwargs).reshape(ref.variance.shape)
    naive_rel = np.abs(naive - ref.variance) / ref.variance
    assert naive_rel.max() > 1e-4, "the naive formula passes: the test would not discriminate"


def _naive_float32_variance(kind, x, kwargs):
    """E[x**2] - E[x]**2 per statistic group, accumulated in float32 (numpy, pairwise)."""
    ax = kwargs["axis"] % x.ndim
    if kind == "group":
        g = kwargs["groups"]
        x = x.reshape(x.shape[:ax] + (g, x.shape[ax] // g) + x.shape[ax + 1 :])
    keep = {"batch": (ax,), "layer": tuple(a for a in range(x.ndim) if a != ax)}.get(kind, (0, ax))
    red = tuple(a for a in range(x.ndim) if a not in keep)
    e1 = x.mean(axis=red, dtype=np.float32)
    e2 = (x * x).mean(axis=red, dtype=np.float32)
    return (e2 - e1 * e1).astype(np.float64)


@pytest.mark.parametrize("ratio", [1e4, 1e5])
def test_moments_of_float32_with_a_large_offset(ratio, rng):
    x = (-ratio * 0.5 + 0.5 * rng.normal(size=(300, 40))).astype(np.float32)
    m = ops.moments(x, [0])
    _, var = ref_moments(x, [0])
    assert (np.abs(m.variance - var) / var).max() <= 1e-4
    naive = (x * x).mean(axis=0, dtype=np.float32) - x.mean(axis=0, dtype=np.float32) ** 2
    assert (np.abs(naive - var) / var).max() > 1e-4


# ---------------------------------------------------------------------------
# Semantics: Keras anchors and consistency between the norms


def test_group_norm_with_groups_minus_one_is_instance_norm(rng):
    x = rng.normal(size=(3, 5, 4, 6)).astype(np.float32)
    gamma, beta = rng.normal(size=6), rng.normal(size=6)
    yg, mg = ops.group_norm(x, groups=-1, gamma=gamma, beta=beta)
    yi, mi = ops.instance_norm(x, gamma=gamma, beta=beta)
    assert mg.mean.shape == mi.mean.shape == (3, 6)
    np.testing.assert_allclose(yg, yi, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mg.variance, mi.variance, rtol=1e-12)


def test_group_norm_groups_are_contiguous_channel_blocks(rng):
    """Channels 0..2 form group 0 in Keras (not channels 0, 4, 8 as a strided split would)."""
    x = rng.normal(size=(2, 5, 12))
    x[..., :3] += 100.0  # only group 0 of 4 is shifted
    _, m = ops.group_norm(x, groups=4)
    np.testing.assert_allclose(m.mean[:, 0], x[..., :3].mean(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_allclose(m.mean[:, 1], x[..., 3:6].mean(axis=(1, 2)), atol=1e-12)


def test_group_norm_with_one_group_is_layer_norm_over_the_non_batch_axes(rng):
    x = rng.normal(size=(4, 3, 5, 8))
    yg, mg = ops.group_norm(x, groups=1)
    yl, ml = ops.layer_norm(x, axis=[1, 2, 3])
    np.testing.assert_allclose(yg, yl, atol=1e-12)
    np.testing.assert_allclose(mg.mean.reshape(4), ml.mean, atol=1e-12)


def test_channels_first_equals_channels_last_transposed(rng):
    x = rng.normal(size=(4, 6, 5, 3)).astype(np.float32)  # N, C, H, W
    gamma = rng.normal(size=6)
    for f in (ops.batch_norm, ops.instance_norm):
        y1, m1 = f(x, axis=1, gamma=gamma)
        y2, m2 = f(np.moveaxis(x, 1, -1), axis=-1, gamma=gamma)
        np.testing.assert_allclose(y1, np.moveaxis(y2, -1, 1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m1.variance, m2.variance, rtol=1e-12)


def test_statistics_have_the_per_group_shape(rng):
    x = rng.normal(size=(2, 3, 4, 6))
    assert ops.batch_norm(x)[1].mean.shape == (6,)
    assert ops.batch_norm(x, axis=1)[1].mean.shape == (3,)
    assert ops.batch_norm(x, axis=[1, 3])[1].mean.shape == (3, 6)
    assert ops.layer_norm(x)[1].mean.shape == (2, 3, 4)
    assert ops.layer_norm(x, axis=[1, 3])[1].mean.shape == (2, 4)
    assert ops.instance_norm(x)[1].mean.shape == (2, 6)
    assert ops.instance_norm(x, axis=1)[1].mean.shape == (2, 3)
    assert ops.group_norm(x, groups=2)[1].mean.shape == (2, 2)
    assert ops.rms_norm(x, axis=[-2, -1])[1].mean.shape == (2, 3)
    # a full reduction gives 0-d statistics, as tf.nn.moments
    assert ops.moments(x, [0, 1, 2, 3]).mean.shape == ()
    assert ops.layer_norm(rng.normal(size=7))[1].variance.shape == ()
    assert ops.moments(x, [0, 2], keepdims=True).mean.shape == (1, 3, 1, 6)


def test_torch_shaped_parameters_are_accepted(rng):
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    y1, _ = ops.batch_norm(x, axis=1, gamma=gamma, beta=beta)
    y2, _ = ops.batch_norm(x, axis=1, gamma=gamma.reshape(1, 3, 1, 1), beta=beta.reshape(1, 3, 1, 1))
    np.testing.assert_array_equal(y1, y2)


def test_scalar_statistics_in_inference_mode(rng):
    x = rng.normal(size=(5, 4))
    y, m = ops.batch_norm(x, mean=1.5, variance=2.0, epsilon=0.0)
    assert m is None
    np.testing.assert_allclose(y, (x - 1.5) / np.sqrt(2.0), atol=1e-12)


@pytest.mark.parametrize("rows", [40, 400])  # serial and parallel paths
def test_constant_groups_have_zero_variance(rows, rng):
    x = np.repeat(rng.normal(size=(1, 300)), rows, axis=0)  # every column constant
    m = ops.moments(x, 0)
    np.testing.assert_array_equal(m.variance, 0.0)
    np.testing.assert_allclose(m.mean, x[0], rtol=1e-15)
    y, m = ops.batch_norm(x, beta=np.full(300, 0.5))
    np.testing.assert_allclose(y, 0.5, atol=1e-12)


def test_epsilon_zero_with_a_constant_group_does_not_raise(rng):
    """0/0 in one group is that group's business (NaN, as numpy), not an exception."""
    x = rng.normal(size=(50, 3))
    x[:, 1] = 2.0
    with np.errstate(all="ignore"):
        y, m = ops.batch_norm(x, epsilon=0.0)
    assert m.variance[1] == 0.0
    ref = REFERENCES["batch"](x[:, [0, 2]], epsilon=0.0)
    assert_y_close(y[:, [0, 2]], ref, np.float64)


def test_moments_over_no_axes_has_zero_variance(rng):
    x = rng.normal(size=(3, 4))
    m = ops.moments(x, [])
    assert m.mean.shape == (3, 4) and np.all(m.count == 1)
    np.testing.assert_array_equal(m.mean, x)
    np.testing.assert_array_equal(m.variance, 0.0)


def test_nested_lists_are_accepted_as_float64():
    y, m = ops.batch_norm([[1, 2], [3, 6]], epsilon=0.0)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, [[-1, -1], [1, 1]])
    np.testing.assert_allclose(m.variance, [1.0, 4.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_stay_in_their_group(dtype, rng):
    x = rng.normal(size=(6, 5, 4)).astype(dtype)
    x[2, 1, 1] = np.nan
    x[3, 2, 3] = np.inf
    y, m = ops.batch_norm(x)
    assert np.isnan(m.mean[1]) and not np.isfinite(m.variance[3])
    assert np.isnan(y[..., 1]).all() and not np.isfinite(y[..., 3]).any()
    clean = np.delete(x, [1, 3], axis=-1)
    ref = REFERENCES["batch"](clean)
    assert_y_close(np.delete(y, [1, 3], axis=-1), ref, dtype)


def test_module_examples_run():
    for module in (ops, normsvc):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0
    assert doctest.testmod(ops).attempted > 0


# ---------------------------------------------------------------------------
# Errors name the bad value and what was expected

X = np.zeros((2, 3, 4, 6), np.float32)  # (N, H, W, C=6)
# A list axis may be echoed back as a list or a tuple: both name the value.
X2 = np.zeros((2, 4))

ERRORS = [
    # axes
    ("axis out of range", lambda: ops.batch_norm(X, axis=4), ValueError,
     r"axis=4 is out of range for an input of rank 4: expected values in \[-4, 3\]"),
    ("negative axis out of range", lambda: ops.layer_norm(X, axis=-5), ValueError, r"axis=-5 is out of range.*rank 4"),
    ("axis list out of range", lambda: ops.rms_norm(X, axis=[1, 7]), ValueError, r"axis=[\[(]1, 7[\])] is out of range"),
    ("moments axes out of range", lambda: ops.moments(X, [0, 4]), ValueError, r"axes=\[0, 4\] is out of range"),
    ("duplicate axis", lambda: ops.batch_norm(X, axis=[1, -3]), ValueError, r"axis=[\[(]1, -3[\])] names the same axis twice"),
    ("duplicate moments axes", lambda: ops.moments(X, [2, 2]), ValueError, r"axes=\[2, 2\] names the same axis twice"),
    ("float axis", lambda: ops.batch_norm(X, axis=1.0), TypeError, r"axis must be an int or a list of ints, got 1\.0"),
    ("str axis", lambda: ops.layer_norm(X, axis="1"), TypeError, r"axis must be an int or a list of ints, got '1'"),
    ("bool axis", lambda: ops.batch_norm(X, axis=True), TypeError, r"axis must be an int or a list of ints, got True"),
    ("None axis", lambda: ops.layer_norm(X, axis=None), TypeError, r"got None"),
    ("float in axis list", lambda: ops.layer_norm(X, axis=[1, 2.0]), TypeError, r"got \[1, 2\.0\]"),
    ("instance axis list", lambda: ops.instance_norm(X, axis=[3]), TypeError,
     r"axis must be an int \(the channel axis\) for instance norm, got [\[(]3,?[\])]"),
    ("instance axis 0", lambda: ops.instance_norm(X, axis=0), ValueError,
     r"axis=0 is the batch axis 0: expected the channel axis \(1 \.\. 3, or -1\)"),
    ("group axis -4 is axis 0", lambda: ops.group_norm(X, groups=1, axis=-4), ValueError, r"axis=-4 is the batch axis"),
    ("instance on rank 1", lambda: ops.instance_norm(np.zeros(5)), ValueError, r"x has rank 1, expected >= 2"),
    # groups
    ("groups > C", lambda: ops.group_norm(X, groups=12), ValueError,
     r"groups=12 is more than the 6 channels along axis -1: expected groups <= 6"),
    ("C % groups", lambda: ops.group_norm(X, groups=4), ValueError,
     r"groups=4 does not divide the 6 channels along axis -1: expected a divisor of 6"),
    ("default 32 groups on 6 channels", lambda: ops.group_norm(X), ValueError, r"groups=32 is more than the 6 channels"),
    ("groups=0", lambda: ops.group_norm(X, groups=0), ValueError, r"groups=0: expected a positive number of groups"),
    ("groups=-2", lambda: ops.group_norm(X, groups=-2), ValueError, r"groups=-2: expected a positive number"),
    ("bool groups", lambda: ops.group_norm(X, groups=True), TypeError, r"groups must be an int, got True"),
    ("float groups", lambda: ops.group_norm(X, groups=2.0), TypeError, r"groups must be an int, got 2\.0"),
    # affine parameters
    ("gamma wrong shape", lambda: ops.batch_norm(X, gamma=np.ones(5)), ValueError,
     r"gamma has shape \(5,\): expected \(6,\)"),
    ("beta wrong shape", lambda: ops.batch_norm(X, beta=np.ones((6, 2))), ValueError,
     r"beta has shape \(6, 2\): expected \(6,\)"),
    ("layer gamma wrong shape", lambda: ops.layer_norm(X, axis=[2, 3], gamma=np.ones(6)), ValueError,
     r"gamma has shape \(6,\): expected \(4, 6\)"),
    ("group gamma per group", lambda: ops.group_norm(X, groups=3, gamma=np.ones(3)), ValueError,
     r"gamma has shape \(3,\): expected \(6,\) \(one value per channel along axis 3\)"),
    ("instance beta wrong shape", lambda: ops.instance_norm(X, axis=1, beta=np.ones(6)), ValueError,
     r"beta has shape \(6,\): expected \(3,\)"),
    ("rms gamma wrong shape", lambda: ops.rms_norm(X, gamma=np.ones(4)), ValueError,
     r"gamma has shape \(4,\): expected \(6,\)"),
    ("gamma not numeric", lambda: ops.batch_norm(X, gamma="abc"), TypeError, r"gamma must be a numeric array, got str"),
    # input
    ("int64 array", lambda: ops.batch_norm(np.ones((2, 3), np.int64)), TypeError,
     r"x has dtype int64: expected float16, float32, float64 or bfloat16"),
    ("int32 array to moments", lambda: ops.moments(np.ones((2, 3), np.int32), 0), TypeError, r"x has dtype int32"),
    ("uint8 array", lambda: ops.layer_norm(np.ones((2, 3), np.uint8)), TypeError, r"x has dtype uint8"),
    ("bool array", lambda: ops.rms_norm(np.ones((2, 3), bool)), TypeError, r"x has dtype bool"),
    ("complex array", lambda: ops.layer_norm(np.ones((2, 3), np.complex128)), TypeError,
     r"x has dtype complex128: expected float16, float32, float64 or bfloat16"),
    ("complex list", lambda: ops.batch_norm([1j, 2.0]), TypeError, r"x has dtype complex128"),
    ("empty", lambda: ops.batch_norm(np.zeros((0, 6), np.float32)), ValueError,
     r"x has shape \(0, 6\) with no elements: expected a non-empty array"),
    ("empty to moments", lambda: ops.moments(np.zeros((3, 0)), 0), ValueError, r"x has shape \(3, 0\) with no elements"),
    ("scalar", lambda: ops.layer_norm(np.float32(1.0)), ValueError, r"x is a scalar: expected an array of rank >= 1"),
    ("python scalar", lambda: ops.normalize(3.0, 0.0, 1.0), ValueError, r"x is a scalar"),
    # epsilon
    ("epsilon negative", lambda: ops.batch_norm(X, epsilon=-0.1), ValueError, r"epsilon=-0\.1: expected a finite number >= 0"),
    ("epsilon nan", lambda: ops.layer_norm(X, epsilon=float("nan")), ValueError, r"epsilon=nan: expected a finite number"),
    ("epsilon inf", lambda: ops.rms_norm(X, epsilon=float("inf")), ValueError, r"epsilon=inf"),
    ("epsilon string", lambda: ops.group_norm(X, groups=2, epsilon="abc"), TypeError, r"epsilon must be a number, got 'abc'"),
    ("epsilon numeric string", lambda: ops.batch_norm(X, epsilon="1e-3"), TypeError, r"epsilon must be a number, got '1e-3'"),
    ("epsilon None", lambda: ops.instance_norm(X, epsilon=None), TypeError, r"epsilon must be a number, got None"),
    ("normalize epsilon", lambda: ops.normalize(X2, 0.0, 1.0, epsilon=-1), ValueError, r"epsilon=-1"),
    # normalize
    ("normalize non-broadcastable mean", lambda: ops.normalize(X2, np.zeros(3), np.ones(4)), ValueError,
     r"mean has shape \(3,\): expected a shape that broadcasts to x \(2, 4\)"),
    ("normalize mean grows x", lambda: ops.normalize(X2, np.zeros((2, 1)), np.ones((3, 2, 4))), ValueError,
     r"variance has shape \(3, 2, 4\): expected at most 2 dims"),
    ("normalize scale", lambda: ops.normalize(X2, 0.0, 1.0, scale=np.ones((2, 3))), ValueError,
     r"scale has shape \(2, 3\): expected a shape that broadcasts to x \(2, 4\)"),
    ("normalize without variance", lambda: ops.normalize(X2, np.zeros(4), None), ValueError,
     r"normalize got None for variance: expected arrays for both mean and variance"),
    ("normalize without mean", lambda: ops.normalize(X2, None, np.ones(4)), ValueError, r"got None for mean"),
    ("normalize negative variance", lambda: ops.normalize(X2, 0.0, -np.ones(4)), ValueError,
     r"variance has negative entries: expected variances >= 0"),
    ("normalize non-numeric offset", lambda: ops.normalize(X2, 0.0, 1.0, offset="a"), TypeError,
     r"offset must be a numeric array, got str"),
    # inference mode
    ("mean without variance", lambda: ops.batch_norm(X, mean=np.zeros(6)), ValueError,
     r"pass both mean and variance \(inference mode\) or neither"),
    ("variance without mean", lambda: ops.group_norm(X, groups=2, variance=np.ones((2, 2))), ValueError,
     r"pass both mean and variance"),
    ("inference mean wrong shape", lambda: ops.batch_norm(X, mean=np.zeros(5), variance=np.ones(6)), ValueError,
     r"mean has shape \(5,\): expected \(6,\)"),
    ("inference variance negative", lambda: ops.layer_norm(X, mean=np.zeros((2, 3, 4)), variance=-np.ones((2, 3, 4))),
     ValueError, r"variance has negative entries"),
    ("group inference per channel", lambda: ops.group_norm(X, groups=3, mean=np.zeros((2, 6)), variance=np.ones((2, 6))),
     ValueError, r"mean has shape \(2, 6\): expected \(2, 3\)"),
]


@pytest.mark.parametrize("name, call, exc, match", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_arguments_raise_precise_errors(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_validation_is_not_skipped_by_a_cached_valid_call():
    """1.0 == True == 1: a cache keyed on == must not let them through after a valid 1."""
    x = np.ones((2, 3, 4), np.float32)
    ops.batch_norm(x, axis=1)
    ops.layer_norm(x, axis=[1, 2])
    ops.instance_norm(x, axis=2)
    ops.group_norm(x, groups=2, axis=2)
    for bad in (1.0, True, np.float64(1.0)):
        with pytest.raises(TypeError, match=r"axis must be an int"):
            ops.batch_norm(x, axis=bad)
    for bad in ([1, 2.0], (1.0, 2), [True, 2]):
        with pytest.raises(TypeError, match=r"axis must be an int or a list of ints"):
            ops.layer_norm(x, axis=bad)
    with pytest.raises(TypeError, match=r"axis must be an int \(the channel axis\)"):
        ops.instance_norm(x, axis=2.0)
    for bad in (2.0, np.float32(2)):
        with pytest.raises(TypeError, match=r"groups must be an int, got"):
            ops.group_norm(x, groups=bad, axis=2)


def test_torch_tensors_that_require_grad_are_taken_as_they_are():
    # no gradient flows through the ops: a tensor that requires grad is read detached, without a copy by the caller
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(np.random.default_rng(5).normal(2.0, 3.0, size=(16, 3))).requires_grad_(True)
    x = t.detach().numpy()
    m = normsvc.moments(t, axes=[0])
    np.testing.assert_allclose(m.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.variance, x.var(axis=0), rtol=1e-12)
    gamma = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
    y, _ = normsvc.batch_norm(t, axis=-1, epsilon=1e-3, gamma=gamma)
    np.testing.assert_allclose(y, 2.0 * (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3), rtol=1e-10)
    mean, var = t.mean(0), t.var(0, unbiased=False)  # statistics that require grad, too
    np.testing.assert_allclose(normsvc.normalize(t, mean, var, epsilon=0.0), (x - x.mean(0)) / x.std(0), rtol=1e-10)
    assert t.requires_grad and t.grad is None


# --- virtual batches and batch renormalization (tf_keras itself: tests/test_golden_tf_keras.py) ---


def test_virtual_batches_normalize_each_interleaved_virtual_batch_with_its_own_statistics(rng):
    x = rng.normal(2.0, 3.0, size=(12, 2, 3)).astype(np.float64)
    y, m = normsvc.batch_norm(x, virtual_batch_size=4, epsilon=1e-3)
    assert m.mean.shape == (3, 3) and float(m.count) == 8  # 3 virtual batches of 4 samples x 2 positions
    for j in range(3):  # tf.keras' split: sample i is in virtual batch i % 3
        ghost = x[j::3]
        mu, var = ghost.mean(axis=(0, 1)), ghost.var(axis=(0, 1))
        np.testing.assert_allclose(m.mean[j], mu, rtol=1e-12)
        np.testing.assert_allclose(y[j::3], (ghost - mu) / np.sqrt(var + 1e-3), rtol=1e-10, atol=1e-12)
    # inference ignores virtual batches: every sample takes the same statistics
    yi, none = normsvc.batch_norm(x, virtual_batch_size=4, mean=np.zeros(3), variance=np.ones(3), epsilon=0.0)
    assert none is None and np.array_equal(yi, x)


@pytest.mark.parametrize("kwargs, field, message", [
    ({"virtual_batch_size": 5}, "virtual_batch_size", "does not divide the batch of 12"),
    ({"virtual_batch_size": 0}, "virtual_batch_size", "expected a positive int"),
    ({"virtual_batch_size": True}, "virtual_batch_size", "expected a positive int"),
    ({"virtual_batch_size": 4, "axis": [0, 2]}, "axis", "keeps the batch axis 0"),
])
def test_bad_virtual_batches_name_the_argument(rng, kwargs, field, message):
    with pytest.raises(normsvc.InvalidArgument, match=message) as info:
        normsvc.batch_norm(rng.normal(size=(12, 3, 2)), **kwargs)
    assert info.value.field == field


def test_batch_renorm_corrects_towards_the_renorm_averages(rng):
    x = rng.normal(1.0, 2.0, size=(32, 4))
    rmean, rstd, eps = np.array([0.5, 1.0, 1.5, 2.0]), np.array([1.0, 2.0, 4.0, 0.5]), 1e-3
    gamma, beta = np.array([1.0, 2.0, 0.5, -1.0]), np.array([0.0, 1.0, -1.0, 0.5])
    y, m = normsvc.batch_renorm(x, rmean, rstd, gamma=gamma, beta=beta, epsilon=eps, rmax=1.5, dmax=0.5)
    mu, s = x.mean(axis=0), np.sqrt(x.var(axis=0) + eps)
    r, d = np.minimum(s / rstd, 1.5), np.clip((mu - rmean) / rstd, -0.5, 0.5)
    np.testing.assert_allclose(y, ((x - mu) / s * r + d) * gamma + beta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.mean, mu, rtol=1e-12)
    # renorm_stddev below sqrt(epsilon) counts as sqrt(epsilon) (tf.keras' guard against dividing by ~0)
    y0, _ = normsvc.batch_renorm(x, np.zeros(4), np.zeros(4), epsilon=eps)
    np.testing.assert_allclose(y0, ((x - mu) / s * (s / np.sqrt(eps)) + mu / np.sqrt(eps)), rtol=1e-10)


@pytest.mark.parametrize("kwargs, field", [
    ({"rmin": 2.0, "rmax": 1.0}, "rmin"),
    ({"dmax": -0.5}, "dmax"),
    ({"rmax": float("nan")}, "rmax"),
    ({"rmax": "3"}, "rmax"),
])
def test_bad_renorm_clipping_names_the_bound(rng, kwargs, field):
    with pytest.raises(normsvc.InvalidArgument) as info:
        normsvc.batch_renorm(rng.normal(size=(8, 2)), np.zeros(2), np.ones(2), **kwargs)
    assert info.value.field == field


def test_renorm_statistics_of_another_shape_are_refused(rng):
    with pytest.raises(normsvc.InvalidArgument) as info:
        normsvc.batch_renorm(rng.normal(size=(8, 2)), np.zeros(3), np.ones(2))
    assert info.value.field == "renorm_mean"


# --- bfloat16: ml_dtypes arrays and torch tensors, computed in float32, returned in bfloat16 ---


@pytest.mark.parametrize("kind, kwargs", [
    ("batch", {"axis": -1}), ("layer", {"axis": [-2, -1]}), ("instance", {"axis": 1}),
    ("group", {"axis": -1, "groups": 2}), ("rms", {"axis": -1}),
])
def test_bfloat16_arrays_follow_the_float64_reference(rng, kind, kwargs):
    from reference import BFLOAT16

    x = (rng.normal(1.0, 3.0, size=(6, 4, 8))).astype(BFLOAT16)
    exact = x.astype(np.float64)  # the reference sees the very values normsvc got
    y, m = normsvc.norm(kind, x, **kwargs)
    assert y.dtype == BFLOAT16 and y.shape == x.shape
    ref_kwargs = dict(kwargs, epsilon=1e-3)
    ref = REFERENCES[kind](exact, **ref_kwargs)
    assert_y_close(y, ref, BFLOAT16)
    assert_stats_close(m.mean, m.variance, exact, ref, BFLOAT16)


def test_torch_bfloat16_tensors_are_read_without_a_copy_and_keep_their_type(rng):
    torch = pytest.importorskip("torch")
    from reference import BFLOAT16

    t = torch.from_numpy(rng.normal(size=(8, 3, 4, 4)).astype(np.float32)).to(torch.bfloat16)
    from normsvc.dtypes import host_view

    view = host_view(t)
    assert view.dtype == BFLOAT16 and view.ctypes.data == t.data_ptr()  # the tensor's own memory
    y, m = normsvc.batch_norm(t, axis=1)
    want, _ = normsvc.batch_norm(view.astype(np.float32), axis=1)
    assert y.dtype == BFLOAT16
    np.testing.assert_array_equal(y, want.astype(BFLOAT16))  # float32 compute, one rounding
    inferred = normsvc.batch_norm(t, axis=1, mean=m.mean, variance=m.variance)[0]
    np.testing.assert_array_equal(inferred.astype(np.float32), y.astype(np.float32))
