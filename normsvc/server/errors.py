"""Exceptions -> gRPC status codes with google.rpc rich details: the one place.

Everything the service can fail with ends up in :func:`to_status`:

=================================  ===================  ==========================
exception                          status               details
=================================  ===================  ==========================
store ``InvalidArgument``,         INVALID_ARGUMENT     BadRequest (field
codec ``TensorError``,                                  violations), ErrorInfo
:class:`InvalidArgument`,
``ValueError``/``TypeError`` from
the ops
store ``LayerNotFound``            NOT_FOUND            ResourceInfo, ErrorInfo
store ``ConfigConflict``,          ALREADY_EXISTS       ResourceInfo, ErrorInfo
:class:`AlreadyExists`
store ``FailedPrecondition``       FAILED_PRECONDITION  PreconditionFailure,
(``FrozenLayer``,                                       ErrorInfo
``NoStatistics``)
codec ``TensorTooLarge``,          RESOURCE_EXHAUSTED   QuotaFailure, ErrorInfo
:class:`ResourceExhausted`
store ``StoreUnavailable``         UNAVAILABLE          ErrorInfo
:class:`Unauthenticated`           UNAUTHENTICATED      ErrorInfo
:class:`PermissionDenied`          PERMISSION_DENIED    ErrorInfo
:class:`DeadlineExceeded`          DEADLINE_EXCEEDED    ErrorInfo
:class:`Unavailable`               UNAVAILABLE          ErrorInfo
anything else                      INTERNAL             ErrorInfo (no internals)
=================================  ===================  ==========================

Every status carries an ``ErrorInfo`` with ``domain="normsvc"`` and a
``reason`` in UPPER_SNAKE_CASE (``LAYER_NOT_FOUND``, ``FROZEN_LAYER``, ...),
which is what a client maps back to an exception class; ``metadata["layer"]``
names the layer when there is one.
"""

from __future__ import annotations

import logging
import re

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..store import errors as store_errors
from ..tensor_codec import TensorError, TensorTooLarge

__all__ = [
    "DOMAIN",
    "ServiceError",
    "InvalidArgument",
    "AlreadyExists",
    "ResourceExhausted",
    "Unauthenticated",
    "PermissionDenied",
    "DeadlineExceeded",
    "Cancelled",
    "Unavailable",
    "to_status",
    "abort",
]

log = logging.getLogger("normsvc.server")

#: ErrorInfo.domain of every normsvc error.
DOMAIN = "normsvc"


class ServiceError(Exception):
    """An error raised by the server layer itself; subclasses fix the status code."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None, layer: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.layer = layer
        if reason is not None:
            self.reason = reason


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "LIMIT_EXCEEDED"


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


def _reason(exc: Exception) -> str:
    """``FrozenLayer`` -> ``FROZEN_LAYER``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).upper()


def _pack(status: status_pb2.Status, detail) -> None:
    any_msg = any_pb2.Any()
    any_msg.Pack(detail)
    status.details.append(any_msg)


# (store error class, status code), most specific first.
_STORE_CODES = (
    (store_errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (store_errors.LayerNotFound, grpc.StatusCode.NOT_FOUND),
    (store_errors.ConfigConflict, grpc.StatusCode.ALREADY_EXISTS),
    (store_errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (store_errors.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def _classify(exc: BaseException):
    """(code, reason, message, field, layer) for any exception."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.reason, exc.message, exc.field, exc.layer
    if isinstance(exc, store_errors.StoreError):
        for cls, code in _STORE_CODES:
            if isinstance(exc, cls):
                return code, _reason(exc), exc.message, exc.field, exc.layer
        return grpc.StatusCode.INTERNAL, _reason(exc), exc.message, exc.field, exc.layer
    if isinstance(exc, TensorTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "TENSOR_TOO_LARGE", str(exc), exc.field, None
    if isinstance(exc, TensorError):
        return grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TENSOR", str(exc), exc.field, None
    if isinstance(exc, (ValueError, TypeError)):
        # ops validate their arguments with ValueError/TypeError and say what was expected
        return grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", str(exc), None, None
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "OUT_OF_MEMORY", "the server ran out of memory", None, None
    log.exception("internal error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error ({type(exc).__name__}); see the server log", None, None


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status (code, message, rich details) that reports ``exc`` to the caller."""
    code, reason, message, field, layer = _classify(exc)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    meta = {"layer": layer} if layer else {}
    _pack(status, error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=meta))
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field or "", description=message)
        _pack(status, error_details_pb2.BadRequest(field_violations=[violation]))
    elif code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS) and layer:
        _pack(status, error_details_pb2.ResourceInfo(resource_type="normsvc.v1.Layer", resource_name=layer,
                                                     description=message))
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        violation = error_details_pb2.PreconditionFailure.Violation(type=reason, subject=layer or "",
                                                                    description=message)
        _pack(status, error_details_pb2.PreconditionFailure(violations=[violation]))
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        violation = error_details_pb2.QuotaFailure.Violation(subject=field or reason, description=message)
        _pack(status, error_details_pb2.QuotaFailure(violations=[violation]))
    return rpc_status.to_status(status)


def abort(context: grpc.ServicerContext, exc: BaseException):
    """Ends the call with the status for ``exc`` (raises, as ``context.abort`` does)."""
    context.abort_with_status(to_status(exc))
