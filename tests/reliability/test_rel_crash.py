"""kill -9 of `normsvc serve` while clients push, bounded: 3 kills per workload (scripts/reliability/crash.py).

Every workload runs once, on one sqlite setting (the two settings alternate
between workloads, so both are covered); the full run, 10 kills per workload
and setting, is in docs/reliability.md.
"""

import numpy as np
from rel_util import quiet

from reliability import crash
from reliability.common import encode, pb


def test_every_acknowledged_request_survives_kill_9_exactly_once(tmp_path):
    pairs = [("single", "normal"), ("multi53", "full"), ("import", "normal"), ("freeze", "full"), ("steps", "normal")]
    results = crash.run(pairs, rounds=3, seconds=0.4, seed=1, folder=tmp_path, log=quiet, import_layers=1000)
    for r in results:
        assert r.kills == 3 and r.acknowledged > 0, r
        assert (r.lost, r.duplicated, r.partial, r.mismatched, r.unexpected) == (0, 0, 0, 0, []), r
    assert {r.synchronous for r in results} == {"normal", "full"}


def _layer(version: int, mean: float = 0.0) -> pb.Layer:
    return pb.Layer(name="x", stats=pb.RunningStats(version=version, num_batches=version,
                                                     mean=encode(np.array([mean]))))


def test_the_comparison_tells_lost_duplicated_and_mismatched_layers():
    """The checker itself: a layer behind the reference, ahead of it, different, missing or extra."""
    result = crash.Result("w", "normal")
    expected = {"a": _layer(3), "b": _layer(3), "c": _layer(3), "d": _layer(3), "e": _layer(3)}
    actual = {"a": _layer(3), "b": _layer(2), "c": _layer(4), "d": _layer(3, mean=1.0), "z": _layer(1)}
    crash._compare(actual, expected, result)
    assert (result.lost, result.duplicated, result.mismatched) == (2, 2, 1)  # b, e / c, z / d
    assert not result.ok
