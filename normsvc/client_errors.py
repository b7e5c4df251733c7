"""gRPC status -> the exception the store would have raised: the client's one place.

This is the inverse of :mod:`normsvc.server.errors`.  The server puts an
``ErrorInfo`` (domain ``normsvc``) on every status whose ``reason`` is the
store error's class name in UPPER_SNAKE_CASE (``FrozenLayer`` ->
``FROZEN_LAYER``), ``metadata["layer"]`` the layer, and a ``BadRequest``
field violation for bad arguments.  So a reason that names a class of
:mod:`normsvc.store.errors` comes back as that class, and user code catches
the same exceptions whether it talks to a ``Store`` or a ``Client``.

Statuses that no store error stands for (a status without normsvc details,
e.g. from the transport) fall back by status code:

===================  =========================================================
status               exception
===================  =========================================================
INVALID_ARGUMENT     ``store.errors.InvalidArgument`` (a ValueError)
NOT_FOUND            ``store.errors.LayerNotFound`` (a LookupError)
FAILED_PRECONDITION  ``store.errors.FailedPrecondition``
UNAVAILABLE          ``store.errors.StoreUnavailable`` (after the retries)
ALREADY_EXISTS       :class:`AlreadyExists` (e.g. a rank that joined twice)
RESOURCE_EXHAUSTED   :class:`ResourceExhausted`
UNAUTHENTICATED      :class:`Unauthenticated` (a PermissionError)
PERMISSION_DENIED    :class:`PermissionDenied` (a PermissionError)
DEADLINE_EXCEEDED    :class:`DeadlineExceeded` (a TimeoutError)
CANCELLED            :class:`Cancelled`
anything else        :class:`RemoteError`
===================  =========================================================

Every exception raised from a status carries ``code`` (the
``grpc.StatusCode``), ``layer`` and ``field``; all are ``StoreError``\\ s.
"""

from __future__ import annotations

import re

import grpc
from google.rpc import error_details_pb2, status_pb2

from .store import errors as store_errors

__all__ = [
    "RemoteError",
    "AlreadyExists",
    "ResourceExhausted",
    "Unauthenticated",
    "PermissionDenied",
    "DeadlineExceeded",
    "Cancelled",
    "from_rpc_error",
]

#: ErrorInfo.domain of normsvc's statuses (the server's ``errors.DOMAIN``).
DOMAIN = "normsvc"
_DETAILS_KEY = "grpc-status-details-bin"


class RemoteError(store_errors.StoreError):
    """A status the store has no exception for; ``code`` is its ``grpc.StatusCode``."""


class AlreadyExists(RemoteError):
    """ALREADY_EXISTS other than a config clash (e.g. an AllReduceMoments rank that joined twice)."""


class ResourceExhausted(RemoteError):
    """A request over a server limit (tensor size, message size, memory)."""


class Unauthenticated(RemoteError, PermissionError):
    """No token, or one the server does not know."""


class PermissionDenied(RemoteError, PermissionError):
    """The token's role or layer prefixes do not allow the call."""


class DeadlineExceeded(RemoteError, TimeoutError):
    """The call's deadline passed (or, for AllReduceMoments, a rank never came)."""


class Cancelled(RemoteError):
    """The call was cancelled."""


def _snake(cls: type) -> str:
    # the server's rule for ErrorInfo.reason (normsvc.server.errors._reason)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper()


#: ErrorInfo.reason -> store error class, derived from the classes themselves.
_BY_REASON = {
    _snake(cls): cls
    for cls in (getattr(store_errors, name) for name in store_errors.__all__)
    if cls is not store_errors.StoreError
}

_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: store_errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: store_errors.LayerNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: store_errors.FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: store_errors.StoreUnavailable,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def _details(error) -> tuple[str | None, str | None, str | None]:
    """(reason, layer, field) from the status's rich details, where it has them."""
    reason = layer = field = None
    for key, value in error.trailing_metadata() or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == DOMAIN:
                    reason = info.reason
                    layer = info.metadata.get("layer") or None
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                field = next((v.field for v in bad.field_violations if v.field), None)
    return reason, layer, field


def from_rpc_error(error: grpc.RpcError, *, context: str = "") -> store_errors.StoreError:
    """The exception that stands for a failed call (sync or ``grpc.aio``).

    ``context`` prefixes transport-level messages (those without normsvc
    details), e.g. "cannot reach 10.0.0.5:50051".
    """
    code = error.code()
    message = error.details() or code.name
    reason, layer, field = _details(error)
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code, RemoteError)
    if reason is None and context:
        message = f"{context}: {message}"
    exc = cls(message, layer=layer, field=field)
    exc.code = code
    return exc
