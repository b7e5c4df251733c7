"""The running-statistics store: named layers, their running statistics, and backends.

Open one with ``Store.open(url)``: ``memory://`` or ``sqlite:///path/to/stats.db``.
One concept per module: :mod:`~normsvc.store.store` (Store),
:mod:`~normsvc.store.layer` (Layer), :mod:`~normsvc.config` (LayerConfig),
:mod:`~normsvc.store.validation` (checks at the edge), :mod:`~normsvc.store.mutations`
(what each call changes), :mod:`~normsvc.store.records` (the stored record and its
versioned codec), :mod:`~normsvc.store.backend` (the backend contract and URLs),
:mod:`~normsvc.store.memory` and :mod:`~normsvc.store.sqlite` (the backends),
:mod:`~normsvc.store.safetensors_io` (export and import).
"""

from ..running import RunningStats
from .backend import Backend
from ..config import DEFAULT, LayerConfig
from ..errors import (
    ConfigConflict,
    FailedPrecondition,
    FrozenLayer,
    InvalidArgument,
    LayerNotFound,
    NoStatistics,
    StoreError,
    StoreUnavailable,
)
from .layer import Layer
from .store import Store

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
