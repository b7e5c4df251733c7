"""Errors of the running-statistics store: one class per failure kind.

The gRPC server maps each class to one status code (in one place), so the
classes are distinct and a handler can tell them apart with ``isinstance``:

=====================  ============================  ==========================
class                  meaning                        gRPC status
=====================  ============================  ==========================
``InvalidArgument``    bad name, config, shape,       INVALID_ARGUMENT
                       NaN/Inf, negative value
``LayerNotFound``      no layer of that name          NOT_FOUND
``ConfigConflict``     name taken by another config   ALREADY_EXISTS
``FrozenLayer``        update of a frozen layer       FAILED_PRECONDITION
``NoStatistics``       inference with nothing to      FAILED_PRECONDITION
                       normalize with
``StoreUnavailable``   the backend cannot be reached  UNAVAILABLE
                       or stayed locked too long
=====================  ============================  ==========================

``FrozenLayer`` and ``NoStatistics`` share the base ``FailedPrecondition``.
Every error carries ``layer`` (the layer name, or None) and ``field`` (the
argument at fault, for BadRequest field violations, or None).
"""

from __future__ import annotations

__all__ = [
    "StoreError",
    "InvalidArgument",
    "LayerNotFound",
    "ConfigConflict",
    "FailedPrecondition",
    "FrozenLayer",
    "NoStatistics",
    "StoreUnavailable",
]


class StoreError(Exception):
    """Base class of every store error."""

    def __init__(self, message: str, *, layer: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.layer = layer
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidArgument(StoreError, ValueError):
    """An argument is malformed: name, config, moments (shape, NaN/Inf, sign), input tensor."""


class LayerNotFound(StoreError, LookupError):
    """No layer with this name exists."""


class ConfigConflict(StoreError):
    """``create_layer`` with a name that already holds a different config."""


class FailedPrecondition(StoreError):
    """The layer's state does not allow the operation."""


class FrozenLayer(FailedPrecondition):
    """An update was pushed to a frozen layer (Keras ``trainable=False``)."""


class NoStatistics(FailedPrecondition):
    """Inference asked of a cumulative layer that has not seen a sample yet."""


class StoreUnavailable(StoreError):
    """The backend failed (I/O error, lock held past the busy timeout, connection lost)."""
