"""Float64 numpy references for the five norms, written from the Keras formulas.

Nothing here calls normsvc's kernels: these are the independent answers the
tests compare against (the moments are :func:`normsvc.testing.reference_moments`,
plain numpy, which users may reuse in their own tests).  Every function upcasts ``x`` to float64 first (float16 and
float32 values are exact in float64), reduces with numpy's two-pass
``mean``/``var`` and returns a :class:`Ref` ``(y, mean, variance, magnitude)``
with the statistics in the per-group shape documented by normsvc.ops:

* batch:    the kept feature axes, e.g. (C,) or (C1, C3)
* layer:    the non-normalized axes, in input order
* instance: (N, C)
* group:    (N, G)
* rms:      like layer (ordinary mean and biased variance over the axes)

Training mode uses the batch statistics; passing ``mean`` and ``variance``
(already in the per-group shape) normalizes with those instead.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from normsvc.testing import reference_moments

__all__ = [
    "Ref",
    "REFERENCES",
    "assert_y_close",
    "assert_stats_close",
    "axes_list",
    "ref_moments",
    "ref_normalize",
    "ref_batch_norm",
    "ref_layer_norm",
    "ref_instance_norm",
    "ref_group_norm",
    "ref_rms_norm",
    "Y_RTOL",
    "STAT_RTOL",
    "LAYOUTS",
    "with_layout",
]


class Ref(NamedTuple):
    """A reference answer.

    ``magnitude`` is, per element, the size of the terms any implementation of
    ``(x - mean) * rsqrt(var + eps) * gamma + beta`` (folded into ``x * s + t``
    or not) must add up: ``(|x| + |mean|) * s * |gamma| + |beta| + |y|``.
    Rounding errors scale with it, not with ``|y|``, which cancellation can
    make arbitrarily small; tolerances are fractions of it.
    """

    y: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    magnitude: np.ndarray


def axes_list(axis, ndim: int) -> list[int]:
    """int or list of ints (possibly negative) -> sorted non-negative list."""
    items = [axis] if isinstance(axis, (int, np.integer)) else list(axis)
    return sorted(int(a) % ndim for a in items)


def _along(values, axes: list[int], ndim: int) -> np.ndarray:
    """values shaped like x along ``axes`` (sorted) -> broadcastable to x."""
    v = np.asarray(values, dtype=np.float64)
    shape = [1] * ndim
    for a, s in zip(axes, v.shape):
        shape[a] = s
    return v.reshape(shape)


def ref_moments(x, axes, keepdims=False):
    """tf.nn.moments: mean and biased variance over ``axes``."""
    x = np.asarray(x, dtype=np.float64)
    red = axes_list(axes, x.ndim)
    m = reference_moments(x, red)
    if keepdims:
        return np.expand_dims(m.mean, red), np.expand_dims(m.variance, red)
    return m.mean, m.variance


def ref_normalize(x, mean, variance, offset=None, scale=None, epsilon=1e-3) -> Ref:
    """tf.nn.batch_normalization with numpy broadcasting (statistics returned as given)."""
    x = np.asarray(x, dtype=np.float64)
    mu, var = np.asarray(mean, np.float64), np.asarray(variance, np.float64)
    s = 1.0 / np.sqrt(var + epsilon)
    g = 1.0 if scale is None else np.asarray(scale, np.float64)
    h = 0.0 if offset is None else np.asarray(offset, np.float64)
    y = (x - mu) * s * g + h
    mag = (np.abs(x) + np.abs(mu)) * s * np.abs(g) + np.abs(h) + np.abs(y)
    return Ref(y, mu, var, mag)


def _norm(x, reduce_axes, stat_axes, epsilon, gamma, beta, affine_axes, mean, variance) -> Ref:
    """Shared formula: statistics over ``reduce_axes``, stored over ``stat_axes``."""
    ndim = x.ndim
    red = tuple(reduce_axes)
    if mean is None:
        mu = x.mean(axis=red, keepdims=True)
        var = x.var(axis=red, keepdims=True)
    else:
        mu = _along(mean, stat_axes, ndim)
        var = _along(variance, stat_axes, ndim)
    s = 1.0 / np.sqrt(var + epsilon)
    g = 1.0 if gamma is None else _along(gamma, affine_axes, ndim)
    h = 0.0 if beta is None else _along(beta, affine_axes, ndim)
    y = (x - mu) * s * g + h
    mag = (np.abs(x) + np.abs(mu)) * s * np.abs(g) + np.abs(h) + np.abs(y)
    stat_shape = tuple(x.shape[a] for a in stat_axes)
    return Ref(y, mu.reshape(stat_shape), var.reshape(stat_shape), mag)


def ref_batch_norm(x, axis=-1, epsilon=1e-3, gamma=None, beta=None, mean=None, variance=None) -> Ref:
    """Keras BatchNormalization (training mode): statistics per kept feature axis."""
    x = np.asarray(x, dtype=np.float64)
    kept = axes_list(axis, x.ndim)
    reduce_axes = [a for a in range(x.ndim) if a not in kept]
    return _norm(x, reduce_axes, kept, epsilon, gamma, beta, kept, mean, variance)


def ref_layer_norm(x, axis=-1, epsilon=1e-3, gamma=None, beta=None, mean=None, variance=None) -> Ref:
    """Keras LayerNormalization: statistics over the normalized axes, affine per normalized element."""
    x = np.asarray(x, dtype=np.float64)
    norm_axes = axes_list(axis, x.ndim)
    kept = [a for a in range(x.ndim) if a not in norm_axes]
    return _norm(x, norm_axes, kept, epsilon, gamma, beta, norm_axes, mean, variance)


def ref_instance_norm(x, axis=-1, epsilon=1e-3, gamma=None, beta=None, mean=None, variance=None) -> Ref:
    """Instance norm: statistics per (sample, channel); affine per channel."""
    x = np.asarray(x, dtype=np.float64)
    ch = axis % x.ndim
    reduce_axes = [a for a in range(x.ndim) if a not in (0, ch)]
    return _norm(x, reduce_axes, [0, ch], epsilon, gamma, beta, [ch], mean, variance)


def ref_group_norm(x, groups=32, axis=-1, epsilon=1e-3, gamma=None, beta=None, mean=None, variance=None) -> Ref:
    """Keras GroupNormalization: the channel axis splits into (groups, C // groups).

    Group g holds the contiguous channels g*C/G .. (g+1)*C/G - 1; statistics
    per (sample, group) over the group's channels and every other non-batch
    axis; gamma/beta per channel (reshaped to (G, C/G) alongside x).
    """
    x = np.asarray(x, dtype=np.float64)
    ch = axis % x.ndim
    C = x.shape[ch]
    G = C if groups == -1 else groups
    xg = x.reshape(x.shape[:ch] + (G, C // G) + x.shape[ch + 1 :])
    reduce_axes = [a for a in range(xg.ndim) if a not in (0, ch)]
    split = lambda p: None if p is None else np.asarray(p, np.float64).reshape(G, C // G)  # noqa: E731
    r = _norm(xg, reduce_axes, [0, ch], epsilon, split(gamma), split(beta), [ch, ch + 1], mean, variance)
    return Ref(r.y.reshape(x.shape), r.mean, r.variance, r.magnitude.reshape(x.shape))


def ref_rms_norm(x, axis=-1, epsilon=1e-6, gamma=None) -> Ref:
    """Keras RMSNormalization: ``x * rsqrt(mean(x**2) + eps) * gamma`` over the normalized axes.

    The statistics returned are the ordinary mean and biased variance over
    those axes (what normsvc reports next to y).
    """
    x = np.asarray(x, dtype=np.float64)
    norm_axes = axes_list(axis, x.ndim)
    kept = [a for a in range(x.ndim) if a not in norm_axes]
    red = tuple(norm_axes)
    s = 1.0 / np.sqrt(np.mean(x * x, axis=red, keepdims=True) + epsilon)
    g = 1.0 if gamma is None else _along(gamma, norm_axes, x.ndim)
    y = x * s * g
    mag = np.abs(x) * s * np.abs(g) + np.abs(y)
    stat_shape = tuple(x.shape[a] for a in kept)
    return Ref(y, x.mean(axis=red).reshape(stat_shape), x.var(axis=red).reshape(stat_shape), mag)


REFERENCES = {
    "batch": ref_batch_norm,
    "layer": ref_layer_norm,
    "instance": ref_instance_norm,
    "group": ref_group_norm,
    "rms": ref_rms_norm,
}

# Rounding-error allowance per input dtype, as a fraction of Ref.magnitude.
#
# float64: 1e-11.  The unit roundoff is 1.1e-16; the worst-case bound of a
#   plain running sum over the <= 7**5 = 16807 elements hypothesis generates
#   is n*u ~ 2e-12 relative, and y inherits about that from the statistics.
# float32: 1e-5, about 170 float32 ulps (u = 6e-8).  The design allows
#   pairwise float32 accumulation (error ~ log2(n) * u ~ 1e-6), plus one
#   rounding of y to float32.
# float16: 1e-3, about 2 float16 ulps (u = 4.9e-4): float16 is computed in
#   float32 (error ~1e-6, see above) and y is rounded once to float16 (0.5 ulp).
# A wrong axis, group, epsilon or variance convention moves y by O(1e-3) of
# its magnitude or more, far outside all three.
# bfloat16: 8e-3, about 2 bfloat16 ulps (u = 3.9e-3, 8 bits of mantissa): computed in float32 and
#   rounded once to bfloat16, as float16 is.
import ml_dtypes  # noqa: E402 - numpy's bfloat16

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
Y_RTOL = {np.dtype(np.float64): 1e-11, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-3, BFLOAT16: 8e-3}
# y's absolute floor: a result that rounds into float16's subnormal range (|y| < 6.1e-5, where a relative
# tolerance shrinks to nothing, as for RMS norm's y ~ x near 0) is off by up to half its spacing, 2**-25
Y_ATOL = {np.dtype(np.float16): 2.0**-24}

# Statistics (always float64) of exact inputs, as a fraction of max|x| (mean)
# and max(x**2) (variance).  float64 input: the same n*u argument as above.
# float32/float16 input: the design allows float32 pairwise accumulation for
# them (error ~ log2(n) * u32 ~ 1e-6); 1e-5 leaves a margin.
STAT_RTOL = {np.dtype(np.float64): 1e-11, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-5, BFLOAT16: 1e-5}


def assert_y_close(y, ref: Ref, dtype) -> None:
    """y (any dtype) within Y_RTOL[dtype] * ref.magnitude of ref.y, elementwise."""
    y = np.asarray(y, dtype=np.float64)
    assert y.shape == ref.y.shape, f"y has shape {y.shape}, expected {ref.y.shape}"
    err = np.abs(y - ref.y)
    tol = Y_RTOL[np.dtype(dtype)] * ref.magnitude + Y_ATOL.get(np.dtype(dtype), 0.0)
    bad = ~(err <= tol)  # also catches NaN
    if bad.any():
        i = tuple(int(k[0]) for k in np.nonzero(bad))
        raise AssertionError(
            f"{int(bad.sum())} of {y.size} elements of y differ from the reference; first at {i}: "
            f"got {y[i]!r}, expected {ref.y[i]!r} (|err| {err[i]:.3g} > tol {tol[i]:.3g})"
        )


def assert_stats_close(mean, variance, x, ref: Ref, dtype) -> None:
    """float64 statistics shaped and valued like the reference's."""
    xa = np.abs(np.asarray(x, dtype=np.float64))
    scale = float(xa.max()) if xa.size else 1.0
    rtol = STAT_RTOL[np.dtype(dtype)]
    for name, got, want, tol in (
        ("mean", mean, ref.mean, rtol * scale),
        ("variance", variance, ref.variance, rtol * scale * scale),
    ):
        got = np.asarray(got)
        assert got.dtype == np.float64, f"{name} has dtype {got.dtype}, expected float64"
        assert got.shape == want.shape, f"{name} has shape {got.shape}, expected {want.shape}"
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)


# --------------------------------------------------------------------------
# Test helpers: memory layouts of the same values.

LAYOUTS = ("c", "fortran", "transposed", "strided", "reversed")


def with_layout(values, dtype, layout: str) -> np.ndarray:
    """``values`` cast to ``dtype`` in a given memory layout (same shape, same values).

    c: C-contiguous.  fortran: F-contiguous.  transposed: a transposed view of
    a C-contiguous buffer with the axes reversed.  strided: every other
    element of a buffer twice as large along each axis.  reversed: negative
    strides along every axis.
    """
    v = np.asarray(values).astype(dtype)
    every = (slice(None, None, 2),) * v.ndim
    back = (slice(None, None, -1),) * v.ndim
    if layout == "c":
        return np.ascontiguousarray(v)
    if layout == "fortran":
        return np.asfortranarray(v)
    if layout == "transposed":
        return np.ascontiguousarray(v.T).T
    if layout == "strided":
        buf = np.full(tuple(2 * s for s in v.shape), np.nan, dtype=dtype)
        buf[every] = v
        return buf[every]
    if layout == "reversed":
        return np.ascontiguousarray(v[back])[back]
    raise ValueError(f"unknown layout {layout!r}")
