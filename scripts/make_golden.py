"""Generate golden reference files for normsvc from Keras 3 and PyTorch.

Writes small ``.npz`` files (plain numpy arrays, loadable with
``np.load(..., allow_pickle=False)``) plus ``tests/golden/index.json`` that
describes every case.  ``tests/test_golden.py`` and
``tests/test_golden_running.py`` read them; the data-parallel cases
(``"kind": "data_parallel"``, files ``dp_*.npz``) are read through
``tests/golden_steps.py`` (``load_steps()``) and checked by
``tests/test_golden_steps.py``.

Data-parallel section: W=4 workers x T=20 steps, each worker with its own
batch per step drawn from its own distribution; the references are ONE
process that sees the concatenation of the 4 batches each step (what
SyncBatchNorm or a single-GPU run gives): torch ``BatchNorm2d`` with
momentum 0.1 and None, Keras ``BatchNormalization(momentum=0.9)`` and the
exact population ("precise BN") statistics, all in float64.

How to run (from the repository root; use a separate virtual environment so
the project's own environment stays free of torch/keras)::

    python3 -m venv .venv-golden
    .venv-golden/bin/pip install torch==2.13.0 'keras>=3.10,<4' numpy
    KERAS_BACKEND=torch .venv-golden/bin/python scripts/make_golden.py

The pinned versions are the ones the committed files were produced with:
torch 2.13.0 (CPU build) and Keras 3 on its torch backend.  The script is
deterministic: every case draws its data from its own fixed-seed numpy
generator, torch runs single-threaded in deterministic mode, and the ``.npz``
archives are written with fixed zip timestamps, so re-running it reproduces
the committed bytes on the same library versions.

Every framework result is also checked against a float64 numpy reference
computed here; the largest deviation is stored in index.json
(``ref_max_abs_err`` / ``ref_max_rel_err``) and the script aborts when a
framework result disagrees with the reference by more than 1e-5, so a
framework bug cannot silently end up in the golden files.

Keras 3 (checked on 3.15.1, torch backend) quirks handled here:

* ``BatchNormalization`` only accepts an int axis (``int(axis)`` in its
  constructor).  The list-axis case (axis=[1, 3]) is produced by moving the
  kept axes to the end, flattening them into one feature axis, running a
  Keras ``BatchNormalization(axis=-1)`` and undoing the reshape.
* On the torch backend ``LayerNormalization`` with a single non-trailing axis
  calls ``torch.nn.functional.layer_norm`` (which always normalizes the
  trailing dimensions): it raises for shape (4, 6, 5) with axis=1 and gives
  wrong results silently when the sizes happen to match.  The middle-axis case
  is produced by moving the axis last, running ``LayerNormalization(axis=-1)``
  and moving it back (the semantics of the TF/JAX backends).
* ``RMSNormalization``: weight is named ``scale``, default epsilon 1e-6, and no
  centering (no beta).
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
if os.environ["KERAS_BACKEND"] != "torch":
    sys.exit("make_golden.py: run with KERAS_BACKEND=torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import keras  # noqa: E402

TORCH_VERSION = "2.13.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"
# A framework result further than this from the float64 reference aborts
# the script (absolute on outputs, relative on running statistics).
SELF_CHECK_TOL = 1e-5

if not torch.__version__.startswith(TORCH_VERSION):
    sys.exit(f"make_golden.py: needs torch=={TORCH_VERSION}, found {torch.__version__}")
if int(keras.__version__.split(".")[0]) != 3:
    sys.exit(f"make_golden.py: needs Keras 3, found {keras.__version__}")

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
keras.utils.set_random_seed(1234)

CASES: list[dict] = []


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def to_np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(keras.ops.convert_to_numpy(t))


def norm_axes(axis, ndim: int) -> list[int]:
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % ndim for a in axes)


def make_x(rng, shape, vary_axes, loc=2.0, scale=(0.5, 2.0)) -> np.ndarray:
    """float32 normal data whose mean/scale differ along ``vary_axes``."""
    pshape = [shape[i] if i in vary_axes else 1 for i in range(len(shape))]
    mu = rng.uniform(-loc, loc, size=pshape)
    sd = rng.uniform(scale[0], scale[1], size=pshape)
    return (rng.standard_normal(shape) * sd + mu).astype(np.float32)


def rms_x(rng, shape, axes) -> np.ndarray:
    """RMS-norm input: each normalized slice gets its own magnitude, spread
    log-uniformly over [10**-3.5, 1], so some slices have mean(x^2) comparable
    to epsilon (a wrong epsilon then shows in y) and others are O(1)."""
    keep = [i for i in range(len(shape)) if i not in axes]
    pshape = [shape[i] if i in keep else 1 for i in range(len(shape))]
    mag = 10.0 ** np.linspace(-3.5, 0.0, int(np.prod(pshape))).reshape(pshape)
    return (rng.standard_normal(shape) * mag).astype(np.float32)


def rand_affine(rng, shape):
    gamma = rng.normal(1.0, 0.5, size=shape).astype(np.float32)
    beta = rng.normal(0.0, 0.5, size=shape).astype(np.float32)
    return gamma, beta


def save_npz(path: Path, arrays: dict) -> None:
    """np.savez_compressed, but byte-reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            arr = np.asarray(arrays[key], order="C")  # keeps 0-d arrays 0-d
            assert arr.dtype != object, key
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def check(name: str, got, ref, what: str = "y", rel: bool = False) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (name, what, got.shape, ref.shape)
    err = np.abs(got - ref)
    if rel:
        # relative, with a floor so that values near zero (running means)
        # are judged on an absolute 1e-6-ish scale
        err = err / np.maximum(np.abs(ref), 0.1)
    worst = float(err.max())
    if worst > SELF_CHECK_TOL:
        sys.exit(f"{name}: framework {what} differs from float64 reference by {worst:.3g}")
    return worst


def add_case(name, framework, op, kwargs, arrays, *, layer, layer_kwargs, notes=None,
             kind="op", extra=None):
    fname = f"{name}.npz"
    save_npz(GOLDEN_DIR / fname, arrays)
    entry = {
        "name": name,
        "kind": kind,
        "framework": framework,
        "framework_version": keras.__version__ if framework == "keras" else torch.__version__,
        "framework_callable": layer,
        "framework_kwargs": layer_kwargs,
        "op": op,
        "kwargs": kwargs,
        "file": fname,
        "arrays": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
                   for k, v in sorted(arrays.items())},
    }
    if extra:
        entry.update(extra)
    if notes:
        entry["notes"] = notes
    CASES.append(entry)


# float64 references -------------------------------------------------------
def ref_norm(x, reduce_axes, eps, gamma_b=None, beta_b=None):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=tuple(reduce_axes), keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=tuple(reduce_axes), keepdims=True)
    y = (x64 - mean) / np.sqrt(var + eps)
    if gamma_b is not None:
        y = y * gamma_b
    if beta_b is not None:
        y = y + beta_b
    return y, mean, var


def bcast(v, shape, axes):
    """Reshape a parameter shaped like ``shape[axes]`` to broadcast against x."""
    if v is None:
        return None
    return v.astype(np.float64).reshape([shape[i] if i in axes else 1 for i in range(len(shape))])


def squeeze_to(a, shape, keep_axes):
    """Per-group statistic with keepdims -> the kept axes' shape."""
    return a.reshape([shape[i] for i in keep_axes])


# --------------------------------------------------------------------------
# per-op case builders
# --------------------------------------------------------------------------
def batch_norm_stats(x, kept, eps, gamma, beta):
    shape = x.shape
    reduce_axes = [i for i in range(x.ndim) if i not in kept]
    y, mean, var = ref_norm(x, reduce_axes, eps, bcast(gamma, shape, kept), bcast(beta, shape, kept))
    count = int(np.prod([shape[i] for i in reduce_axes]))
    return y, squeeze_to(mean, shape, kept), squeeze_to(var, shape, kept), count


def layer_norm_stats(x, axes, eps, gamma, beta):
    shape = x.shape
    keep = [i for i in range(x.ndim) if i not in axes]
    y, mean, var = ref_norm(x, axes, eps, bcast(gamma, shape, axes), bcast(beta, shape, axes))
    count = int(np.prod([shape[i] for i in axes]))
    return y, squeeze_to(mean, shape, keep), squeeze_to(var, shape, keep), count


def group_norm_stats(x, groups, axis, eps, gamma, beta):
    """Keras/torch GroupNormalization reference; stats have shape (N, G)."""
    shape = x.shape
    axis = axis % x.ndim
    c = shape[axis]
    g = c if groups == -1 else groups
    gshape = list(shape[:axis]) + [g, c // g] + list(shape[axis + 1:])
    xg = x.reshape(gshape)
    reduce_axes = [i for i in range(1, len(gshape)) if i != axis]
    _, mean, var = ref_norm(xg, reduce_axes, eps)
    x64 = xg.astype(np.float64)
    yg = (x64 - mean) / np.sqrt(var + eps)
    y = yg.reshape(shape)
    pb = [c if i == axis else 1 for i in range(x.ndim)]
    y = y * gamma.astype(np.float64).reshape(pb) + beta.astype(np.float64).reshape(pb)
    count = int(np.prod([gshape[i] for i in reduce_axes]))
    return y, mean.reshape(shape[0], g), var.reshape(shape[0], g), count, g


def rms_norm_ref(x, axes, eps, scale):
    x64 = x.astype(np.float64)
    ms = (x64 ** 2).mean(axis=tuple(axes), keepdims=True)
    y = x64 / np.sqrt(ms + eps) * bcast(scale, x.shape, axes)
    keep = [i for i in range(x.ndim) if i not in axes]
    return y, squeeze_to(ms, x.shape, keep), int(np.prod([x.shape[i] for i in axes]))


# --------------------------------------------------------------------------
# Keras 3 layers (training=True)
# --------------------------------------------------------------------------
def keras_batch_norm(name, seed, shape, axis, eps=1e-3):
    rng = rng_for(seed)
    ndim = len(shape)
    kept = norm_axes(axis, ndim)
    x = make_x(rng, shape, kept)
    pshape = tuple(shape[i] for i in kept)
    gamma, beta = rand_affine(rng, pshape)
    notes = None
    if len(kept) == 1:
        layer = keras.layers.BatchNormalization(axis=axis, momentum=0.0, epsilon=eps)
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        y = to_np(layer(x, training=True))
        fw_mean = to_np(layer.moving_mean)
        fw_var = to_np(layer.moving_variance)
    else:
        # Keras 3 BatchNormalization rejects a list axis: flatten the kept
        # axes into one trailing feature axis and use axis=-1.
        others = [i for i in range(ndim) if i not in kept]
        perm = others + kept
        xt = np.transpose(x, perm)
        nfeat = int(np.prod(pshape))
        x2 = np.ascontiguousarray(xt.reshape(-1, nfeat))
        layer = keras.layers.BatchNormalization(axis=-1, momentum=0.0, epsilon=eps)
        layer.build(x2.shape)
        layer.gamma.assign(gamma.reshape(nfeat))
        layer.beta.assign(beta.reshape(nfeat))
        y2 = to_np(layer(x2, training=True))
        y = np.transpose(y2.reshape(xt.shape), np.argsort(perm))
        fw_mean = to_np(layer.moving_mean).reshape(pshape)
        fw_var = to_np(layer.moving_variance).reshape(pshape)
        notes = ("Keras 3 BatchNormalization only takes an int axis; produced by moving the kept "
                 f"axes {kept} last, flattening them to one feature axis of size {nfeat}, running "
                 "BatchNormalization(axis=-1) and undoing the reshape. gamma/beta/batch stats have "
                 "the kept axes' shape.")
    y_ref, mean, var, count = batch_norm_stats(x, kept, eps, gamma, beta)
    errs = [check(name, y, y_ref), check(name, fw_mean, mean, "mean"), check(name, fw_var, var, "variance")]
    assert y.dtype == np.float32
    add_case(
        name, "keras", "batch_norm", {"axis": axis, "epsilon": eps},
        {"x": x, "gamma": gamma, "beta": beta, "y": y,
         "batch_mean": fw_mean, "batch_variance": fw_var,
         "ref_mean": mean, "ref_variance": var, "count": np.int64(count)},
        layer="keras.layers.BatchNormalization(...)(x, training=True)",
        layer_kwargs={"axis": axis, "epsilon": eps, "momentum": 0.0},
        notes=notes,
        extra={"ref_max_abs_err": max(errs),
               "stats_note": "batch_mean/batch_variance = moving stats after one training call with "
                             "momentum=0.0 (biased variance, float32)"},
    )


def keras_layer_norm(name, seed, shape, axis, eps=1e-3):
    rng = rng_for(seed)
    ndim = len(shape)
    axes = norm_axes(axis, ndim)
    keep = [i for i in range(ndim) if i not in axes]
    x = make_x(rng, shape, keep)
    pshape = tuple(shape[i] for i in axes)
    gamma, beta = rand_affine(rng, pshape)
    notes = None
    trailing = axes == list(range(ndim - len(axes), ndim))
    if trailing:
        layer = keras.layers.LayerNormalization(axis=axis, epsilon=eps)
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        y = to_np(layer(x, training=True))
    else:
        # keras (torch backend) routes any "contiguous" axis list to
        # F.layer_norm, which only normalizes trailing dims: wrong for a middle
        # axis.  Move the normalized axes last and use the trailing-axis path.
        perm = keep + axes
        xt = np.ascontiguousarray(np.transpose(x, perm))
        tail = list(range(len(keep), ndim))
        layer = keras.layers.LayerNormalization(axis=tail if len(tail) > 1 else -1, epsilon=eps)
        layer.build(xt.shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        y = np.ascontiguousarray(np.transpose(to_np(layer(xt, training=True)), np.argsort(perm)))
        notes = ("Keras 3 on the torch backend mis-handles a non-trailing LayerNormalization axis "
                 "(it calls F.layer_norm, which normalizes trailing dims: raises here, silently "
                 "wrong when sizes coincide). Produced by moving the axis last, running "
                 "LayerNormalization(axis=-1) and moving it back (TF/JAX-backend semantics).")
    y_ref, mean, var, count = layer_norm_stats(x, axes, eps, gamma, beta)
    err = check(name, y, y_ref)
    assert y.dtype == np.float32
    add_case(
        name, "keras", "layer_norm", {"axis": axis, "epsilon": eps},
        {"x": x, "gamma": gamma, "beta": beta, "y": y,
         "ref_mean": mean, "ref_variance": var, "count": np.int64(count)},
        layer="keras.layers.LayerNormalization(...)(x, training=True)",
        layer_kwargs={"axis": axis, "epsilon": eps},
        notes=notes, extra={"ref_max_abs_err": err},
    )


def keras_group_norm(name, seed, shape, groups, axis, eps=1e-3):
    rng = rng_for(seed)
    x = make_x(rng, shape, [0, axis % len(shape)])
    c = shape[axis]
    gamma, beta = rand_affine(rng, (c,))
    layer = keras.layers.GroupNormalization(groups=groups, axis=axis, epsilon=eps)
    layer.build(shape)
    layer.gamma.assign(gamma)
    layer.beta.assign(beta)
    y = to_np(layer(x, training=True))
    y_ref, mean, var, count, g = group_norm_stats(x, groups, axis, eps, gamma, beta)
    err = check(name, y, y_ref)
    assert y.dtype == np.float32
    op = "instance_norm" if groups == -1 else "group_norm"
    kwargs = {"axis": axis, "epsilon": eps}
    if op == "group_norm":
        kwargs = {"groups": groups, **kwargs}
    add_case(
        name, "keras", op, kwargs,
        {"x": x, "gamma": gamma, "beta": beta, "y": y,
         "ref_mean": mean, "ref_variance": var, "count": np.int64(count)},
        layer="keras.layers.GroupNormalization(...)(x, training=True)",
        layer_kwargs={"groups": groups, "axis": axis, "epsilon": eps},
        extra={"ref_max_abs_err": err, "effective_groups": g,
               "stats_shape_note": "ref_mean/ref_variance are per (sample, group): shape (N, G)"},
    )


def keras_rms_norm(name, seed, shape, axis=-1):
    rng = rng_for(seed)
    ndim = len(shape)
    axes = norm_axes(axis, ndim)
    x = rms_x(rng, shape, axes)
    layer = keras.layers.RMSNormalization(axis=axis)
    layer.build(shape)
    eps = float(layer.epsilon)
    weight_names = [w.name for w in layer.weights]
    assert weight_names == ["scale"], weight_names
    scale = rng.normal(1.0, 0.5, size=tuple(shape[i] for i in axes)).astype(np.float32)
    layer.scale.assign(scale)
    y = to_np(layer(x, training=True))
    y_ref, ms, count = rms_norm_ref(x, axes, eps, scale)
    err = check(name, y, y_ref)
    add_case(
        name, "keras", "rms_norm", {"axis": axis, "epsilon": eps},
        {"x": x, "gamma": scale, "y": y, "ref_mean_square": ms, "count": np.int64(count)},
        layer="keras.layers.RMSNormalization(...)(x, training=True)",
        layer_kwargs={"axis": axis},
        notes=(f"Keras RMSNormalization: weight is named 'scale' (stored here as 'gamma'), default "
               f"epsilon {eps!r} (used), no beta/centering; y = x * rsqrt(mean(x^2) + eps) * scale."),
        extra={"ref_max_abs_err": err, "keras_weight_names": weight_names,
               "keras_default_epsilon": eps},
    )


def keras_running(name, seed, steps=20, batch=(16, 4), momentum=0.9):
    rng = rng_for(seed)
    layer = keras.layers.BatchNormalization(axis=-1, momentum=momentum)
    layer.build(batch)
    init_mean = to_np(layer.moving_mean).copy()
    init_var = to_np(layer.moving_variance).copy()
    c = batch[-1]
    batches = np.empty((steps, *batch), np.float32)
    means = np.empty((steps, c), np.float32)
    variances = np.empty((steps, c), np.float32)
    m64, v64 = init_mean.astype(np.float64), init_var.astype(np.float64)
    ref_m = np.empty((steps, c))
    ref_v = np.empty((steps, c))
    for s in range(steps):
        loc = rng.uniform(-2.0, 2.0, size=c)
        sd = rng.uniform(0.5, 2.0, size=c)
        b = (rng.standard_normal(batch) * sd + loc).astype(np.float32)
        batches[s] = b
        layer(b, training=True)
        means[s] = to_np(layer.moving_mean)
        variances[s] = to_np(layer.moving_variance)
        b64 = b.astype(np.float64)
        m64 = momentum * m64 + (1 - momentum) * b64.mean(axis=0)
        v64 = momentum * v64 + (1 - momentum) * b64.var(axis=0)
        ref_m[s], ref_v[s] = m64, v64
    err_m = check(name, means, ref_m, "moving_mean", rel=True)
    err_v = check(name, variances, ref_v, "moving_variance", rel=True)
    add_case(
        name, "keras", "running", {"kind": "batch", "axis": -1, "momentum": momentum,
                                   "convention": "keras"},
        {"batches": batches, "moving_mean": means, "moving_variance": variances,
         "num_batches": np.arange(1, steps + 1, dtype=np.int64),
         "init_mean": init_mean, "init_variance": init_var},
        layer="keras.layers.BatchNormalization(momentum=0.9)(batch, training=True)",
        layer_kwargs={"axis": -1, "momentum": momentum, "epsilon": float(layer.epsilon)},
        kind="running",
        notes=("Keras update: moving = moving * momentum + batch_stat * (1 - momentum), with the "
               "BIASED batch variance; initial moving_mean 0, moving_variance 1. Row s holds the "
               "state after step s+1."),
        extra={"feature_axis": -1, "reduce_axes": [0], "steps": steps,
               "keys": {"mean": "moving_mean", "variance": "moving_variance",
                        "num_batches": "num_batches"},
               "ref_max_rel_err": max(err_m, err_v)},
    )


# --------------------------------------------------------------------------
# PyTorch 2.13 functional ops
# --------------------------------------------------------------------------
def torch_batch_norm(name, seed, shape, eps=1e-5):
    rng = rng_for(seed)
    x = make_x(rng, shape, [1])
    c = shape[1]
    gamma, beta = rand_affine(rng, (c,))
    rm = torch.zeros(c)
    rv = torch.ones(c)
    y = to_np(F.batch_norm(torch.from_numpy(x), rm, rv, torch.from_numpy(gamma),
                           torch.from_numpy(beta), training=True, momentum=1.0, eps=eps))
    fw_mean, fw_uvar = to_np(rm), to_np(rv)
    y_ref, mean, var, count = batch_norm_stats(x, [1], eps, gamma, beta)
    uvar = var * count / (count - 1)
    errs = [check(name, y, y_ref), check(name, fw_mean, mean, "mean"),
            check(name, fw_uvar, uvar, "unbiased variance")]
    add_case(
        name, "torch", "batch_norm", {"axis": 1, "epsilon": eps},
        {"x": x, "gamma": gamma, "beta": beta, "y": y,
         "batch_mean": fw_mean, "batch_unbiased_variance": fw_uvar,
         "ref_mean": mean, "ref_variance": var, "count": np.int64(count)},
        layer="torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, "
              "training=True, momentum=1.0, eps=eps)",
        layer_kwargs={"training": True, "eps": eps, "momentum": 1.0},
        notes=("batch_mean / batch_unbiased_variance are the running stats after one call with "
               "momentum=1.0; torch's running_var uses the UNBIASED (n-1) batch variance while "
               "normalization itself uses the biased one."),
        extra={"ref_max_abs_err": max(errs)},
    )


def torch_group_norm(name, seed, shape, groups, eps=1e-5):
    rng = rng_for(seed)
    x = make_x(rng, shape, [0, 1])
    c = shape[1]
    gamma, beta = rand_affine(rng, (c,))
    y = to_np(F.group_norm(torch.from_numpy(x), groups, torch.from_numpy(gamma),
                           torch.from_numpy(beta), eps=eps))
    y_ref, mean, var, count, g = group_norm_stats(x, groups, 1, eps, gamma, beta)
    err = check(name, y, y_ref)
    add_case(
        name, "torch", "group_norm", {"groups": groups, "axis": 1, "epsilon": eps},
        {"x": x, "gamma": gamma, "beta": beta, "y": y,
         "ref_mean": mean, "ref_variance": var, "count": np.int64(count)},
        layer="torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)",
        layer_kwargs={"num_groups": groups, "eps": eps},
        extra={"ref_max_abs_err": err, "effective_groups": g},
    )


def torch_layer_norm(name, seed, shape, normalized_shape, eps=1e-5):
    rng = rng_for(seed)
    ndim = len(shape)
    k = len(normalized_shape)
    axes = list(range(ndim - k, ndim))
    x = make_x(rng, shape, list(range(ndim - k)))
    gamma, beta = rand_affine(rng, tuple(normalized_shape))
    y = to_np(F.layer_norm(torch.from_numpy(x), tuple(normalized_shape), torch.from_numpy(gamma),
                           torch.from_numpy(beta), eps=eps))
    y_ref, mean, var, count = layer_norm_stats(x, axes, eps, gamma, beta)
    err = check(name, y, y_ref)
    axis = -1 if k == 1 else list(range(-k, 0))
    add_case(
        name, "torch", "layer_norm", {"axis": axis, "epsilon": eps},
        {"x": x, "gamma": gamma, "beta": beta, "y": y,
         "ref_mean": mean, "ref_variance": var, "count": np.int64(count)},
        layer="torch.nn.functional.layer_norm(x, normalized_shape, weight, bias, eps)",
        layer_kwargs={"normalized_shape": list(normalized_shape), "eps": eps},
        extra={"ref_max_abs_err": err},
    )


def torch_rms_norm(name, seed, shape, normalized_shape, eps):
    rng = rng_for(seed)
    ndim = len(shape)
    k = len(normalized_shape)
    axes = list(range(ndim - k, ndim))
    x = rms_x(rng, shape, axes)
    scale = rng.normal(1.0, 0.5, size=tuple(normalized_shape)).astype(np.float32)
    y = to_np(F.rms_norm(torch.from_numpy(x), list(normalized_shape), torch.from_numpy(scale),
                         eps=eps))
    eff_eps = float(torch.finfo(torch.float32).eps) if eps is None else float(eps)
    y_ref, ms, count = rms_norm_ref(x, axes, eff_eps, scale)
    err = check(name, y, y_ref)
    axis = -1 if k == 1 else list(range(-k, 0))
    add_case(
        name, "torch", "rms_norm", {"axis": axis, "epsilon": eff_eps},
        {"x": x, "gamma": scale, "y": y, "ref_mean_square": ms, "count": np.int64(count)},
        layer="torch.nn.functional.rms_norm(x, normalized_shape, weight, eps)",
        layer_kwargs={"normalized_shape": list(normalized_shape), "eps": eps},
        notes=(None if eps is not None else
               "eps=None: torch uses torch.finfo(x.dtype).eps (float32: 2**-23 ~ 1.19e-7); "
               "kwargs.epsilon holds that effective value"),
        extra={"ref_max_abs_err": err},
    )


def torch_running(name, seed, momentum, steps=20, batch=(8, 3, 4, 4)):
    rng = rng_for(seed)
    c = batch[1]
    bn = torch.nn.BatchNorm2d(c, momentum=momentum)
    bn.train()
    init_mean = to_np(bn.running_mean).copy()
    init_var = to_np(bn.running_var).copy()
    batches = np.empty((steps, *batch), np.float32)
    rmean = np.empty((steps, c), np.float32)
    rvar = np.empty((steps, c), np.float32)
    nbt = np.empty(steps, np.int64)
    m64, v64 = init_mean.astype(np.float64), init_var.astype(np.float64)
    ref_m = np.empty((steps, c))
    ref_v = np.empty((steps, c))
    n = batch[0] * batch[2] * batch[3]
    with torch.no_grad():
        for s in range(steps):
            loc = rng.uniform(-2.0, 2.0, size=(1, c, 1, 1))
            sd = rng.uniform(0.5, 2.0, size=(1, c, 1, 1))
            b = (rng.standard_normal(batch) * sd + loc).astype(np.float32)
            batches[s] = b
            bn(torch.from_numpy(b))
            rmean[s] = to_np(bn.running_mean)
            rvar[s] = to_np(bn.running_var)
            nbt[s] = int(bn.num_batches_tracked)
            f = 1.0 / (s + 1) if momentum is None else momentum
            b64 = b.astype(np.float64)
            m64 = (1 - f) * m64 + f * b64.mean(axis=(0, 2, 3))
            v64 = (1 - f) * v64 + f * b64.var(axis=(0, 2, 3)) * n / (n - 1)
            ref_m[s], ref_v[s] = m64, v64
    err_m = check(name, rmean, ref_m, "running_mean", rel=True)
    err_v = check(name, rvar, ref_v, "running_var", rel=True)
    rule = ("cumulative moving average: factor = 1 / num_batches_tracked"
            if momentum is None else f"running = (1 - {momentum}) * running + {momentum} * batch_stat")
    add_case(
        name, "torch", "running", {"kind": "batch", "axis": 1, "momentum": momentum,
                                   "convention": "torch"},
        {"batches": batches, "running_mean": rmean, "running_var": rvar,
         "num_batches_tracked": nbt, "init_mean": init_mean, "init_variance": init_var},
        layer=f"torch.nn.BatchNorm2d({c}, momentum={momentum}).train()(batch)",
        layer_kwargs={"num_features": c, "momentum": momentum, "eps": bn.eps},
        kind="running",
        notes=(f"torch update: {rule}; the variance fed into running_var is the UNBIASED (n-1) "
               "batch variance; initial running_mean 0, running_var 1. Row s holds the state "
               "after step s+1."),
        extra={"feature_axis": 1, "reduce_axes": [0, 2, 3], "steps": steps,
               "keys": {"mean": "running_mean", "variance": "running_var",
                        "num_batches": "num_batches_tracked"},
               "ref_max_rel_err": max(err_m, err_v)},
    )


# --------------------------------------------------------------------------
# Data parallel: W workers, each with its own batch per step; the reference
# is ONE process that sees the concatenated batch (SyncBatchNorm semantics).
# --------------------------------------------------------------------------
DP_STEPS, DP_WORKERS = 20, 4
DP_BATCH = (6, 5, 3, 3)  # per worker, NCHW
# The script aborts when a framework record deviates from the numpy float64
# reimplementation by more than DP_SELF_CHECK_RTOL (relative).  The tests hold
# the float64 records (torch, numpy) to DP_TEST_RTOL; Keras BatchNormalization
# computes in float32 whatever its dtype policy (see data_parallel), so its
# record is held to DP_KERAS_RTOL (stored per case as "rtol" in index.json).
DP_SELF_CHECK_RTOL = 1e-6
DP_TEST_RTOL = 1e-10
DP_KERAS_RTOL = 1e-6
DP_INPUTS = "dp_inputs"


def dp_check(name: str, got, ref, what: str, tol: float = DP_SELF_CHECK_RTOL) -> float:
    """Largest relative deviation of a framework record from the numpy float64
    reference; aborts above ``tol`` (no floor: every reference value here is
    far from zero)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (name, what, got.shape, ref.shape)
    assert np.all(ref != 0), (name, what)
    worst = float((np.abs(got - ref) / np.abs(ref)).max())
    if not worst <= tol:
        sys.exit(f"{name}: framework {what} differs from float64 reference by {worst:.3g} (relative)")
    return worst


def dp_inputs(seed):
    """x[T, W, N, C, H, W] float64: worker w, channel c ~ Normal(loc, scale) with
    loc = 3 * w + (c - 2) and scale = (0.5 + w) * (1 + 0.25 * c).  Values are
    rounded to float32 (so float32 consumers see exactly the same numbers) and
    kept as float64."""
    rng = rng_for(seed)
    n, c, h, w = DP_BATCH
    ranks = np.arange(DP_WORKERS, dtype=np.float64).reshape(1, DP_WORKERS, 1, 1, 1, 1)
    chans = np.arange(c, dtype=np.float64).reshape(1, 1, 1, c, 1, 1)
    loc = 3.0 * ranks + (chans - 2.0)
    scale = (0.5 + ranks) * (1.0 + 0.25 * chans)
    z = rng.standard_normal((DP_STEPS, DP_WORKERS, n, c, h, w))
    x = (z * scale + loc).astype(np.float32).astype(np.float64)
    return x, loc.reshape(DP_WORKERS, c), scale.reshape(DP_WORKERS, c)


def dp_step_moments(x_nchw):
    """Per step: count, mean and BIASED variance per channel of the
    concatenation of the W workers' batches (numpy float64, two-pass)."""
    t, r, n, c, h, w = x_nchw.shape
    flat = np.moveaxis(x_nchw, 3, 1).reshape(t, c, r * n * h * w)
    return r * n * h * w, flat.mean(axis=2), flat.var(axis=2)


def data_parallel(seed):
    x_nchw, loc, scale = dp_inputs(seed)
    x_nhwc = np.ascontiguousarray(np.moveaxis(x_nchw, 3, -1))  # [T, W, N, H, W, C]
    t_steps, n_workers, n, c, h, w = x_nchw.shape
    count, step_mean, step_var = dp_step_moments(x_nchw)
    per_worker = n * h * w
    common = {"steps": t_steps, "workers": n_workers, "inputs_file": f"{DP_INPUTS}.npz",
              "count_per_worker": per_worker, "count_per_step": count, "dtype": "float64"}
    shape_doc = ("x_nchw[t, w] is worker w's batch at step t (N, C, H, W) = "
                 f"{DP_BATCH}; x_nhwc[t, w] the same batch channels-last (N, H, W, C)")

    # inputs and the per-step global moments --------------------------------
    xs_cat = np.concatenate([x_nchw[:, r] for r in range(n_workers)], axis=1)  # [T, W*N, C, H, W]
    chk = max(dp_check(DP_INPUTS, xs_cat.mean(axis=(1, 3, 4)), step_mean, "step_mean"),
              dp_check(DP_INPUTS, xs_cat.var(axis=(1, 3, 4)), step_var, "step_variance"))
    assert np.array_equal(x_nchw.astype(np.float32).astype(np.float64), x_nchw)
    add_case(
        DP_INPUTS, "numpy", "inputs", {"layout": "nchw and nhwc", "feature_axis_nchw": 1,
                                       "feature_axis_nhwc": -1},
        {"x_nchw": x_nchw, "x_nhwc": x_nhwc, "worker_loc": loc, "worker_scale": scale,
         "step_mean": step_mean, "step_variance": step_var},
        layer="numpy.random.default_rng(seed).standard_normal(...) * worker_scale + worker_loc",
        layer_kwargs={"seed": seed},
        kind="data_parallel",
        notes=(f"Inputs of the data-parallel cases: {n_workers} workers x {t_steps} steps. "
               f"{shape_doc}. Worker w, channel c ~ Normal(worker_loc[w, c], worker_scale[w, c]) "
               "with loc = 3*w + (c - 2) and scale = (0.5 + w) * (1 + 0.25*c), so the workers' "
               "batches differ strongly and the global variance includes the spread between "
               "workers. Values are exactly representable in float32 (drawn in float64, rounded "
               "to float32, stored as float64). step_mean / step_variance [T, C]: mean and BIASED "
               "variance of the concatenation of the workers' batches of each step (count "
               f"{count} per channel), numpy float64."),
        extra={**common, "framework_version": np.__version__,
               "axes": {"x_nchw": ["step", "worker", "N", "C", "H", "W"],
                        "x_nhwc": ["step", "worker", "N", "H", "W", "C"]},
               "ref_max_rel_err": chk},
    )

    # torch: one BatchNorm2d fed the concatenated batch ----------------------
    for name, momentum in (("dp_torch_bn2d_m0.1", 0.1), ("dp_torch_bn2d_cma", None)):
        bn = torch.nn.BatchNorm2d(c, momentum=momentum, dtype=torch.float64)
        bn.train()
        init_mean = to_np(bn.running_mean).copy()
        init_var = to_np(bn.running_var).copy()
        rmean = np.empty((t_steps, c))
        rvar = np.empty((t_steps, c))
        nbt = np.empty(t_steps, np.int64)
        with torch.no_grad():
            for s in range(t_steps):
                batch = torch.cat([torch.from_numpy(x_nchw[s, r]) for r in range(n_workers)], dim=0)
                assert batch.dtype == torch.float64 and batch.shape == (n_workers * n, c, h, w)
                bn(batch)
                rmean[s] = to_np(bn.running_mean)
                rvar[s] = to_np(bn.running_var)
                nbt[s] = int(bn.num_batches_tracked)
        m64, v64 = init_mean.copy(), init_var.copy()
        ref_m, ref_v = np.empty_like(rmean), np.empty_like(rvar)
        for s in range(t_steps):
            f = 1.0 / (s + 1) if momentum is None else momentum
            m64 = (1 - f) * m64 + f * step_mean[s]
            v64 = (1 - f) * v64 + f * step_var[s] * count / (count - 1)
            ref_m[s], ref_v[s] = m64, v64
        err = max(dp_check(name, rmean, ref_m, "running_mean"),
                  dp_check(name, rvar, ref_v, "running_var"))
        assert list(nbt) == list(range(1, t_steps + 1))
        rule = ("cumulative moving average: factor = 1 / num_batches_tracked"
                if momentum is None else f"running = (1 - {momentum}) * running + {momentum} * batch_stat")
        add_case(
            name, "torch", "running", {"kind": "batch", "axis": 1, "momentum": momentum,
                                       "convention": "torch"},
            {"running_mean": rmean, "running_var": rvar, "num_batches_tracked": nbt,
             "init_mean": init_mean, "init_variance": init_var},
            layer=(f"torch.nn.BatchNorm2d({c}, momentum={momentum}, dtype=torch.float64).train()"
                   f"(torch.cat([x_nchw[t, w] for w in range({n_workers})], dim=0))"),
            layer_kwargs={"num_features": c, "momentum": momentum, "eps": bn.eps,
                          "dtype": "float64"},
            kind="data_parallel",
            notes=(f"One torch BatchNorm2d (training mode, float64) fed, at each step, the "
                   f"concatenation of the {n_workers} workers' batches of {DP_INPUTS}.npz (x_nchw): "
                   "the statistics a data-parallel run must reproduce with ONE update per step. "
                   f"torch update: {rule}; the variance fed into running_var is the UNBIASED batch "
                   f"variance of the global count n = {count} per channel (n/(n-1) times the biased "
                   "one); initial running_mean 0, running_var 1. Row t holds the state after step t+1."),
            extra={**common, "feature_axis": 1, "layout": "nchw", "inputs_key": "x_nchw",
                   "keys": {"mean": "running_mean", "variance": "running_var",
                            "num_batches": "num_batches_tracked"},
                   "rtol": DP_TEST_RTOL, "ref_max_rel_err": err},
        )

    # Keras: one BatchNormalization fed the concatenated channels-last batch --
    # Keras 3 BatchNormalization.call casts its inputs to
    # backend.result_type(inputs.dtype, "float32"), which is float32 even for
    # float64 inputs (JAX-style promotion), so it computes in float32 whatever
    # the dtype policy: the float64-policy layer below stores float32-rounded
    # values in float64 variables.  Checked here: a float32-policy layer gives
    # the very same numbers.
    name = "dp_keras_bn_m0.9"
    momentum, eps = 0.9, 1e-3
    layers = {dt: keras.layers.BatchNormalization(axis=-1, momentum=momentum, epsilon=eps,
                                                  dtype=dt)
              for dt in ("float64", "float32")}
    for lay in layers.values():
        lay.build((n_workers * n, h, w, c))
    layer = layers["float64"]
    init_mean = to_np(layer.moving_mean).copy()
    init_var = to_np(layer.moving_variance).copy()
    assert init_mean.dtype == np.float64 and init_var.dtype == np.float64, init_mean.dtype
    mmean = np.empty((t_steps, c))
    mvar = np.empty((t_steps, c))
    for s in range(t_steps):
        for dt, lay in layers.items():
            parts = [x_nhwc[s, r].astype(dt) for r in range(n_workers)]
            batch = keras.ops.concatenate(parts, axis=0)
            assert tuple(batch.shape) == (n_workers * n, h, w, c)
            lay(batch, training=True)
        mmean[s] = to_np(layer.moving_mean)
        mvar[s] = to_np(layer.moving_variance)
        assert to_np(layer.moving_mean).dtype == np.float64
        assert np.array_equal(mmean[s], to_np(layers["float32"].moving_mean))
        assert np.array_equal(mvar[s], to_np(layers["float32"].moving_variance))
    assert np.array_equal(mmean.astype(np.float32), mmean)
    assert np.array_equal(mvar.astype(np.float32), mvar)
    m64, v64 = init_mean.copy(), init_var.copy()
    ref_m, ref_v = np.empty_like(mmean), np.empty_like(mvar)
    for s in range(t_steps):
        m64 = m64 * momentum + step_mean[s] * (1 - momentum)
        v64 = v64 * momentum + step_var[s] * (1 - momentum)
        ref_m[s], ref_v[s] = m64, v64
    err = max(dp_check(name, mmean, ref_m, "moving_mean", DP_KERAS_RTOL),
              dp_check(name, mvar, ref_v, "moving_variance", DP_KERAS_RTOL))
    add_case(
        name, "keras", "running", {"kind": "batch", "axis": -1, "momentum": momentum,
                                   "convention": "keras"},
        {"moving_mean": mmean, "moving_variance": mvar,
         "num_batches": np.arange(1, t_steps + 1, dtype=np.int64),
         "init_mean": init_mean, "init_variance": init_var},
        layer=(f"keras.layers.BatchNormalization(axis=-1, momentum={momentum}, epsilon={eps}, "
               "dtype='float64')(keras.ops.concatenate([x_nhwc[t, w] for w in "
               f"range({n_workers})], axis=0), training=True)"),
        layer_kwargs={"axis": -1, "momentum": momentum, "epsilon": eps, "dtype": "float64"},
        kind="data_parallel",
        notes=(f"One Keras BatchNormalization (float64 dtype policy, torch backend) called with "
               f"training=True on the concatenation of the {n_workers} workers' channels-last "
               f"batches of {DP_INPUTS}.npz (x_nhwc) each step. Keras update: moving = moving * "
               "momentum + batch_stat * (1 - momentum) with the BIASED batch variance (Keras "
               "computes it as E[x^2] - E[x]^2); initial moving_mean 0, "
               "moving_variance 1. num_batches is not Keras state: it is the step count. Row t "
               "holds the state after step t+1. PRECISION: Keras 3 BatchNormalization computes "
               "in float32 even under a float64 policy (it casts inputs to "
               "result_type(inputs.dtype, 'float32') = float32), so these records are float32 "
               "computations (the inputs are exact in float32; every recorded value is exactly a "
               "float32, and a float32-policy layer gives identical numbers) stored as float64: "
               "compare them with rtol "
               f"{DP_KERAS_RTOL:g}, not {DP_TEST_RTOL:g}."),
        extra={**common, "feature_axis": -1, "layout": "nhwc", "inputs_key": "x_nhwc",
               "compute_dtype": "float32",
               "keys": {"mean": "moving_mean", "variance": "moving_variance",
                        "num_batches": "num_batches"},
               "rtol": DP_KERAS_RTOL, "ref_max_rel_err": err},
    )

    # cumulative: exact population statistics of everything seen so far -----
    name = "dp_cumulative"
    cmean = np.empty((t_steps, c))
    cvar = np.empty((t_steps, c))
    ccount = np.empty(t_steps, np.int64)
    for s in range(t_steps):
        seen = np.moveaxis(x_nchw[: s + 1], 3, 0).reshape(c, -1)
        cmean[s], cvar[s], ccount[s] = seen.mean(axis=1), seen.var(axis=1), seen.shape[1]
    # second, independent route: Chan merge of the per-step moments
    tot_n, tot_mean, tot_m2 = 0, np.zeros(c), np.zeros(c)
    ref_m, ref_v = np.empty_like(cmean), np.empty_like(cvar)
    for s in range(t_steps):
        nb, mb, m2b = count, step_mean[s], step_var[s] * count
        new_n = tot_n + nb
        delta = mb - tot_mean
        tot_mean = tot_mean + delta * (nb / new_n)
        tot_m2 = tot_m2 + m2b + delta ** 2 * (tot_n * nb / new_n)
        tot_n = new_n
        ref_m[s], ref_v[s] = tot_mean, tot_m2 / tot_n
    err = max(dp_check(name, cmean, ref_m, "mean"), dp_check(name, cvar, ref_v, "variance"))
    assert list(ccount) == [count * (s + 1) for s in range(t_steps)]
    add_case(
        name, "numpy", "running", {"kind": "batch", "axis": 1, "momentum": None,
                                   "convention": "cumulative"},
        {"mean": cmean, "variance": cvar, "count": ccount,
         "num_batches": np.arange(1, t_steps + 1, dtype=np.int64)},
        layer="numpy: x_nchw[:t+1] per channel, .mean() and .var() (float64, two-pass)",
        layer_kwargs={},
        kind="data_parallel",
        notes=("The 'cumulative' convention (precise BN): exact population mean and BIASED "
               f"variance per channel of every sample of every worker up to step t+1 "
               f"({DP_INPUTS}.npz), count = {count} * (t+1). Computed directly from the samples; "
               "ref_max_rel_err is its deviation from a Chan merge of the per-step moments. "
               "Row t holds the state after step t+1."),
        extra={**common, "framework_version": np.__version__, "feature_axis": 1,
               "layout": "nchw", "inputs_key": "x_nchw",
               "keys": {"mean": "mean", "variance": "variance", "num_batches": "num_batches",
                        "count": "count"},
               "rtol": DP_TEST_RTOL, "ref_max_rel_err": err},
    )


# --------------------------------------------------------------------------
def main() -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for old in GOLDEN_DIR.glob("*.npz"):
        old.unlink()

    # a) Keras 3 layers, training=True
    keras_batch_norm("keras_bn_axis_last", 101, (4, 5, 6, 8), -1)
    keras_batch_norm("keras_bn_axis1", 102, (4, 8, 5, 6), 1)
    keras_batch_norm("keras_bn_axis_list_1_3", 103, (3, 4, 5, 6), [1, 3])
    keras_layer_norm("keras_ln_axis_last", 111, (6, 16), -1)
    keras_layer_norm("keras_ln_axes_last2", 112, (3, 5, 7), [-2, -1])
    keras_layer_norm("keras_ln_axis_middle", 113, (4, 6, 5), 1)
    keras_group_norm("keras_gn_g4_axis_last", 121, (2, 5, 5, 8), 4, -1)
    keras_group_norm("keras_gn_g2_axis1", 122, (2, 8, 4, 4), 2, 1)
    keras_group_norm("keras_instance_norm_axis_last", 123, (2, 4, 4, 6), -1, -1)
    keras_rms_norm("keras_rms_axis_last", 131, (6, 16), -1)
    keras_running("keras_bn_running_m0.9", 141, momentum=0.9)

    # b) PyTorch
    torch_batch_norm("torch_batch_norm", 201, (4, 6, 5, 5))
    torch_group_norm("torch_group_norm_g3", 202, (2, 6, 4, 4), 3)
    torch_layer_norm("torch_layer_norm_16", 203, (6, 16), (16,))
    torch_layer_norm("torch_layer_norm_5x7", 204, (3, 5, 7), (5, 7))
    torch_rms_norm("torch_rms_norm_eps1e-6", 205, (6, 16), (16,), 1e-6)
    torch_rms_norm("torch_rms_norm_eps_default", 206, (3, 5, 7), (5, 7), None)
    torch_running("torch_bn2d_running_m0.1", 241, 0.1)
    torch_running("torch_bn2d_running_cma", 242, None)

    # c) data parallel: W workers, one update per step (float64)
    data_parallel(301)

    index = {
        "description": "Golden reference cases for normsvc (see scripts/make_golden.py).",
        "generator": "scripts/make_golden.py",
        "command": "KERAS_BACKEND=torch python scripts/make_golden.py",
        "versions": {"torch": torch.__version__, "keras": keras.__version__,
                     "keras_backend": keras.backend.backend(), "numpy": np.__version__},
        "dtype": "float32",
        "cases": CASES,
    }
    (GOLDEN_DIR / "index.json").write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
    total = sum(p.stat().st_size for p in GOLDEN_DIR.iterdir())
    for c in CASES:
        err = c.get("ref_max_abs_err", c.get("ref_max_rel_err"))
        print(f"{c['name']:34s} {c['framework']:6s} {c['op']:14s} ref_err={err:.2e}")
    print(f"wrote {len(CASES)} cases, {total} bytes, to tests/golden/")


if __name__ == "__main__":
    main()
