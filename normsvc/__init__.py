"""normsvc: streaming statistics for normalization layers.

Numba kernels for batch, layer, instance, group and RMS normalization
(:mod:`normsvc.ops`), the :class:`Moments` value type they reduce to, a
:class:`Store` of running statistics per named layer, and :class:`Client`,
the same interface over the gRPC service (``normsvc serve``).
"""

from . import errors, ops
from .config import LayerConfig
from .errors import *  # noqa: F403 - the whole hierarchy is public (errors.__all__)
from .moments import Moments
from .ops import *  # noqa: F403 - the stateless ops (ops.__all__)
from .running import RunningStats
from .store import Layer, Store

__all__ = [
    "Moments",
    "RunningStats",
    "LayerConfig",
    "ops",
    *ops.__all__,
    "Store",
    "Layer",
    "Client",
    "AsyncClient",
    "errors",
    *errors.__all__,
]
__version__ = "0.1.0"

_LAZY = {"Client": "client", "AsyncClient": "client"}


def __getattr__(name):
    # The gRPC clients import grpc on first use, so `import normsvc` stays cheap.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
