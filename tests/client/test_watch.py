"""normsvc/client/watch.py: a watch's bookkeeping, fed messages by hand (the drivers' watches
run against servers in test_sync.py and test_aio.py)."""

from __future__ import annotations

import numpy as np
import pytest

from normsvc._proto import normsvc_pb2 as pb
from normsvc.client import LayerStats
from normsvc.client.transport import Transport
from normsvc.client.watch import WatchState
from normsvc.errors import InvalidArgument
from normsvc.running import RunningStats
from normsvc.wire.messages import stats_to_pb


def message(layer: str, version: int) -> pb.WatchLayerResponse:
    stats = RunningStats(mean=np.zeros(1), variance=np.ones(1), version=version)
    return pb.WatchLayerResponse(layer=layer, stats=stats_to_pb(stats))


def state(names, skip_initial=False) -> WatchState:
    return WatchState(names, skip_initial, Transport("t:1").attempts("WatchLayer", None))


def versions(s: WatchState) -> list:
    out = [(item.layer, item.stats.version) for item in s.pending]
    assert all(isinstance(item, LayerStats) for item in s.pending)
    s.pending.clear()
    return out


def test_ready_once_every_layer_sent_its_current_version():
    s = state(["a", "b", "a"])
    assert list(s.request().names) == ["a", "b", "a"] and not s.ready
    s.receive(message("a", 3))
    assert not s.ready
    s.receive(message("b", 0))
    assert s.ready and versions(s) == [("a", 3), ("b", 0)]


def test_skip_initial_drops_only_the_first_version_of_each_layer():
    s = state("a", skip_initial=True)
    s.receive(message("a", 5))
    assert s.ready and versions(s) == []
    s.receive(message("a", 6))
    assert versions(s) == [("a", 6)]


def test_versions_already_delivered_are_dropped_after_a_reconnect():
    s = state(["a"])
    for v in (1, 2, 3):
        s.receive(message("a", v))
    s.receive(message("a", 3))  # the reconnected stream starts with the current version
    s.receive(message("a", 2))
    s.receive(message("a", 4))
    assert versions(s) == [("a", 1), ("a", 2), ("a", 3), ("a", 4)]


def test_a_message_resets_the_reconnect_count():
    s = state(["a"])
    s.attempts.failed = 3
    s.receive(message("a", 0))
    assert s.attempts.failed == 0


def test_no_names_is_an_error():
    with pytest.raises(InvalidArgument, match="at least one layer"):
        state([])
