"""normsvc.wire.messages: protobuf <-> store values, shared by server and client."""

import subprocess
import sys

import numpy as np
import pytest

from normsvc.wire import messages as convert
from normsvc._proto import normsvc_pb2 as pb
from normsvc.running import RunningStats
from normsvc.config import make_config
from normsvc.errors import InvalidArgument


def test_stats_round_trip():
    stats = RunningStats(np.array([1.0, -2.5]), np.array([0.5, 3.0]), 12.0, 3, 7, True, 1_700_000_000.123456)
    back = convert.stats_from_pb(convert.stats_to_pb(stats))
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.variance, stats.variance)
    assert (back.count, back.num_batches, back.version, back.frozen) == (12.0, 3, 7, True)
    assert back.updated_at == pytest.approx(stats.updated_at, abs=1e-6)
    back.mean[0] = 9.0  # the client's arrays are its own


@pytest.mark.parametrize("options", [
    {},
    {"kind": "group", "groups": 4, "axis": 1},
    {"convention": "torch", "momentum": None},
    {"kind": "layer", "axis": [-2, -1], "epsilon": 1e-6, "center": False},
    {"renorm": True},
    {"renorm": True, "renorm_clipping": {"rmin": 0.5, "rmax": 2.0, "dmax": 0.0}, "renorm_momentum": 0.5,
     "virtual_batch_size": 16},
    {"virtual_batch_size": 2, "axis": 1},
])
def test_config_round_trip(options):
    config = make_config(**options)
    assert convert.config_from_pb(convert.config_to_pb(config, pb.LayerConfig())) == config


def test_bad_enum_is_the_stores_invalid_argument():
    with pytest.raises(InvalidArgument, match="config.kind=99: expected one of LAYER_KIND_BATCH"):
        convert.config_kwargs(pb.LayerConfig(kind=99))


def test_client_does_not_load_the_server_package():
    code = "import sys, normsvc.client; print(sorted(m for m in sys.modules if m.startswith('normsvc.server')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_renorm_statistics_round_trip():
    stats = RunningStats(np.array([1.0, -2.5]), np.array([0.5, 3.0]), 12.0, 3, 7, moving_stddev=np.array([0.75, 1.5]),
                         renorm_mean=np.array([0.25, -1.0]), renorm_stddev=np.array([2.0, 0.125]))
    msg = convert.stats_to_pb(stats)
    assert msg.HasField("renorm_mean") and not convert.stats_to_pb(RunningStats(np.zeros(2), np.ones(2))).HasField(
        "moving_stddev")
    back = convert.stats_from_pb(msg)
    for got, want in zip(back.renorm, stats.renorm):
        np.testing.assert_array_equal(got, want)


def test_renorm_fields_without_renorm_are_refused():
    with pytest.raises(InvalidArgument, match="config.renorm_rmax is set without renorm") as info:
        convert.config_kwargs(pb.LayerConfig(renorm_rmax=3.0))
    assert info.value.field == "config.renorm_rmax"
