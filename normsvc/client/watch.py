"""What a watch knows, for both drivers: which versions it delivered, which it still holds.

:class:`~normsvc.client.Watch` (blocking) and
:class:`~normsvc.client.AsyncWatch` (asyncio) only read WatchLayer streams
and reconnect; every decision about the messages is made here, without I/O.
"""

from __future__ import annotations

import collections

from .._proto import normsvc_pb2 as pb
from ..errors import InvalidArgument
from ..wire.messages import stats_from_pb
from .operations import layer_names
from .results import LayerStats
from .transport import Attempts

__all__ = ["WatchState"]


class WatchState:
    """The bookkeeping of one watch.

    The stream is always asked for the layers' current versions first: once
    they arrived the server has subscribed, so ``watch()`` returns only then
    (:attr:`ready`) and no later version can be missed (with ``skip_initial``
    they are dropped here).  After a reconnect the current versions fill the
    gap, and versions already delivered are dropped.

    ``attempts`` are the reconnects (the watch's ``timeout`` is their
    deadline); a message that arrives makes the next failure the first again.
    """

    def __init__(self, names, skip_initial: bool, attempts: Attempts):
        self.names = layer_names(names)
        if not self.names:
            raise InvalidArgument("watch needs at least one layer name", field="names")
        self.skip_initial = skip_initial
        self.attempts = attempts
        self.last: dict[str, int] = {}
        #: Items received but not yet delivered, oldest first.
        self.pending: collections.deque[LayerStats] = collections.deque()

    def request(self) -> pb.WatchLayerRequest:
        return pb.WatchLayerRequest(names=self.names)

    @property
    def ready(self) -> bool:
        """Whether every layer's initial version arrived (the subscription is live)."""
        return len(self.last) == len(set(self.names))

    def receive(self, message: pb.WatchLayerResponse) -> None:
        """Take one message of the stream: a new version goes to :attr:`pending`."""
        self.attempts.progressed()
        first = message.layer not in self.last
        if message.stats.version <= self.last.get(message.layer, -1):
            return
        self.last[message.layer] = message.stats.version
        if not (first and self.skip_initial):
            self.pending.append(LayerStats(message.layer, stats_from_pb(message.stats)))
