"""normsvc errors <-> gRPC status with google.rpc rich details: the one place, both directions.

The server reports any exception with :func:`to_status` (or :func:`abort`);
the client turns a failed call back into the same exception class with
:func:`from_rpc_error`.  Both read nothing but the classes' ``code`` and
``reason`` (see :mod:`normsvc.errors`).

Every status carries an ``ErrorInfo`` with ``domain="normsvc"``, the error's
``reason``, ``metadata["layer"]`` when a layer is concerned and
``metadata["field"]`` when a request field is at fault.  Messages longer than
:data:`MAX_MESSAGE` characters are cut (they travel three times in the
trailing metadata, which clients cap at 8 to 16 KiB).  By code it also
carries:

===================  ==========================================================
code                 details
===================  ==========================================================
INVALID_ARGUMENT     ``BadRequest``: one field violation whose ``field`` is the
                     path of the request field at fault (``updates[0].layer``);
                     none when no one field is (bytes that do not parse)
NOT_FOUND,           ``ResourceInfo`` (type ``normsvc.v1.Layer``, the name)
ALREADY_EXISTS       when a layer is concerned
FAILED_PRECONDITION  ``PreconditionFailure``: type = reason, subject = layer
RESOURCE_EXHAUSTED   ``QuotaFailure``: subject = the field or limit
anything else        ``ErrorInfo`` only
===================  ==========================================================

An exception that is not a :class:`~normsvc.errors.NormsvcError` is a bug:
the caller gets INTERNAL without internals and the server logs the traceback
(``MemoryError`` is RESOURCE_EXHAUSTED).  On the client, a reason that names
an error class gives that class; otherwise (a status from the transport, or
a reason finer than its class, such as ``DUPLICATE_RANK``) the status code
picks the class.  ``code`` of the raised exception is always the status's.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from .. import errors

__all__ = ["DOMAIN", "to_status", "abort", "from_rpc_error", "error_class"]

log = logging.getLogger("normsvc.server")

#: ErrorInfo.domain of every normsvc error.
DOMAIN = "normsvc"
#: Longest message sent (characters); the rest is cut and counted.
MAX_MESSAGE = 1024
_DETAILS_KEY = "grpc-status-details-bin"


def _classes(base: type):
    yield base
    for sub in base.__subclasses__():
        yield from _classes(sub)


#: ErrorInfo.reason -> class, for every class of the hierarchy.
_BY_REASON = {cls.reason: cls for cls in _classes(errors.NormsvcError)}
#: status code name -> the class a bare status of that code becomes.
_BY_CODE = {
    "INVALID_ARGUMENT": errors.InvalidArgument,
    "NOT_FOUND": errors.LayerNotFound,
    "ALREADY_EXISTS": errors.AlreadyExists,
    "FAILED_PRECONDITION": errors.FailedPrecondition,
    "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
    "UNAUTHENTICATED": errors.Unauthenticated,
    "PERMISSION_DENIED": errors.PermissionDenied,
    "DEADLINE_EXCEEDED": errors.DeadlineExceeded,
    "CANCELLED": errors.Cancelled,
    "UNAVAILABLE": errors.Unavailable,
}


def error_class(reason: str | None, code: str) -> type:
    """The class a status with this ErrorInfo reason and code name stands for."""
    return _BY_REASON.get(reason) or _BY_CODE.get(code, errors.Internal)


def _known(exc: BaseException) -> errors.NormsvcError:
    """``exc`` as a NormsvcError: itself, or what a bug or an exhausted allocator is reported as."""
    if isinstance(exc, errors.NormsvcError):
        return exc
    if isinstance(exc, MemoryError):
        return errors.ResourceExhausted("the server ran out of memory", reason="OUT_OF_MEMORY")
    log.exception("internal error", exc_info=exc)
    return errors.Internal(f"internal error ({type(exc).__name__}); see the server log")


def _cut(message: str) -> str:
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE} more characters)"


def _pack(status: status_pb2.Status, detail) -> None:
    any_msg = any_pb2.Any()
    any_msg.Pack(detail)
    status.details.append(any_msg)


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status (code, message, rich details) that reports ``exc`` to the caller."""
    err = _known(exc)
    code, reason, message, field, layer = err.code, err.reason, _cut(err.message), err.field, err.layer
    status = status_pb2.Status(code=getattr(code_pb2, code), message=message)
    meta = {key: value for key, value in (("layer", layer), ("field", field)) if value}
    _pack(status, error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=meta))
    if code == "INVALID_ARGUMENT":
        if field:  # a violation names a request field; no BadRequest when no one field is at fault
            violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
            _pack(status, error_details_pb2.BadRequest(field_violations=[violation]))
    elif code in ("NOT_FOUND", "ALREADY_EXISTS") and layer:
        _pack(status, error_details_pb2.ResourceInfo(resource_type="normsvc.v1.Layer", resource_name=layer,
                                                     description=message))
    elif code == "FAILED_PRECONDITION":
        violation = error_details_pb2.PreconditionFailure.Violation(type=reason, subject=layer or "",
                                                                    description=message)
        _pack(status, error_details_pb2.PreconditionFailure(violations=[violation]))
    elif code == "RESOURCE_EXHAUSTED":
        violation = error_details_pb2.QuotaFailure.Violation(subject=field or reason, description=message)
        _pack(status, error_details_pb2.QuotaFailure(violations=[violation]))
    return rpc_status.to_status(status)


def abort(context: grpc.ServicerContext, exc: BaseException):
    """Ends the call with the status for ``exc`` (raises, as ``context.abort`` does)."""
    context.abort_with_status(to_status(exc))


def _details(error) -> tuple[str | None, str | None, str | None]:
    """(reason, layer, field) from a failed call's rich details, where it has normsvc's."""
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
                    field = field or info.metadata.get("field") or None
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                field = next((v.field for v in bad.field_violations if v.field), None)
    return reason, layer, field


def from_rpc_error(error: grpc.RpcError, *, context: str = "") -> errors.NormsvcError:
    """The exception that stands for a failed call (sync or ``grpc.aio``).

    ``context`` prefixes transport-level messages (those without normsvc
    details), e.g. "cannot reach 10.0.0.5:50051".
    """
    code = error.code().name
    message = error.details() or code
    reason, layer, field = _details(error)
    if reason is None and context:
        message = f"{context}: {message}"
    exc = error_class(reason, code)(message, layer=layer, field=field, reason=reason)
    exc.code = code
    return exc
