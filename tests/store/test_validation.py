"""Checks at the store's edge: layer names, request ids, pushed moments, statistics written as they are."""

import numpy as np
import pytest

from normsvc import Moments, RunningStats
from normsvc.store import InvalidArgument
from normsvc.store import validation
from store_testing import batch_moments, np_moments


@pytest.mark.parametrize("name", ["bn", "a/b/c", "layer1.0.bn1", "x-y_z.9", "B" * 256, "model/block.1/bn-2",
                                  ".x", "a/..b", "a/b..", "..."])
def test_valid_names(store, name):
    store.create_layer(name)
    assert store.layer(name).name == name


@pytest.mark.parametrize("name", ["", "B" * 257, "a b", "a//b", "/a", "a/", "caf\u00e9", "a\nb", "a:b", "a*", 5, None,
                                  ".", "..", "a/../b", "team/../other/x", "a/./b", "./a", "a/.."])
def test_invalid_names(store, name):
    with pytest.raises(InvalidArgument) as info:
        store.create_layer(name)
    assert info.value.field == "name"
    assert store.list_layers() == []


def test_invalid_request_ids(store, rng):
    layer = store.create_layer("bn")
    for bad in ("", "x" * 257, 7, b"id"):
        with pytest.raises(InvalidArgument) as info:
            layer.update(batch_moments(rng), request_id=bad)
        assert info.value.field == "request_id"
    assert layer.stats().version == 0


def _bad_moments():
    good_mean, good_m2 = np.zeros(4), np.ones(4)
    return {
        "nan mean": (Moments(8.0, [0, np.nan, 0, 0], good_m2), "moments.mean", "NaN or Inf"),
        "inf mean": (Moments(8.0, [0, np.inf, 0, 0], good_m2), "moments.mean", "NaN or Inf"),
        "nan m2": (Moments(8.0, good_mean, [1, 1, np.nan, 1]), "moments.m2", "NaN or Inf"),
        "inf m2": (Moments(8.0, good_mean, [1, 1, np.inf, 1]), "moments.m2", "NaN or Inf"),
        "nan count": (Moments(np.nan, good_mean, good_m2), "moments.count", "NaN or Inf"),
        "inf count": (Moments(np.inf, good_mean, good_m2), "moments.count", "NaN or Inf"),
        "negative count": (Moments(-8.0, good_mean, good_m2), "moments.count", "positive"),
        "zero count": (Moments(0.0, good_mean, good_m2), "moments.count", "positive"),
        "negative variance": (Moments(8.0, good_mean, [1, -1e-3, 1, 1]), "moments.m2", "negative"),
        "other features": (Moments(8.0, np.zeros(5), np.ones(5)), "moments.mean", "shape"),
        "other rank": (Moments(8.0, np.zeros((2, 4)), np.ones((2, 4))), "moments.mean", "shape"),
        "scalar": (Moments(8.0, 0.0, 1.0), "moments.mean", "shape"),
        "uneven counts": (Moments([8.0, 8, 7, 8], good_mean, good_m2), "moments.count", "differs"),
        "not moments": ((8.0, good_mean, good_m2), "moments", "normsvc.Moments"),
        "overflow": (Moments(8.0, [0, 1e308, 0, 0], good_m2), "moments.mean", "overflow"),
    }


@pytest.mark.parametrize("case", list(_bad_moments()))
def test_rejected_moments_change_nothing(store, assert_unchanged, rng, case):
    moments, field, message = _bad_moments()[case]
    # the cumulative merge squares the distance between means: 1e308 overflows it
    layer = store.create_layer("bn", convention="cumulative" if case == "overflow" else "keras")
    layer.update(batch_moments(rng, c=4))
    with assert_unchanged(store), pytest.raises(InvalidArgument, match=message) as info:
        layer.update(moments, request_id="r")
    assert info.value.field == field and info.value.layer == "bn"
    assert layer.update(batch_moments(rng, c=4), request_id="r").version == 2  # "r" was not remembered


def test_uniform_per_group_counts_are_accepted(store):
    layer = store.create_layer("bn", momentum=0.0)
    s = layer.update(Moments(np.full(3, 4.0), np.arange(3.0), np.full(3, 8.0)))
    np.testing.assert_array_equal(s.variance, [2.0, 2.0, 2.0])
    assert s.count == 4.0


def test_torch_needs_more_than_one_value_per_channel(store, assert_unchanged):
    layer = store.create_layer("bn", convention="torch")
    with assert_unchanged(store), pytest.raises(InvalidArgument, match="more than 1 value"):
        layer.update(np_moments(np.ones((1, 3)), [0]))
    inst = store.create_layer("in", kind="instance", axis=1, convention="torch")
    with assert_unchanged(store), pytest.raises(InvalidArgument, match="more than 1 value"):
        inst.update(np_moments(np.ones((4, 3, 1)), [2]))  # 4 instances of one value each


def test_instance_moments_need_the_sample_axis(store, assert_unchanged, rng):
    layer = store.create_layer("in", kind="instance", axis=1)
    with assert_unchanged(store), pytest.raises(InvalidArgument, match=r"shape \(N, C\)"):
        layer.update(batch_moments(rng, c=3))  # per channel only: not what instance norm produces


@pytest.mark.parametrize("config, field, message", [
    ({"kind": "weight"}, "kind", "expected one of"),
    ({"momentum": 2.0}, "momentum", r"in \[0, 1\]"),
    ({"epsilon": -1.0}, "epsilon", ">= 0"),
    ({"axis": "last"}, "axis", "list of ints"),
    ({"kind": "group", "groups": 0}, "groups", "positive"),
    ({"num_features": [2, 3]}, "num_features", "rank"),
    ({"convention": "cumulative", "momentum": 0.9}, "momentum", "no momentum"),
    ({"colour": "red"}, "config", "unknown keys"),
    ([1, 2], "config", "expected a mapping"),
])
def test_configs_given_as_dicts_get_the_create_layer_checks(config, field, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        validation.config_from_mapping(config, "bn")
    assert (info.value.field, info.value.layer) == (field, "bn")
    assert "'bn'" in info.value.message


def test_configs_given_as_dicts_take_the_defaults():
    cfg = validation.config_from_mapping({"convention": "torch", "axis": 1}, "bn")
    assert (cfg.momentum, cfg.epsilon, cfg.axis) == (0.1, 1e-5, 1)
    assert validation.config_from_mapping(cfg, "bn") == cfg
    assert validation.config_from_mapping(cfg.to_dict(), "bn") == cfg


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 1e400, "3", True, None, [1.0]])
def test_bad_counts(value):
    with pytest.raises(InvalidArgument) as info:
        validation.count(value, "bn")
    assert info.value.field == "count"


@pytest.mark.parametrize("value", [-1, 2**63, 2**70, 1e30, 3.0, "3", True, None])
def test_bad_batch_counts(value):
    with pytest.raises(InvalidArgument) as info:
        validation.num_batches(value, "bn")
    assert info.value.field == "num_batches"


def test_good_counts():
    assert validation.count(np.float32(2.5), "bn") == 2.5 and validation.count(0, "bn") == 0.0
    assert validation.num_batches(np.int64(2**63 - 1), "bn") == 2**63 - 1


@pytest.mark.parametrize("stats, field, message", [
    ((np.zeros(3), np.ones(3)), "stats", "RunningStats"),
    (RunningStats(np.zeros(3), np.ones(2)), "stats.variance", "differs"),
    (RunningStats(np.zeros(3), np.array([1.0, -1.0, 1.0])), "stats.variance", "negative"),
    (RunningStats(np.array([0.0, np.nan, 0.0]), np.ones(3)), "stats.mean", "NaN or Inf"),
    (RunningStats(np.array(["a", "b"]), np.ones(2)), "stats.mean", "real numbers"),
    (RunningStats(np.zeros(3), np.ones(3), count=-2.0), "stats.count", ">= 0"),
    (RunningStats(np.zeros(3), np.ones(3), num_batches=2**64), "stats.num_batches", "2\\*\\*63"),
])
def test_statistics_written_as_they_are(stats, field, message):
    with pytest.raises(InvalidArgument, match=message) as info:
        validation.running_values("bn", stats)
    assert (info.value.field, info.value.layer) == (field, "bn")


def test_statistics_written_as_they_are_are_copied_to_float64():
    mean = np.arange(3, dtype=np.float32)
    s = validation.running_values("bn", RunningStats(mean, np.ones(3, np.int64), 4, 2))
    assert s.mean.dtype == s.variance.dtype == np.float64 and s.count == 4.0 and s.num_batches == 2
    mean[0] = 99.0
    assert s.mean[0] == 0.0
