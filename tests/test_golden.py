"""Golden tests: normsvc.ops against Keras 3 / PyTorch 2.13 reference outputs.

The golden files live in tests/golden/ (``*.npz`` plus ``index.json``) and are
produced by ``scripts/make_golden.py`` (its docstring says how to regenerate
them).  Each "op" case in index.json names the normsvc op (``op``) and the
keyword arguments to call it with (``kwargs``); the ``.npz`` holds the
float32 input ``x``, the affine parameters ``gamma``/``beta`` as they were
set in the framework layer, the framework's float32 output ``y``, float64
per-group statistics of ``x`` (``ref_mean``/``ref_variance``/``count``) and,
where the framework exposes them, its own batch statistics.

Tolerances
----------
y (float32): rtol = atol = 1e-5.  The golden y was computed in float32 by
Keras/torch; scripts/make_golden.py checked it against a float64 reference
and recorded the deviation (``ref_max_abs_err`` in index.json, at most
~1e-6 for |y| up to ~10).  normsvc computes in float32 or float64 and rounds
to float32 (half an ulp at |y| ~ 8 is ~5e-7), so honest implementations
differ from the golden y by a few 1e-6 at most: 1e-5 leaves headroom while a
semantic slip (epsilon 1e-3 vs 1e-5, biased vs unbiased variance, wrong
reduction axes, gamma/beta on the wrong axis) moves y by 1e-4 .. 1e0, which
``test_golden_files_discriminate`` checks for the epsilon case.

Moments (float64): compared with the float64 statistics of the same float32
input at rtol 1e-6 / atol 1e-7 (any float64 algorithm - two-pass, Welford,
pairwise - lands within ~1e-12); compared with the framework's own float32
batch statistics at rtol 1e-5 / atol 1e-6 (Keras computes E[x^2] - E[x]^2 in
float32, which loses a few 1e-7 relative).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"
INDEX = json.loads((GOLDEN / "index.json").read_text())
OP_CASES = [c for c in INDEX["cases"] if c["kind"] == "op"]
STAT_CASES = [c for c in OP_CASES if c["op"] != "rms_norm"]

Y_RTOL = Y_ATOL = 1e-5
REF_STAT_RTOL, REF_STAT_ATOL = 1e-6, 1e-7
FW_STAT_RTOL, FW_STAT_ATOL = 1e-5, 1e-6
MAX_GOLDEN_BYTES = 2 * 1024 * 1024


def _ids(cases):
    return [c["name"] for c in cases]


def load(case) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / case["file"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ops():
    # Imported here rather than at module level so that, until normsvc.ops
    # exists, these tests fail one by one instead of breaking collection of
    # the whole test session.
    from normsvc import ops as _ops

    return _ops


def call_op(ops, case, data):
    fn = getattr(ops, case["op"])
    kwargs = dict(case["kwargs"])
    kwargs["gamma"] = data["gamma"]
    if "beta" in data:
        kwargs["beta"] = data["beta"]
    return fn(data["x"], **kwargs)


# --------------------------------------------------------------------------
# float64 numpy reference (documents how each case's kwargs are meant)
# --------------------------------------------------------------------------
def _axes(axis, ndim):
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % ndim for a in axes)


def _bshape(shape, axes):
    return [shape[i] if i in axes else 1 for i in range(len(shape))]


def np_reference(op, x, kwargs, gamma=None, beta=None, epsilon=None):
    """float64 reference of normsvc's op semantics (Keras conventions)."""
    x = x.astype(np.float64)
    eps = kwargs["epsilon"] if epsilon is None else epsilon
    nd = x.ndim
    if op == "rms_norm":
        axes = _axes(kwargs.get("axis", -1), nd)
        ms = (x**2).mean(axis=tuple(axes), keepdims=True)
        y = x / np.sqrt(ms + eps)
        return y if gamma is None else y * gamma.reshape(_bshape(x.shape, axes))
    if op in ("batch_norm", "layer_norm"):
        axes = _axes(kwargs.get("axis", -1), nd)  # BN: kept axes; LN: normalized axes
        reduce = [i for i in range(nd) if i not in axes] if op == "batch_norm" else axes
        mean = x.mean(axis=tuple(reduce), keepdims=True)
        var = x.var(axis=tuple(reduce), keepdims=True)
        y = (x - mean) / np.sqrt(var + eps)
        pb = _bshape(x.shape, axes)
    elif op in ("group_norm", "instance_norm"):
        ax = kwargs.get("axis", -1) % nd
        c = x.shape[ax]
        g = c if op == "instance_norm" or kwargs["groups"] == -1 else kwargs["groups"]
        gshape = list(x.shape[:ax]) + [g, c // g] + list(x.shape[ax + 1:])
        xg = x.reshape(gshape)
        reduce = tuple(i for i in range(1, len(gshape)) if i != ax)
        mean = xg.mean(axis=reduce, keepdims=True)
        var = xg.var(axis=reduce, keepdims=True)
        y = ((xg - mean) / np.sqrt(var + eps)).reshape(x.shape)
        pb = _bshape(x.shape, [ax])
    else:  # pragma: no cover
        raise ValueError(op)
    if gamma is not None:
        y = y * gamma.astype(np.float64).reshape(pb)
    if beta is not None:
        y = y + beta.astype(np.float64).reshape(pb)
    return y


# --------------------------------------------------------------------------
# golden files themselves (no normsvc needed)
# --------------------------------------------------------------------------
def test_index_matches_files():
    listed = {c["file"] for c in INDEX["cases"]}
    on_disk = {p.name for p in GOLDEN.glob("*.npz")}
    assert listed == on_disk
    assert len({c["name"] for c in INDEX["cases"]}) == len(INDEX["cases"])
    total = sum(p.stat().st_size for p in GOLDEN.iterdir() if p.is_file())
    assert total < MAX_GOLDEN_BYTES

    def strings(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for item in v.values():
                yield from strings(item)
        elif isinstance(v, list):
            for item in v:
                yield from strings(item)

    # files are referenced relative to tests/golden, never by absolute path
    assert not [s for s in strings(INDEX) if s.startswith("/") or ":\\" in s]


@pytest.mark.parametrize("case", INDEX["cases"], ids=_ids(INDEX["cases"]))
def test_golden_arrays_as_declared(case):
    data = load(case)
    assert set(data) == set(case["arrays"])
    for key, spec in case["arrays"].items():
        assert list(data[key].shape) == spec["shape"], key
        assert str(data[key].dtype) == spec["dtype"], key
    for key in ("x", "y", "gamma", "beta", "batches"):
        if key in data:
            assert data[key].dtype == np.float32, key
            assert np.all(np.isfinite(data[key])), key
    if "gamma" in data:  # non-trivial affine parameters
        assert not np.allclose(data["gamma"], 1.0)
    if "beta" in data:
        assert not np.allclose(data["beta"], 0.0)


@pytest.mark.parametrize("case", OP_CASES, ids=_ids(OP_CASES))
def test_golden_y_matches_float64_reference(case):
    data = load(case)
    ref = np_reference(case["op"], data["x"], case["kwargs"], data["gamma"], data.get("beta"))
    np.testing.assert_allclose(data["y"], ref, rtol=Y_RTOL, atol=Y_ATOL)


@pytest.mark.parametrize("case", OP_CASES, ids=_ids(OP_CASES))
def test_golden_files_discriminate(case):
    """A wrong epsilon (x10) must move y well outside the y tolerance."""
    data = load(case)
    eps = case["kwargs"]["epsilon"]
    wrong = np_reference(case["op"], data["x"], case["kwargs"], data["gamma"],
                         data.get("beta"), epsilon=eps * 10)
    excess = np.abs(wrong - data["y"]) - (Y_ATOL + Y_RTOL * np.abs(data["y"]))
    assert excess.max() > 5 * Y_ATOL


# --------------------------------------------------------------------------
# normsvc.ops against the golden files
# --------------------------------------------------------------------------
@pytest.mark.parametrize("case", OP_CASES, ids=_ids(OP_CASES))
def test_output_matches_golden(ops, case):
    data = load(case)
    y, _moments = call_op(ops, case, data)
    y = np.asarray(y)
    assert y.dtype == np.float32, "y must keep the input dtype"
    assert y.shape == data["x"].shape
    np.testing.assert_allclose(
        y, data["y"], rtol=Y_RTOL, atol=Y_ATOL,
        err_msg=f"{case['name']}: normsvc.ops.{case['op']}(**{case['kwargs']}) vs "
                f"{case['framework']} {case['framework_callable']}",
    )


@pytest.mark.parametrize("case", STAT_CASES, ids=_ids(STAT_CASES))
def test_moments_match_golden(ops, case):
    data = load(case)
    _y, m = call_op(ops, case, data)
    ref_mean, ref_var, count = data["ref_mean"], data["ref_variance"], int(data["count"])
    mean = np.asarray(m.mean)
    var = np.asarray(m.variance)
    m2 = np.asarray(m.m2)
    for label, arr in (("mean", mean), ("variance", var), ("m2", m2)):
        assert arr.dtype == np.float64, f"Moments.{label} must be float64"
        assert arr.shape == ref_mean.shape, (
            f"Moments.{label} shape {arr.shape}, expected per-group shape {ref_mean.shape}")
    assert np.all(np.asarray(m.count) == count)
    np.testing.assert_allclose(mean, ref_mean, rtol=REF_STAT_RTOL, atol=REF_STAT_ATOL)
    np.testing.assert_allclose(var, ref_var, rtol=REF_STAT_RTOL, atol=REF_STAT_ATOL)
    np.testing.assert_allclose(m2, ref_var * count, rtol=REF_STAT_RTOL, atol=REF_STAT_ATOL)
    np.testing.assert_allclose(np.asarray(m.unbiased_variance()), ref_var * count / (count - 1),
                               rtol=REF_STAT_RTOL, atol=REF_STAT_ATOL)
    # the framework's own batch statistics, where it exposes them
    if "batch_mean" in data:
        np.testing.assert_allclose(mean, data["batch_mean"], rtol=FW_STAT_RTOL, atol=FW_STAT_ATOL)
    if "batch_variance" in data:
        np.testing.assert_allclose(var, data["batch_variance"],
                                   rtol=FW_STAT_RTOL, atol=FW_STAT_ATOL)
    if "batch_unbiased_variance" in data:
        np.testing.assert_allclose(np.asarray(m.unbiased_variance()),
                                   data["batch_unbiased_variance"],
                                   rtol=FW_STAT_RTOL, atol=FW_STAT_ATOL)
