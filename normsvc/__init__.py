"""normsvc: streaming statistics for normalization layers.

Numba kernels for batch, layer, instance, group and RMS normalization
(:mod:`normsvc.ops`), the :class:`Moments` value type they reduce to, a
:class:`Store` of running statistics per named layer, and :class:`Client`,
the same interface over the gRPC service (``normsvc serve``).
"""

from . import errors, ops
from .errors import (
    AlreadyExists,
    Cancelled,
    ConfigConflict,
    DeadlineExceeded,
    FailedPrecondition,
    FrozenLayer,
    Internal,
    InvalidArgument,
    InvalidTensor,
    InvalidType,
    LayerNotFound,
    NormsvcError,
    NoStatistics,
    PermissionDenied,
    ResourceExhausted,
    StoreError,
    StoreUnavailable,
    TensorTooLarge,
    Unauthenticated,
    Unavailable,
)
from .moments import Moments
from .ops import (
    batch_norm,
    cuda_available,
    group_norm,
    instance_norm,
    layer_norm,
    moments,
    normalize,
    rms_norm,
)
from .running import RunningStats
from .store import Layer, Store

__all__ = [
    "Moments",
    "ops",
    "moments",
    "normalize",
    "batch_norm",
    "layer_norm",
    "instance_norm",
    "group_norm",
    "rms_norm",
    "cuda_available",
    "Store",
    "Layer",
    "RunningStats",
    "errors",
    "NormsvcError",
    "StoreError",
    "InvalidArgument",
    "InvalidType",
    "InvalidTensor",
    "LayerNotFound",
    "AlreadyExists",
    "ConfigConflict",
    "FailedPrecondition",
    "FrozenLayer",
    "NoStatistics",
    "ResourceExhausted",
    "TensorTooLarge",
    "Unauthenticated",
    "PermissionDenied",
    "DeadlineExceeded",
    "Cancelled",
    "Unavailable",
    "StoreUnavailable",
    "Internal",
    "Client",
    "AsyncClient",
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
