"""Batch renormalization and virtual batches against tf_keras 2.21 (golden files).

``scripts/make_golden_tf_keras.py`` ran sequences of training steps through
``tf_keras.layers.BatchNormalization(renorm=..., virtual_batch_size=...)``
and recorded the outputs and every moving variable after each step.  Here
the same inputs go through normsvc: the ops with the running update, a
layer of the Store (memory and sqlite) and the gRPC server's Normalize.
tf_keras ran in float32, so the tolerances are float32's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import normsvc
from normsvc import Client, Store, ops
from normsvc.running import apply_update, batch_statistics, initial_state
from normsvc.testing import running_server

GOLDEN = Path(__file__).parent / "golden" / "tf_keras"
INDEX = json.loads((GOLDEN / "index.json").read_text())
CASES = {case["name"]: case for case in INDEX["cases"]}
TOL = dict(rtol=2e-5, atol=2e-5)
RENORM_VARIABLES = ("moving_stddev", "renorm_mean", "renorm_stddev")


def load(name: str) -> tuple[dict, dict]:
    case = CASES[name]
    with np.load(GOLDEN / case["file"], allow_pickle=False) as data:
        return case, {key: data[key] for key in data.files}


def layer_options(case: dict, clipping: dict | None = None) -> dict:
    args = case["args"]
    out = dict(axis=args["axis"], momentum=args["momentum"], epsilon=args["epsilon"],
               virtual_batch_size=args["virtual_batch_size"])
    if args["renorm"]:
        out |= dict(renorm=True, renorm_momentum=args["renorm_momentum"], renorm_clipping=clipping or {})
    return out


def fixed_clipping(case: dict, g: dict) -> dict:
    """The case's clipping when it stays the same at every step (what a layer config can hold)."""
    keys = case["args"].get("clipping_keys", [])
    assert all(np.all(g[key] == g[key][0]) for key in keys), "clipping changes between steps"
    return {key: float(g[key][0]) for key in keys}


def check_step(g: dict, t: int, y, stats, renorm: bool) -> None:
    np.testing.assert_allclose(y, g["y"][t], **TOL, err_msg=f"y at step {t}")
    names = ("moving_mean", "moving_variance") + (RENORM_VARIABLES if renorm else ())
    for name in names:
        np.testing.assert_allclose(stats[name], g[name][t], **TOL, err_msg=f"{name} at step {t}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_ops_and_running_update_follow_tf_keras_step_by_step(name):
    case, g = load(name)
    args = case["args"]
    renorm = args["renorm"]
    channels = g["gamma"].shape[0]
    state = initial_state("keras", (channels,), renorm=renorm)
    sample_ndim = 0 if args["virtual_batch_size"] is None else 1
    for t in range(case["steps"]):
        common = dict(axis=args["axis"], epsilon=args["epsilon"], gamma=g["gamma"], beta=g["beta"],
                      virtual_batch_size=args["virtual_batch_size"])
        if renorm:
            clip = {key: float(g[key][t]) for key in args["clipping_keys"]}
            y, moments = ops.batch_renorm(g["x"][t], state.renorm_mean, state.renorm_stddev, **common, **clip)
        else:
            y, moments = ops.batch_norm(g["x"][t], **common)
        assert y.dtype == np.float32 and y.shape == g["x"][t].shape
        state = apply_update(state, batch_statistics(moments, sample_ndim), convention="keras",
                             momentum=args["momentum"],
                             renorm=(args["renorm_momentum"], args["epsilon"]) if renorm else None)
        check_step(g, t, y, {"moving_mean": state.mean, "moving_variance": state.variance,
                             **dict(zip(RENORM_VARIABLES, state.renorm or ()))}, renorm)
    y_infer, none = ops.batch_norm(g["x"][-1], axis=args["axis"], epsilon=args["epsilon"], gamma=g["gamma"],
                                   beta=g["beta"], mean=state.mean, variance=state.variance)
    assert none is None
    np.testing.assert_allclose(y_infer, g["y_infer"], **TOL)


def test_clipping_at_its_tightest_is_plain_batch_norm():
    # the schedule starts at rmin = rmax = 1 and dmax = 0: r = 1 and d = 0, whatever the renorm averages
    case, g = load("renorm_clip_relax")
    y, m = ops.batch_renorm(g["x"][0], np.full(5, 7.0), np.full(5, 0.01), gamma=g["gamma"], beta=g["beta"],
                            rmin=1.0, rmax=1.0, dmax=0.0)
    plain, pm = ops.batch_norm(g["x"][0], gamma=g["gamma"], beta=g["beta"])
    np.testing.assert_allclose(y, plain, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(m.mean, pm.mean)
    # and the relaxed clipping of later steps is active: r or d hit a bound at some step
    assert not np.allclose(g["y"][-1], ops.batch_norm(g["x"][-1], gamma=g["gamma"], beta=g["beta"])[0], atol=1e-3)


FIXED = ["renorm_fixed_clip", "renorm_unclipped", "virtual_nhwc", "virtual_channels_first"]


@pytest.mark.parametrize("url", ["memory://", "sqlite"])
@pytest.mark.parametrize("name", FIXED)
def test_store_layer_follows_tf_keras(name, url, tmp_path):
    case, g = load(name)
    renorm = case["args"]["renorm"]
    with Store.open(f"sqlite:///{tmp_path}/s.db" if url == "sqlite" else url) as store:
        layer = store.create_layer("bn", **layer_options(case, fixed_clipping(case, g)))
        for t in range(case["steps"]):
            y = layer.normalize(g["x"][t], training=True, gamma=g["gamma"], beta=g["beta"])
            s = layer.stats()
            check_step(g, t, y, {"moving_mean": s.mean, "moving_variance": s.variance,
                                 **dict(zip(RENORM_VARIABLES, s.renorm or ()))}, renorm)
        assert s.version == case["steps"] and s.num_batches == case["steps"]
        np.testing.assert_allclose(layer.normalize(g["x"][-1], training=False, gamma=g["gamma"], beta=g["beta"]),
                                   g["y_infer"], **TOL)
    if url == "sqlite":  # durable: the renorm statistics come back from the file
        with Store.open(f"sqlite:///{tmp_path}/s.db") as store:
            assert store.layer("bn").stats() == s


@pytest.mark.parametrize("name", ["renorm_fixed_clip", "virtual_nhwc"])
def test_server_normalize_follows_tf_keras(name):
    case, g = load(name)
    renorm = case["args"]["renorm"]
    with running_server() as server, Client(server.address) as client:
        layer = client.create_layer("bn", **layer_options(case, fixed_clipping(case, g)))
        assert layer.config() == normsvc.config.make_config(**layer_options(case, fixed_clipping(case, g)))
        for t in range(case["steps"]):
            y = layer.normalize(g["x"][t], training=True, gamma=g["gamma"], beta=g["beta"])
            s = layer.stats()
            check_step(g, t, y, {"moving_mean": s.mean, "moving_variance": s.variance,
                                 **dict(zip(RENORM_VARIABLES, s.renorm or ()))}, renorm)
        y = layer.normalize(g["x"][-1], training=False, gamma=g["gamma"], beta=g["beta"])
        np.testing.assert_allclose(y, g["y_infer"], **TOL)
