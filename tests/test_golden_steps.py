"""The data-parallel golden files (tests/golden/dp_*.npz, read via golden_steps.py).

W = 4 workers each push their own batch per step; the references (torch
BatchNorm2d momentum 0.1 / None, Keras BatchNormalization momentum 0.9, exact
cumulative statistics) are one process fed the concatenated batch.  Checked
here, without normsvc, torch or keras:

(a) an independent float64 numpy implementation -- per-worker moments merged
    with Chan's formula in rank order, then ONE update per step with the
    global count -- reproduces every record to the case's rtol (1e-10 for the
    float64 torch and numpy records; Keras computes in float32: 1e-6);
(b) the bug users hit -- one momentum update per worker per step -- and a
    naive merge that averages the workers' variances do NOT reproduce them:
    they are off by more than 1 % somewhere, so the files discriminate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from golden_steps import CASE_NAMES, GOLDEN, INPUTS_CASE, load_steps

G = load_steps()
MOMENTUM_CASES = ["torch_m0.1", "torch_cma", "keras_m0.9"]
ALL_CASES = [*MOMENTUM_CASES, "cumulative"]


# --------------------------------------------------------------------------
# independent float64 reimplementation
# --------------------------------------------------------------------------
def worker_moments(case, t, w):
    """(count, mean [C], biased variance [C]) of worker w's batch at step t."""
    b = np.asarray(case.x[t, w], dtype=np.float64)
    n = b.size // b.shape[case.feature_axis]
    mean = b.mean(axis=case.reduce_axes)
    shape = [1] * b.ndim
    shape[case.feature_axis] = -1
    var = ((b - mean.reshape(shape)) ** 2).mean(axis=case.reduce_axes)
    return n, mean, var


def chan_merge(parts):
    """Merge (count, mean, biased variance) triples, in the given order."""
    n, mean, m2 = 0, 0.0, 0.0
    for nb, mb, vb in parts:
        tot = n + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + vb * nb + delta ** 2 * (n * nb / tot)
        n = tot
    return n, mean, m2 / n


def step_moments(case, t):
    return chan_merge([worker_moments(case, t, w) for w in range(G.workers)])


def apply_update(case, mean, var, k, n, bmean, bvar):
    """One running-statistics update with a batch of count n and biased
    variance bvar; k = number of updates so far including this one."""
    if case.convention == "torch":
        f = 1.0 / k if case.momentum is None else case.momentum
        return (1 - f) * mean + f * bmean, (1 - f) * var + f * bvar * n / (n - 1)
    if case.convention == "keras":
        m = case.momentum
        return mean * m + bmean * (1 - m), var * m + bvar * (1 - m)
    raise AssertionError(case.convention)


def one_update_per_step(case):
    """What the golden files claim: merge the W contributions, update once."""
    c = G.x_nchw.shape[3]
    out_m, out_v = np.empty((G.steps, c)), np.empty((G.steps, c))
    if case.convention == "cumulative":
        parts = []
        for t in range(G.steps):
            parts += [worker_moments(case, t, w) for w in range(G.workers)]
            _, out_m[t], out_v[t] = chan_merge(parts)
        return out_m, out_v
    mean = np.array(case.init_mean, dtype=np.float64)
    var = np.array(case.init_variance, dtype=np.float64)
    for t in range(G.steps):
        n, bm, bv = step_moments(case, t)
        mean, var = apply_update(case, mean, var, t + 1, n, bm, bv)
        out_m[t], out_v[t] = mean, var
    return out_m, out_v


def one_update_per_worker(case):
    """The bug: every worker's contribution is its own update (W per step)."""
    c = G.x_nchw.shape[3]
    out_m, out_v = np.empty((G.steps, c)), np.empty((G.steps, c))
    mean = np.array(case.init_mean, dtype=np.float64)
    var = np.array(case.init_variance, dtype=np.float64)
    k = 0
    for t in range(G.steps):
        for w in range(G.workers):
            k += 1
            n, bm, bv = worker_moments(case, t, w)
            mean, var = apply_update(case, mean, var, k, n, bm, bv)
        out_m[t], out_v[t] = mean, var
    return out_m, out_v


def averaged_workers(case):
    """Another wrong merge: one update per step, but with the plain average of
    the workers' means and variances (drops the spread between workers)."""
    c = G.x_nchw.shape[3]
    out_m, out_v = np.empty((G.steps, c)), np.empty((G.steps, c))
    if case.convention == "cumulative":
        sums = np.zeros(c), np.zeros(c)
        for t in range(G.steps):
            for w in range(G.workers):
                _, bm, bv = worker_moments(case, t, w)
                sums = sums[0] + bm, sums[1] + bv
            k = (t + 1) * G.workers
            out_m[t], out_v[t] = sums[0] / k, sums[1] / k
        return out_m, out_v
    mean = np.array(case.init_mean, dtype=np.float64)
    var = np.array(case.init_variance, dtype=np.float64)
    for t in range(G.steps):
        parts = [worker_moments(case, t, w) for w in range(G.workers)]
        bm = np.mean([p[1] for p in parts], axis=0)
        bv = np.mean([p[2] for p in parts], axis=0)
        mean, var = apply_update(case, mean, var, t + 1, G.count_per_step, bm, bv)
        out_m[t], out_v[t] = mean, var
    return out_m, out_v


def max_rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.abs(np.asarray(b))))


# --------------------------------------------------------------------------
# the inputs
# --------------------------------------------------------------------------
def test_inputs_shapes_and_layouts():
    t, w = G.steps, G.workers
    assert (t, w) == (20, 4)
    assert G.x_nchw.shape == (t, w, 6, 5, 3, 3) and G.x_nchw.dtype == np.float64
    assert G.x_nhwc.shape == (t, w, 6, 3, 3, 5) and G.x_nhwc.dtype == np.float64
    assert np.array_equal(G.x_nhwc, np.moveaxis(G.x_nchw, 3, -1))
    # exact in float32, so a float32 client pushes the very same numbers
    assert np.array_equal(G.x_nchw.astype(np.float32).astype(np.float64), G.x_nchw)
    assert G.count_per_worker == 6 * 3 * 3 and G.count_per_step == w * G.count_per_worker
    assert not G.x_nchw.flags.writeable


def test_workers_have_their_own_distributions():
    # per worker and channel, over all steps: 20 * 54 samples each
    per = np.moveaxis(G.x_nchw, 3, 2).reshape(G.steps, G.workers, 5, -1)
    per = np.moveaxis(per, 0, 2).reshape(G.workers, 5, -1)
    np.testing.assert_allclose(per.mean(axis=-1), G.worker_loc, atol=0.5)
    np.testing.assert_allclose(per.std(axis=-1), G.worker_scale, rtol=0.15)
    assert np.all(np.diff(G.worker_loc, axis=0) == 3.0)
    assert np.all(np.diff(G.worker_scale, axis=0) > 0)


def test_step_moments_are_the_concatenation():
    cat = np.concatenate([G.x_nchw[:, w] for w in range(G.workers)], axis=1)  # [T, W*N, C, H, W]
    np.testing.assert_allclose(G.step_mean, cat.mean(axis=(1, 3, 4)), rtol=1e-13)
    np.testing.assert_allclose(G.step_variance, cat.var(axis=(1, 3, 4)), rtol=1e-12)
    case = G.cases["torch_m0.1"]
    for t in range(G.steps):
        n, m, v = step_moments(case, t)
        assert n == G.count_per_step
        np.testing.assert_allclose(m, G.step_mean[t], rtol=1e-13)
        np.testing.assert_allclose(v, G.step_variance[t], rtol=1e-12)


def test_index_entries_describe_the_files():
    index = json.loads((GOLDEN / "index.json").read_text())
    entries = {c["name"]: c for c in index["cases"] if c["kind"] == "data_parallel"}
    assert set(entries) == {INPUTS_CASE, *CASE_NAMES}
    for e in entries.values():
        assert e["file"] == f"{e['name']}.npz" and (GOLDEN / e["file"]).is_file()
        assert e["inputs_file"] == f"{INPUTS_CASE}.npz"
        assert e["framework_version"] and e["notes"]
        assert e["ref_max_rel_err"] <= e.get("rtol", 1e-10)
        with np.load(GOLDEN / e["file"], allow_pickle=False) as z:
            assert {k: [list(z[k].shape), str(z[k].dtype)] for k in z.files} == \
                {k: [v["shape"], v["dtype"]] for k, v in e["arrays"].items()}
    assert entries["dp_keras_bn_m0.9"]["compute_dtype"] == "float32"
    assert entries["dp_keras_bn_m0.9"]["rtol"] == 1e-6
    for name in ("dp_torch_bn2d_m0.1", "dp_torch_bn2d_cma", "dp_cumulative"):
        assert entries[name]["rtol"] == 1e-10


# --------------------------------------------------------------------------
# (a) one update per step reproduces the framework records
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_CASES)
def test_one_update_per_step_reproduces_the_record(name):
    case = G.cases[name]
    assert case.mean.shape == case.variance.shape == (G.steps, 5)
    np.testing.assert_array_equal(case.num_batches, np.arange(1, G.steps + 1))
    if case.count is not None:
        np.testing.assert_array_equal(case.count, G.count_per_step * np.arange(1, G.steps + 1))
    if case.init_mean is not None:
        np.testing.assert_array_equal(case.init_mean, 0.0)
        np.testing.assert_array_equal(case.init_variance, 1.0)
    mean, var = one_update_per_step(case)
    np.testing.assert_allclose(case.mean, mean, rtol=case.rtol, atol=0)
    np.testing.assert_allclose(case.variance, var, rtol=case.rtol, atol=0)


def test_case_metadata():
    torch_m, torch_cma, keras_m, cum = (G.cases[n] for n in ALL_CASES)
    assert (torch_m.convention, torch_m.momentum, torch_m.layout) == ("torch", 0.1, "nchw")
    assert (torch_cma.convention, torch_cma.momentum) == ("torch", None)
    assert (keras_m.convention, keras_m.momentum, keras_m.layout) == ("keras", 0.9, "nhwc")
    assert cum.convention == "cumulative"
    assert torch_m.feature_axis == 1 and torch_m.reduce_axes == (0, 2, 3)
    assert keras_m.feature_axis == 3 and keras_m.reduce_axes == (0, 1, 2)
    assert keras_m.x is G.x_nhwc and torch_m.x is G.x_nchw
    assert keras_m.layer_kwargs == {"kind": "batch", "axis": -1, "momentum": 0.9,
                                    "convention": "keras"}
    # Keras computes in float32: its records are exact float32 values
    assert np.array_equal(keras_m.mean.astype(np.float32), keras_m.mean)


def test_cumulative_is_the_population_of_everything_seen():
    cum = G.cases["cumulative"]
    everything = np.moveaxis(G.x_nchw, 3, 0).reshape(5, -1)
    np.testing.assert_allclose(cum.mean[-1], everything.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(cum.variance[-1], everything.var(axis=1), rtol=1e-12)
    # and the torch momentum=None running mean is the same mean (equal counts per step)
    np.testing.assert_allclose(G.cases["torch_cma"].mean, cum.mean, rtol=1e-12)


# --------------------------------------------------------------------------
# (b) the files discriminate: W updates per step (or a naive merge) fail
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", MOMENTUM_CASES)
def test_one_update_per_worker_does_not_reproduce(name):
    case = G.cases[name]
    mean, var = one_update_per_worker(case)
    off = max(max_rel(mean, case.mean), max_rel(var, case.variance))
    assert off > 0.01, f"{name}: per-worker updates are only {off:.2g} off"
    # far outside the tolerance the right implementation meets
    assert off > 1e4 * case.rtol


@pytest.mark.parametrize("name", ALL_CASES)
def test_averaging_the_workers_variances_does_not_reproduce(name):
    case = G.cases[name]
    mean, var = averaged_workers(case)
    # equal counts: the plain average of the means is right, the variance is not
    assert max_rel(var, case.variance) > 0.01


def test_torch_correction_uses_the_global_count():
    """n/(n-1) with the per-worker count (54) instead of the global one (216)."""
    case = G.cases["torch_m0.1"]
    mean = np.array(case.init_mean, dtype=np.float64)
    var = np.array(case.init_variance, dtype=np.float64)
    out = np.empty_like(case.variance)
    n_w = G.count_per_worker
    for t in range(G.steps):
        f = case.momentum
        mean = (1 - f) * mean + f * G.step_mean[t]
        var = (1 - f) * var + f * G.step_variance[t] * n_w / (n_w - 1)
        out[t] = var
    assert max_rel(out, case.variance) > 1e4 * case.rtol
