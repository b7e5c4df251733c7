"""Stateless normalization ops on numpy arrays.

Every function here validates its arguments, maps the input onto the
canonical view of :mod:`normsvc.plan` and runs the two kernels of
:mod:`normsvc.kernels.cpu`: one moments pass, one apply pass.

Training mode (the default) normalizes with the batch statistics:

    mean, var = moments of x over the reduced axes   (biased variance)
    y = (x - mean) * rsqrt(var + epsilon) * gamma + beta

and returns them as :class:`~normsvc.moments.Moments` next to ``y``.  Passing
``mean`` and ``variance`` (e.g. running statistics) normalizes with those
instead, skips the moments pass and returns ``(y, None)``.

``y`` keeps the input dtype; float16 and bfloat16 (``ml_dtypes.bfloat16``
arrays, ``torch.bfloat16`` tensors on either device) are computed in float32,
statistics are always float64.

CUDA arrays (numba device arrays, CuPy arrays, torch CUDA tensors: anything
with ``__cuda_array_interface__``) run on the GPU through
:mod:`normsvc.kernels.cuda`, imported on first use: ``y`` stays on the device
and comes back as the caller's own type (torch and CuPy: a zero-copy wrap;
anything else: a numba device array), the statistics as host float64 arrays.
``device="cuda"`` normalizes a host array on the GPU and returns numpy;
``device="cpu"`` refuses CUDA arrays; ``device="auto"`` (the default) follows
the array.

Examples
--------
>>> import numpy as np
>>> x = np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float32)
>>> y, m = batch_norm(x, epsilon=0.0)
>>> m.mean, m.variance
(array([2., 4.]), array([1., 4.]))
>>> y
array([[-1., -1.],
       [ 1.,  1.]], dtype=float32)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from . import dtypes
from .errors import InvalidArgument, InvalidType
from .kernels import cpu
from .moments import Moments
from . import norms
from .plan import Plan, normalize_axes, plan_for, plan_for_moments, plan_from_roles

__all__ = [
    "norm",
    "moments",
    "normalize",
    "batch_norm",
    "batch_renorm",
    "layer_norm",
    "instance_norm",
    "group_norm",
    "rms_norm",
    "cuda_available",
]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_DEVICES = ("auto", "cpu", "cuda")


def _detached(x):
    """A torch tensor that requires grad, detached (no gradient flows through the ops);
    anything else as it is.  Duck-typed: ``import normsvc`` never imports torch."""
    if getattr(x, "requires_grad", False) and callable(getattr(x, "detach", None)):
        return x.detach()
    return x


def _is_cuda_array(x) -> bool:
    return hasattr(x, "__cuda_array_interface__") or bool(getattr(x, "__cuda_ndarray__", False))


def _cuda():
    """The CUDA kernels, imported on first use: ``import normsvc`` never imports numba.cuda."""
    from .kernels import cuda

    return cuda


def cuda_available() -> bool:
    """Whether a usable CUDA GPU is present (imports numba.cuda on the first call only).

    Under the numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) this is True.
    """
    try:
        return _cuda().available()
    except ImportError:  # numba.cuda (the numba-cuda package) missing
        return False


def _input(x, device="auto"):
    """Validate x: a non-empty float16/32/64 array of rank >= 1.

    Returns a numpy array (CPU path) or a ``kernels.cuda.DeviceInput`` (GPU
    path: x is a CUDA array, or ``device="cuda"``).
    """
    if not isinstance(device, str) or device not in _DEVICES:
        raise InvalidArgument(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'", field="device")
    x = dtypes.host_view(_detached(x))
    if _is_cuda_array(x):
        if device == "cpu":
            raise InvalidArgument(
                "x is a CUDA array but device='cpu': expected a host array (copy it to the host first) "
                "or device='auto'/'cuda'",
                field="x",
            )
        x = _cuda().wrap(x)
    else:
        try:
            if not hasattr(x, "dtype"):
                x = np.asarray(x)
                if x.dtype.kind in "iub":
                    x = x.astype(np.float64)
            x = np.asarray(x)
        except (TypeError, ValueError):  # ragged lists, objects numpy cannot read
            raise InvalidType(f"x must be a numeric array, got {type(x).__name__}", field="x") from None
    if x.dtype not in _FLOATS and not dtypes.is_float(x.dtype):
        raise InvalidType(f"x has dtype {x.dtype}: expected {dtypes.NAMES}", field="x")
    if x.ndim == 0:
        raise InvalidArgument("x is a scalar: expected an array of rank >= 1", field="x")
    if x.size == 0:
        raise InvalidArgument(f"x has shape {x.shape} with no elements: expected a non-empty array", field="x")
    if device == "cuda" and isinstance(x, np.ndarray):
        x = _cuda().host(x)
    return x


def _epsilon(epsilon) -> float:
    if isinstance(epsilon, (str, bytes, bool)):  # float("1e-3") would parse, float(True) is 1.0
        raise InvalidType(f"epsilon must be a number, got {epsilon!r}", field="epsilon")
    try:
        eps = float(epsilon)
    except (TypeError, ValueError):
        raise InvalidType(f"epsilon must be a number, got {epsilon!r}", field="epsilon") from None
    if not (math.isfinite(eps) and eps >= 0):
        raise InvalidArgument(f"epsilon={epsilon!r}: expected a finite number >= 0", field="epsilon")
    return eps


def _param(value, name: str, expected: tuple, what: str, *, scalar: bool = False) -> np.ndarray:
    """A gamma/beta/mean/variance coerced to float64 of shape ``expected``.

    Shapes that differ from ``expected`` only by size-1 axes (e.g. torch's
    (1, C, 1, 1)) are accepted, and with ``scalar`` a single number or the
    trailing axes alone (running statistics, shared by every sample).  CUDA arrays are copied to the host (they are small).
    """
    value = _detached(value)
    if _is_cuda_array(value):
        value = _cuda().to_host(value)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidType(f"{name} must be a numeric array, got {type(value).__name__}", field=name) from None
    if scalar and arr.shape == expected[len(expected) - arr.ndim:]:
        return np.broadcast_to(arr, expected)  # a scalar, or trailing axes shared by every sample
    if arr.shape != expected:
        squeeze = tuple(s for s in arr.shape if s != 1)
        if squeeze != tuple(s for s in expected if s != 1) or arr.size != math.prod(expected):
            raise InvalidArgument(f"{name} has shape {arr.shape}: expected {expected} ({what})", field=name)
        arr = arr.reshape(expected)
    return arr


def _compute_view(x: np.ndarray, plan: Plan) -> np.ndarray:
    if dtypes.is_half(x.dtype):
        x = x.astype(np.float32)
    return plan.to_view(x)


@functools.lru_cache(maxsize=256)
def _unit_tables(rows: int, cols: int, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    # private and never written: left writeable, since readonly arrays would
    # compile a second signature of every kernel
    return np.ones((rows, cols), dtype), np.zeros((rows, cols), dtype)


def _table_dtype(x) -> np.dtype:
    """The dtype of the gamma/beta tables: the CPU apply pass computes in x's precision
    (float16 in float32); the CUDA kernels take float64 tables."""
    if not isinstance(x, np.ndarray) or x.dtype == np.float64:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


@dataclass(frozen=True)
class _Prepared:
    """Everything about one (kind, shape, axis, groups) that does not depend on the data."""

    plan: Plan
    affine_shape: tuple
    what: str  # what gamma/beta hold, for error messages
    rms: bool


def _axis_key(axis):
    """A hashable form of ``axis`` for the cache (lists become tuples).

    The cache compares keys with ==, and 1.0 == True == 1: only plain ints may
    go inside a tuple key (typed=True below separates the top-level types).
    """
    if isinstance(axis, (list, tuple)):
        if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axis):
            raise InvalidType(f"axis must be an int or a list of ints, got {axis!r}", field="axis")
        return tuple(int(a) for a in axis)
    try:
        hash(axis)
    except TypeError:
        raise InvalidType(f"axis must be an int or a list of ints, got {axis!r}", field="axis") from None
    return axis


@functools.lru_cache(maxsize=2048, typed=True)
def _prepare(kind: str, shape: tuple, axis, groups) -> _Prepared:
    """Validate axis/groups against the shape and build the plan (cached: errors are not)."""
    entry = norms.norm(kind)
    ndim = len(shape)
    if entry.axis_role != "channel":
        shown = list(axis) if isinstance(axis, tuple) else axis  # messages echo the caller's list
        axes = normalize_axes(shown, ndim)
        if not axes:
            raise InvalidArgument(
                f"axis={shown!r} names no axis: expected at least one axis of the rank-{ndim} input", field="axis")
        what = entry.affine.format(axes=list(axes))
        return _Prepared(plan_for(shape, kind, axes), tuple(shape[a] for a in axes), what, not entry.centered)
    ch = _channel_axis(kind, axis, ndim)
    channels = shape[ch]
    what = entry.affine.format(axes=ch)
    groups = _groups(groups, channels, axis) if entry.grouped else None
    return _Prepared(plan_for(shape, kind, (ch,), groups), (channels,), what, not entry.centered)


def _channel_axis(kind: str, axis, ndim: int) -> int:
    """The validated, non-negative channel axis of an instance or group norm."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise InvalidType(f"axis must be an int (the channel axis) for {kind} norm, got {axis!r}", field="axis")
    if ndim < 2:
        raise InvalidArgument(
            f"{kind} norm needs a batch axis and a channel axis: x has rank {ndim}, expected >= 2", field="x")
    (ch,) = normalize_axes(axis, ndim)
    if ch == 0:
        raise InvalidArgument(
            f"axis={axis!r} is the batch axis 0: expected the channel axis (1 .. {ndim - 1}, or -1)", field="axis")
    return ch


def _groups(groups, channels: int, axis) -> int:
    """``groups`` resolved (-1: one per channel) and checked against the channel count."""
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)):
        raise InvalidType(f"groups must be an int, got {groups!r}", field="groups")
    groups = channels if groups == -1 else int(groups)
    if groups < 1:
        raise InvalidArgument(
            f"groups={groups}: expected a positive number of groups, or -1 for one group per channel",
            field="groups")
    if groups > channels:
        raise InvalidArgument(
            f"groups={groups} is more than the {channels} channels along axis {axis}: expected groups <= {channels}",
            field="groups")
    if channels % groups:
        raise InvalidArgument(
            f"groups={groups} does not divide the {channels} channels along axis {axis}: "
            f"expected a divisor of {channels}",
            field="groups")
    return groups


def _affine_tables(prep: _Prepared, gamma, beta, dtype):
    plan = prep.plan
    _, _, C, D, _ = plan.view
    ones, zeros = _unit_tables(C, D, dtype)
    if gamma is None and beta is None:
        return ones, zeros
    axes = tuple(sorted(plan.affine_axes))
    tables = []
    for value, name, default in ((gamma, "gamma", ones), (beta, "beta", zeros)):
        if value is None:
            tables.append(default)
        else:
            p = _param(value, name, prep.affine_shape, prep.what)
            tables.append(plan.table(plan.expand(p, axes), plan.affine_axes, C, D).astype(dtype, copy=False))
    return tables


def _norm(kind: str, x, axis, groups, epsilon, gamma, beta, mean, variance, device="auto"):
    """Validate, then moments (unless given) + apply over the plan; returns (y, Moments | None)."""
    x = _input(x, device)
    prep = _prepare(kind, x.shape, _axis_key(axis), groups)
    plan = prep.plan
    eps = _epsilon(epsilon)
    g, h = _affine_tables(prep, gamma, beta, _table_dtype(x))
    if not isinstance(x, np.ndarray):
        return _norm_cuda(prep, x, eps, g, h, mean, variance)
    xv = _compute_view(x, plan)
    if mean is None and variance is None:
        y, mu, m2 = cpu.normalize(xv, eps, prep.rms, g, h)
        stats = Moments._trusted(plan.count, plan.stats_from_view(mu), plan.stats_from_view(m2))
    elif mean is None or variance is None:
        raise InvalidArgument("pass both mean and variance (inference mode) or neither (training mode)")
    else:
        mu, var = _stat_tables(plan, mean, variance)
        if prep.rms:  # y = x * rsqrt(mean(x^2) + eps): no centering
            y = cpu.apply(xv, np.zeros_like(mu), 1.0 / np.sqrt(var + mu * mu + eps), g, h)
        else:
            y = cpu.apply(xv, mu, 1.0 / np.sqrt(var + eps), g, h)
        stats = None
    y = plan.from_view(y)
    if dtypes.is_half(x.dtype):
        y = y.astype(x.dtype)
    return y, stats


def _stat_tables(plan: Plan, mean, variance):
    """Given (inference-mode) statistics as float64 (A, C) tables over the plan's view."""
    A, _, C, _, _ = plan.view
    axes = tuple(sorted(plan.stat_axes))
    shape = plan.stat_shape
    mean_p = _param(mean, "mean", shape, "one value per statistic group, a scalar, or one per group shared by all samples", scalar=True)
    var_p = _param(variance, "variance", shape, "one value per statistic group, a scalar, or one per group shared by all samples", scalar=True)
    if np.any(var_p < 0):
        raise InvalidArgument("variance has negative entries: expected variances >= 0", field="variance")
    mu = plan.table(plan.expand(mean_p, axes), plan.stat_axes, A, C)
    var = plan.table(plan.expand(var_p, axes), plan.stat_axes, A, C)
    return mu, var


def _norm_cuda(prep: _Prepared, x, eps: float, g, h, mean, variance):
    """The GPU branch of _norm: the same plan and tables, kernels.cuda instead of kernels.cpu."""
    plan = prep.plan
    if mean is None and variance is None:
        y, (mu, m2) = _cuda().normalize(x, plan, g, h, eps=eps, rms=prep.rms)
        return y, Moments._trusted(plan.count, plan.stats_from_view(mu), plan.stats_from_view(m2))
    if mean is None or variance is None:
        raise InvalidArgument("pass both mean and variance (inference mode) or neither (training mode)")
    y, _ = _cuda().normalize(x, plan, g, h, eps=eps, rms=prep.rms, stats=_stat_tables(plan, mean, variance))
    return y, None


def moments(x, axes, *, keepdims: bool = False, device="auto") -> Moments:
    """Mean and (biased) variance of ``x`` over ``axes``, as ``tf.nn.moments``.

    Parameters
    ----------
    x : array of float16, float32 or float64
    axes : int or list of ints
        Axes to reduce.
    keepdims : bool
        Keep the reduced axes with size 1.
    device : "auto", "cpu" or "cuda"
        Where to compute (see the module docstring).

    Returns
    -------
    Moments
        float64 statistics shaped like ``x`` without ``axes``.
    """
    x = _input(x, device)
    axes = normalize_axes(axes, x.ndim, name="axes")
    plan = plan_for_moments(x.shape, tuple(axes))
    if isinstance(x, np.ndarray):
        mu, m2 = cpu.moments(_compute_view(x, plan))
    else:
        mu, m2 = _cuda().moments(x, plan)
    m = Moments._trusted(plan.count, plan.stats_from_view(mu), plan.stats_from_view(m2))
    if keepdims:
        m = m.reshape(tuple(1 if i in axes else s for i, s in enumerate(x.shape)))
    return m


@functools.lru_cache(maxsize=1024)
def _broadcast_plan(shape: tuple, stat: frozenset, affine: frozenset) -> Plan:
    return plan_from_roles(shape, set(stat), set(affine))


def normalize(x, mean, variance, *, offset=None, scale=None, epsilon=1e-3, device="auto"):
    """``(x - mean) * rsqrt(variance + epsilon) * scale + offset`` with numpy broadcasting.

    The semantics of ``tf.nn.batch_normalization``: ``mean``, ``variance``,
    ``offset`` and ``scale`` broadcast against ``x`` (which keeps its shape).
    """
    x = _input(x, device)
    eps = _epsilon(epsilon)
    if mean is None or variance is None:
        missing = " and ".join(n for n, v in (("mean", mean), ("variance", variance)) if v is None)
        raise InvalidArgument(f"normalize got None for {missing}: expected arrays for both mean and variance")
    named = {"mean": mean, "variance": variance, "offset": offset, "scale": scale}
    arrays, varies = {}, {}
    for name, value in named.items():
        if value is None:
            continue
        value = _detached(value)
        if _is_cuda_array(value):  # small statistics: to the host, as _param does
            value = _cuda().to_host(value)
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidType(f"{name} must be a numeric array, got {type(value).__name__}", field=name) from None
        if arr.ndim > x.ndim:
            raise InvalidArgument(f"{name} has shape {arr.shape}: expected at most {x.ndim} dims to broadcast to x {x.shape}", field=name)
        try:
            fits = np.broadcast_shapes(arr.shape, x.shape) == x.shape
        except ValueError:
            fits = False
        if not fits:
            raise InvalidArgument(f"{name} has shape {arr.shape}: expected a shape that broadcasts to x {x.shape}", field=name)
        pad = (1,) * (x.ndim - arr.ndim) + arr.shape
        varies[name] = {i for i, s in enumerate(pad) if s != 1}
        arrays[name] = np.broadcast_to(arr, x.shape)
    if np.any(arrays["variance"] < 0):
        raise InvalidArgument("variance has negative entries: expected variances >= 0", field="variance")
    stat = frozenset(varies["mean"] | varies["variance"])
    affine = frozenset(varies.get("scale", set()) | varies.get("offset", set()))
    plan = _broadcast_plan(x.shape, stat, affine)
    A, B, C, D, E = plan.view
    mu = plan.table(arrays["mean"], plan.stat_axes, A, C)
    var = plan.table(arrays["variance"], plan.stat_axes, A, C)
    dtype = _table_dtype(x)
    ones, zeros = _unit_tables(C, D, dtype)
    g = plan.table(arrays["scale"], plan.affine_axes, C, D).astype(dtype, copy=False) if "scale" in arrays else ones
    h = plan.table(arrays["offset"], plan.affine_axes, C, D).astype(dtype, copy=False) if "offset" in arrays else zeros
    if not isinstance(x, np.ndarray):
        return _cuda().normalize(x, plan, g, h, eps=eps, stats=(mu, var))[0]
    xv = _compute_view(x, plan)
    y = plan.from_view(cpu.apply(xv, mu, 1.0 / np.sqrt(var + eps), g, h))
    return y.astype(x.dtype) if y.dtype != x.dtype else y


def norm(kind: str, x, *, axis=-1, groups=None, epsilon=1e-3, gamma=None, beta=None, mean=None,
         variance=None, device="auto"):
    """Any norm of :data:`normsvc.norms.NORMS` by name: what the named functions below call.

    ``kind`` is "batch", "layer", "instance", "group" or "rms"; ``axis`` means
    what that kind's function says.  ``groups`` is group norm's (default
    32) and must be left out for the others; rms norm takes no ``beta``.
    ``mean``/``variance`` (inference mode) may be one value per statistic
    group, a scalar, or, for instance and group norm, one value per channel
    or group shared by every sample (a layer's running statistics).

    Returns
    -------
    (y, Moments or None)
    """
    entry = norms.norm(kind)
    if entry.grouped:
        groups = norms.DEFAULT_GROUPS if groups is None else groups
    elif groups is not None:
        raise InvalidArgument(f"groups={groups!r} is only meaningful for group norm, not {kind!r}: "
                              "expected groups left out (None)", field="groups")
    if beta is not None and not entry.centered:
        raise InvalidArgument(f"{kind} norm has no offset: expected beta left out (None)", field="beta")
    return _norm(kind, x, axis, groups, epsilon, gamma, beta, mean, variance, device)


def batch_norm(x, *, axis=-1, epsilon=1e-3, gamma=None, beta=None, mean=None, variance=None,
               virtual_batch_size=None, device="auto"):
    """Batch normalization (Keras ``BatchNormalization``).

    Statistics are taken per feature over every axis but ``axis``.

    Parameters
    ----------
    x : array of float16, float32 or float64
    axis : int or list of ints
        The kept feature axis or axes (Keras: -1 for channels-last, 1 for
        channels-first / PyTorch).
    epsilon : float
        Added to the variance (Keras default 1e-3; PyTorch uses 1e-5).
    gamma, beta : array of the kept axes' shape, optional
        Laid out along the kept axes in increasing axis order (``x.shape[a]``
        for each ``a`` in ``sorted(axis)``).
    mean, variance : array of the kept axes' shape, optional
        Inference mode: normalize with these (running) statistics instead.
    virtual_batch_size : int, optional
        Training mode: "ghost" batches, as tf.keras' ``virtual_batch_size``.
        The batch (axis 0) splits into ``B / v`` virtual batches of ``v``
        samples, each normalized with its own statistics; like tf.keras,
        sample ``i`` belongs to virtual batch ``i % (B / v)``.
    device : "auto", "cpu" or "cuda"
        Where to compute: "auto" follows x (CUDA arrays on the GPU); "cuda"
        also moves a host array to the GPU and returns numpy.

    Returns
    -------
    (y, Moments)
        ``y`` like ``x``; the batch moments per feature (None in inference
        mode), with virtual batches per virtual batch and feature (shape
        ``(B / v, *features)``).
    """
    if virtual_batch_size is None or (mean is not None and variance is not None):
        # inference normalizes every sample with the same statistics: no virtual batches
        return _norm("batch", x, axis, None, epsilon, gamma, beta, mean, variance, device)
    xv, axes, affine = _virtual(x, axis, virtual_batch_size, device)
    y, m = _norm("batch", xv, axes, None, epsilon, _tiled(gamma, affine), _tiled(beta, affine), mean, variance,
                 device)
    return y.reshape(x.shape), m


def batch_renorm(x, renorm_mean, renorm_stddev, *, axis=-1, epsilon=1e-3, gamma=None, beta=None, rmin=None,
                 rmax=None, dmax=None, virtual_batch_size=None, device="auto"):
    """Batch renormalization (Ioffe 2017), a training step of tf.keras' ``BatchNormalization(renorm=True)``.

    The batch is normalized with its own statistics and then corrected
    towards the renorm moving averages ``renorm_mean`` / ``renorm_stddev``
    (the values before this step's update)::

        s = sqrt(var + epsilon)
        r = clip(s / max(renorm_stddev, sqrt(epsilon)), rmin, rmax)
        d = clip((mean - renorm_mean) / max(renorm_stddev, sqrt(epsilon)), -dmax, dmax)
        y = ((x - mean) / s * r + d) * gamma + beta

    ``r`` and ``d`` are constants of the step (tf.keras stops their
    gradients).  An unset ``rmin``, ``rmax`` or ``dmax`` does not clip that
    side; ``rmin = rmax = 1`` and ``dmax = 0`` is plain batch norm.  With
    ``virtual_batch_size`` each virtual batch is normalized with its own
    statistics and ``mean``/``var`` above are their averages, as tf.keras does.
    Inference uses the moving mean and variance: :func:`batch_norm` with
    ``mean`` and ``variance``.

    Returns
    -------
    (y, Moments)
        As :func:`batch_norm` in training mode: the batch moments per
        feature, or per virtual batch and feature (shape ``(B / v, *features)``).
    """
    for name, value in (("rmin", rmin), ("rmax", rmax), ("dmax", dmax)):
        if value is not None and not (isinstance(value, (int, float, np.floating, np.integer))
                                      and not isinstance(value, bool) and math.isfinite(value)):
            raise InvalidArgument(f"{name}={value!r}: expected a finite number or None", field=name)
    if rmin is not None and rmax is not None and rmin > rmax:
        raise InvalidArgument(f"rmin={rmin} > rmax={rmax}: expected rmin <= rmax", field="rmin")
    if dmax is not None and dmax < 0:
        raise InvalidArgument(f"dmax={dmax}: expected a number >= 0", field="dmax")
    eps = _epsilon(epsilon)
    if virtual_batch_size is None:
        xv, axes, affine = _shaped(x), axis, ()
    else:
        xv, axes, affine = _virtual(x, axis, virtual_batch_size, device)
    prep = _prepare("batch", xv.shape, _axis_key(axes), None)
    m = moments(xv, [a for a in range(xv.ndim) if a not in normalize_axes(axes, xv.ndim)], device=device)
    features = prep.affine_shape[len(affine):]
    bmean, bvar = m.mean, m.variance
    if affine:  # the averages over the virtual batches
        bmean, bvar = bmean.mean(axis=0), bvar.mean(axis=0)
    floor = math.sqrt(eps)
    rm = _param(renorm_mean, "renorm_mean", features, "one value per feature", scalar=True)
    rs = np.maximum(_param(renorm_stddev, "renorm_stddev", features, "one value per feature", scalar=True), floor)
    s = np.sqrt(bvar + eps)
    r, d = s / rs, (bmean - rm) / rs
    if rmin is not None:
        r = np.maximum(r, rmin)
    if rmax is not None:
        r = np.minimum(r, rmax)
    if dmax is not None:
        d = np.clip(d, -dmax, dmax)
    scale = None if gamma is None else _param(gamma, "gamma", features, "one value per feature")
    g, b = (r, d) if scale is None else (r * scale, d * scale)
    if beta is not None:
        b = b + _param(beta, "beta", features, "one value per feature")
    y, _ = _norm("batch", xv, axes, None, eps, _tiled(g, affine), _tiled(b, affine), m.mean, m.variance, device)
    return (y if virtual_batch_size is None else y.reshape(x.shape)), m


def _virtual(x, axis, virtual_batch_size, device):
    """``x`` as tf.keras splits it into virtual batches: shape ``(v, B / v, ...)``, so sample ``i``
    belongs to virtual batch ``i % (B / v)``; returns it, its kept axes (the virtual-batch axis
    first) and the leading affine shape ``(B / v,)``."""
    x = _shaped(x)
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, (int, np.integer)) \
            or virtual_batch_size < 1:
        raise InvalidArgument(f"virtual_batch_size={virtual_batch_size!r}: expected a positive int",
                              field="virtual_batch_size")
    batch = x.shape[0]
    if batch % virtual_batch_size:
        raise InvalidArgument(
            f"virtual_batch_size={virtual_batch_size} does not divide the batch of {batch}: expected a batch "
            f"size that is a multiple of it", field="virtual_batch_size")
    count = batch // int(virtual_batch_size)
    axes = normalize_axes(axis, x.ndim)
    if 0 in axes:
        raise InvalidArgument(f"axis={axis!r} keeps the batch axis 0: virtual batches split it", field="axis")
    xv = x.reshape((int(virtual_batch_size), count) + tuple(x.shape[1:]))
    return xv, (1,) + tuple(a + 1 for a in axes), (count,)


def _shaped(x):
    """``x`` with a shape to reshape by: a CUDA array as it is (the device path takes it), anything
    else as a validated numpy array."""
    x = _detached(x)
    return x if _is_cuda_array(x) else _input(x, "cpu")


def _tiled(value, lead: tuple):
    """A per-feature affine parameter repeated for each virtual batch (``lead`` = its count)."""
    if value is None or not lead:
        return value
    value = np.asarray(value, dtype=np.float64)
    return np.broadcast_to(value, lead + value.shape)


def layer_norm(x, *, axis=-1, epsilon=1e-3, gamma=None, beta=None, mean=None, variance=None,
               device="auto"):
    """Layer normalization (Keras ``LayerNormalization``).

    Statistics are taken over the normalized ``axis`` (int or list) for each
    position of the other axes; gamma and beta have one value per normalized
    element (shape of ``x`` along ``axis``), as in Keras and as PyTorch's
    ``normalized_shape`` with trailing axes.

    Returns
    -------
    (y, Moments)
        Moments shaped like the kept (non-normalized) axes.
    """
    return _norm("layer", x, axis, None, epsilon, gamma, beta, mean, variance, device)


def rms_norm(x, *, axis=-1, epsilon=1e-6, gamma=None, device="auto"):
    """RMS normalization (Keras ``RMSNormalization``): ``x * rsqrt(mean(x**2) + eps) * gamma``.

    ``axis`` (int or list) are the normalized axes; gamma has one value per
    normalized element.  The returned Moments are the ordinary mean and
    variance over those axes (``mean(x**2) = variance + mean**2``).
    """
    return _norm("rms", x, axis, None, epsilon, gamma, None, None, None, device)


def group_norm(x, *, groups=32, axis=-1, epsilon=1e-3, gamma=None, beta=None, mean=None, variance=None,
               device="auto"):
    """Group normalization (Keras ``GroupNormalization``).

    The channel ``axis`` is split into ``groups`` contiguous groups; statistics
    are taken per sample (axis 0) and group, over the group's channels and all
    other axes.  ``groups=-1`` means one group per channel (instance norm).
    gamma and beta have one value per channel.

    Raises
    ------
    ValueError
        When ``groups`` exceeds the channel count or does not divide it.

    Returns
    -------
    (y, Moments)
        Moments of shape (N, groups).
    """
    return _norm("group", x, axis, groups, epsilon, gamma, beta, mean, variance, device)


def instance_norm(x, *, axis=-1, epsilon=1e-3, gamma=None, beta=None, mean=None, variance=None,
                  device="auto"):
    """Instance normalization (tfa ``InstanceNormalization``; Keras GroupNorm with groups=-1).

    Statistics per sample (axis 0) and channel (``axis``), over all other axes.

    Returns
    -------
    (y, Moments)
        Moments of shape (N, C).
    """
    return _norm("instance", x, axis, None, epsilon, gamma, beta, mean, variance, device)
