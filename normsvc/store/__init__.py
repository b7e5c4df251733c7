"""The running-statistics store: named layers, their running statistics, and backends.

Open one with ``Store.open(url)``: ``memory://`` or ``sqlite:///path/to/stats.db``.
The facade and the backend interface are in :mod:`normsvc.store.base`,
configs in :mod:`normsvc.store.config`, errors in :mod:`normsvc.store.errors`.
"""

from ..running import RunningStats
from .base import Backend, Layer, Store
from .config import DEFAULT, LayerConfig
from .errors import (
    ConfigConflict,
    FailedPrecondition,
    FrozenLayer,
    InvalidArgument,
    LayerNotFound,
    NoStatistics,
    StoreError,
    StoreUnavailable,
)

__all__ = [
    "Store",
    "Layer",
    "LayerConfig",
    "RunningStats",
    "Backend",
    "DEFAULT",
    "StoreError",
    "InvalidArgument",
    "LayerNotFound",
    "ConfigConflict",
    "FailedPrecondition",
    "FrozenLayer",
    "NoStatistics",
    "StoreUnavailable",
]
