"""Golden tests: normsvc running statistics against Keras 3 / PyTorch 2.13.

Cases are the ``"kind": "running"`` entries of tests/golden/index.json
(produced by scripts/make_golden.py):

* keras_bn_running_m0.9   - keras.layers.BatchNormalization(momentum=0.9),
  20 training steps on (16, 4) batches; moving_mean / moving_variance after
  every step (Keras: biased batch variance, init mean 0 / variance 1).
* torch_bn2d_running_m0.1 - torch.nn.BatchNorm2d(3, momentum=0.1), 20 steps
  on (8, 3, 4, 4) batches; running_mean / running_var / num_batches_tracked
  after every step (torch: unbiased batch variance, init 0 / 1).
* torch_bn2d_running_cma  - the same with momentum=None (cumulative average).

Store contract exercised::

    store = normsvc.Store.open("memory://")
    layer = store.create_layer("bn", kind="batch", axis=..., momentum=...,
                               convention="keras" | "torch")
    layer.update(normsvc.ops.moments(batch, axes=[all axes but the feature axis]))
    st = layer.stats()   # RunningStats: .mean, .variance, .num_batches

Tolerance: rtol 1e-5, atol 1e-6.  The golden sequences were computed by the
frameworks in float32; scripts/make_golden.py checked them against a float64
re-computation of the same update rules and recorded the deviation
(``ref_max_rel_err`` in index.json, below 1e-6 relative with values near zero
judged on a 0.1 scale).  A float64 implementation therefore agrees to ~1e-6;
using the other framework's convention (biased vs unbiased variance: a factor
n/(n-1) >= 1/127 here, or momentum vs 1 - momentum) is off by far more.

The module skips (only) while ``normsvc.Store`` does not exist yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

try:
    from normsvc import Store
except ImportError as exc:  # AttributeError too, via a lazy module __getattr__
    # Skip only when it is normsvc.Store itself that is missing; a broken
    # import inside an existing store module (e.g. a missing dependency) is
    # a real failure and propagates.
    if not (getattr(exc, "name", None) or "").startswith("normsvc"):
        raise
    pytest.skip(f"normsvc.Store not available yet ({exc})", allow_module_level=True)
except AttributeError as exc:
    pytest.skip(f"normsvc.Store not available yet ({exc})", allow_module_level=True)

GOLDEN = Path(__file__).parent / "golden"
INDEX = json.loads((GOLDEN / "index.json").read_text())
RUNNING_CASES = [c for c in INDEX["cases"] if c["kind"] == "running"]

RTOL, ATOL = 1e-5, 1e-6


def load(case) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / case["file"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def store():
    s = Store.open("memory://")
    try:
        yield s
    finally:
        close = getattr(s, "close", None)
        if callable(close):
            close()


def make_layer(store, case):
    kw = case["kwargs"]
    return store.create_layer("bn", kind=kw["kind"], axis=kw["axis"],
                              momentum=kw["momentum"], convention=kw["convention"])


@pytest.mark.parametrize("case", RUNNING_CASES, ids=[c["name"] for c in RUNNING_CASES])
def test_initial_stats(store, case):
    data = load(case)
    st = make_layer(store, case).stats()
    np.testing.assert_allclose(np.asarray(st.mean), data["init_mean"], rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(st.variance), data["init_variance"], rtol=0, atol=0)
    assert int(st.num_batches) == 0


@pytest.mark.parametrize("case", RUNNING_CASES, ids=[c["name"] for c in RUNNING_CASES])
def test_running_sequence_matches_golden(store, case):
    from normsvc import ops

    data = load(case)
    keys = case["keys"]
    want_mean, want_var = data[keys["mean"]], data[keys["variance"]]
    want_n = data[keys["num_batches"]]
    layer = make_layer(store, case)
    for step, batch in enumerate(data["batches"]):
        layer.update(ops.moments(batch, axes=case["reduce_axes"]))
        st = layer.stats()
        where = f"{case['name']} after step {step + 1}"
        mean = np.asarray(st.mean)
        var = np.asarray(st.variance)
        assert mean.shape == want_mean[step].shape, where
        assert var.shape == want_var[step].shape, where
        np.testing.assert_allclose(mean, want_mean[step], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{where}: mean")
        np.testing.assert_allclose(var, want_var[step], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{where}: variance")
        assert int(st.num_batches) == int(want_n[step]), where
