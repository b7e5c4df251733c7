"""Data-parallel golden files: W workers, one running-statistics update per step.

``load_steps()`` reads the ``"kind": "data_parallel"`` cases of
tests/golden/index.json (files ``dp_*.npz``, written by scripts/make_golden.py)
into one small object.  The setting: W = 4 workers x T = 20 steps; at each
step every worker has its own batch, drawn from its own distribution (worker
w, channel c ~ Normal(3*w + c - 2, (0.5 + w) * (1 + 0.25*c))).  The references
are ONE process that sees the concatenation of the W batches of each step,
i.e. what SyncBatchNorm or a single-GPU run gives, so a store that takes
exactly one update per step (the W step contributions merged, the layer's
convention applied once with the global count) must reproduce them, and a
store that applies one update per worker must not.

Usage (in a test)::

    from golden_steps import load_steps

    g = load_steps()
    case = g.cases["torch_m0.1"]
    layer = store.create_layer("bn", **case.layer_kwargs)   # kind, axis, momentum, convention
    for t in range(g.steps):
        for w in range(g.workers):
            push(layer, run, step=t, rank=w, batch=case.x[t, w], reduce_axes=case.reduce_axes)
        np.testing.assert_allclose(layer.stats().mean, case.mean[t], rtol=case.rtol)
        np.testing.assert_allclose(layer.stats().variance, case.variance[t], rtol=case.rtol)

Arrays (all float64 unless said; row t of every record is the state AFTER step
t + 1 has been applied):

``GoldenSteps``
    x_nchw      [T, W, N, C, H, W] = [20, 4, 6, 5, 3, 3]: x_nchw[t, w] is worker
                w's batch at step t, channels-first (torch layout).  Every value
                is exactly representable in float32.
    x_nhwc      [T, W, N, H, W, C]: the same batches channels-last (Keras layout).
    step_mean, step_variance   [T, C]: mean and BIASED variance of the
                concatenation of the W batches of each step (count_per_step
                samples per channel): the merged moments of one step.
    worker_loc, worker_scale   [W, C]: the distribution of each worker.
    count_per_worker (N*H*W = 54), count_per_step (W*N*H*W = 216), steps, workers.
    cases       dict name -> StepCase, names:

``StepCase``
    "torch_m0.1"  torch.nn.BatchNorm2d(5, momentum=0.1), float64: running_mean,
                  running_var (UNBIASED with the global count), num_batches_tracked.
    "torch_cma"   the same with momentum=None (cumulative moving average).
    "keras_m0.9"  keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3) on
                  the channels-last batches: moving_mean, moving_variance (BIASED);
                  Keras computes in float32 even under a float64 policy, so its
                  rtol is 1e-6 rather than 1e-10.
    "cumulative"  exact population mean / BIASED variance of every sample seen so
                  far (the 'cumulative' convention; count = 216 * (t + 1)).

    Fields: name, file, convention, momentum, layout ("nchw" or "nhwc"), x (the
    inputs in that layout), feature_axis (axis of the channel in one batch),
    reduce_axes (the other axes of one batch), mean [T, C], variance [T, C],
    num_batches [T], count [T] (cumulative only, else None), init_mean /
    init_variance [C] (the framework's initial state, 0 and 1; None for
    cumulative), rtol (the tolerance the record is good to against an exact
    float64 implementation), layer_kwargs (kind, axis, momentum, convention,
    as for Store.create_layer), entry (the raw index.json entry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN = Path(__file__).resolve().parent / "golden"

# index.json case name -> short name used in GoldenSteps.cases
CASE_NAMES = {
    "dp_torch_bn2d_m0.1": "torch_m0.1",
    "dp_torch_bn2d_cma": "torch_cma",
    "dp_keras_bn_m0.9": "keras_m0.9",
    "dp_cumulative": "cumulative",
}
INPUTS_CASE = "dp_inputs"


@dataclass(frozen=True)
class StepCase:
    name: str
    file: str
    convention: str
    momentum: float | None
    layout: str
    x: np.ndarray
    feature_axis: int
    reduce_axes: tuple[int, ...]
    mean: np.ndarray
    variance: np.ndarray
    num_batches: np.ndarray
    count: np.ndarray | None
    init_mean: np.ndarray | None
    init_variance: np.ndarray | None
    rtol: float
    layer_kwargs: dict[str, Any]
    entry: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class GoldenSteps:
    x_nchw: np.ndarray
    x_nhwc: np.ndarray
    step_mean: np.ndarray
    step_variance: np.ndarray
    worker_loc: np.ndarray
    worker_scale: np.ndarray
    steps: int
    workers: int
    count_per_worker: int
    count_per_step: int
    cases: dict[str, StepCase]


def _npz(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / name, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@lru_cache(maxsize=1)
def load_steps() -> GoldenSteps:
    """The data-parallel golden inputs and references (cached; arrays read-only)."""
    index = json.loads((GOLDEN / "index.json").read_text())
    entries = {c["name"]: c for c in index["cases"] if c["kind"] == "data_parallel"}
    missing = ({INPUTS_CASE} | set(CASE_NAMES)) - set(entries)
    if missing:
        raise LookupError(f"tests/golden/index.json lacks the data-parallel cases {sorted(missing)}; "
                          "regenerate with `make golden`")
    inp = {k: _readonly(v) for k, v in _npz(entries[INPUTS_CASE]["file"]).items()}
    x = {"nchw": inp["x_nchw"], "nhwc": inp["x_nhwc"]}
    cases = {}
    for full, short in CASE_NAMES.items():
        e = entries[full]
        d = {k: _readonly(v) for k, v in _npz(e["file"]).items()}
        keys = e["keys"]
        kw = e["kwargs"]
        layout = e["layout"]
        ndim = 4
        fa = e["feature_axis"] % ndim
        cases[short] = StepCase(
            name=full, file=e["file"], convention=kw["convention"], momentum=kw["momentum"],
            layout=layout, x=x[layout], feature_axis=fa,
            reduce_axes=tuple(i for i in range(ndim) if i != fa),
            mean=d[keys["mean"]], variance=d[keys["variance"]],
            num_batches=d[keys["num_batches"]],
            count=d[keys["count"]] if "count" in keys else None,
            init_mean=d.get("init_mean"), init_variance=d.get("init_variance"),
            rtol=float(e["rtol"]), layer_kwargs=dict(kw), entry=e,
        )
    e = entries[INPUTS_CASE]
    return GoldenSteps(
        x_nchw=inp["x_nchw"], x_nhwc=inp["x_nhwc"],
        step_mean=inp["step_mean"], step_variance=inp["step_variance"],
        worker_loc=inp["worker_loc"], worker_scale=inp["worker_scale"],
        steps=int(e["steps"]), workers=int(e["workers"]),
        count_per_worker=int(e["count_per_worker"]), count_per_step=int(e["count_per_step"]),
        cases=cases,
    )
