"""The values a client returns besides the Store's (RunningStats, Moments, LayerConfig, LayerInfo)."""

from __future__ import annotations

from typing import NamedTuple

from ..config import LayerInfo
from ..running import RunningStats

__all__ = ["LayerInfo", "LayerStats", "AllReduceResult"]


class LayerStats(NamedTuple):
    """One new version of a watched layer (:meth:`Client.watch <normsvc.client.Client.watch>`)."""

    layer: str
    stats: RunningStats


class AllReduceResult(NamedTuple):
    """What :meth:`Client.allreduce <normsvc.client.Client.allreduce>` returns.

    ``moments``: layer -> the merged moments of every rank (the same on all
    ranks); ``stats``: layer -> running statistics after the step's update
    (empty with ``update_stats=False``).
    """

    moments: dict
    stats: dict
