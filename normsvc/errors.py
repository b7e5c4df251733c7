"""Every error normsvc raises: one hierarchy for the ops, the store, the server and the client.

Each class knows the gRPC status code it stands for (``code``, the name of a
``grpc.StatusCode``) and the ``reason`` that the server puts in the status's
``google.rpc.ErrorInfo`` (domain ``normsvc``).  :mod:`normsvc.wire.status`
maps both directions with nothing but these two attributes, so a caller
catches the same classes whether it talks to a :class:`~normsvc.Store` in
process or to a :class:`~normsvc.Client` over the network:

======================  ===================  ====================================
class                   code                 raised when
======================  ===================  ====================================
``InvalidArgument``     INVALID_ARGUMENT     a bad name, config, shape, dtype,
 ``InvalidType``                             NaN/Inf, negative value, or a value
 ``InvalidTensor``                           of the wrong type; a tensor message
                                             that describes no valid array
``LayerNotFound``       NOT_FOUND            no layer of that name
``AlreadyExists``       ALREADY_EXISTS       a rank that joined a step twice
 ``ConfigConflict``                          a name taken by another config
``FailedPrecondition``  FAILED_PRECONDITION  the layer's state forbids the call
 ``FrozenLayer``                             an update of a frozen layer
 ``NoStatistics``                            inference with nothing to use yet
``ResourceExhausted``   RESOURCE_EXHAUSTED   over a configured limit
 ``TensorTooLarge``                          a tensor over the element limit
``Unauthenticated``     UNAUTHENTICATED      no token, or an unknown one
``PermissionDenied``    PERMISSION_DENIED    the token does not allow the call
``DeadlineExceeded``    DEADLINE_EXCEEDED    the deadline passed (or a rank
                                             never came to an AllReduceMoments)
``Cancelled``           CANCELLED            the call was cancelled
``Unavailable``         UNAVAILABLE          the server cannot be reached
 ``StoreUnavailable``                        the backend failed or stayed locked
``Internal``            INTERNAL             a bug: see the server's log
======================  ===================  ====================================

Every error carries ``message`` (what was wrong and what was expected),
``layer`` (the layer's name, or None) and ``field`` (the path of the argument
or request field at fault, e.g. ``updates[2].moments.mean``, or None).  An
instance may name a finer ``reason`` than its class (``DUPLICATE_RANK``).
The classes also derive from the matching built-in exception where one
exists (``ValueError``, ``TypeError``, ``LookupError``, ``PermissionError``,
``TimeoutError``), so generic handlers keep working.
"""

from __future__ import annotations

__all__ = [
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
]


class NormsvcError(Exception):
    """Base class of every normsvc error.

    Parameters
    ----------
    message : str
        What was wrong and what was expected.
    layer : str, optional
        The layer concerned.
    field : str, optional
        The argument (or request field) at fault.
    reason : str, optional
        A finer ErrorInfo reason than the class's own.
    """

    #: name of the grpc.StatusCode this error travels as
    code = "INTERNAL"
    #: google.rpc.ErrorInfo.reason (UPPER_SNAKE_CASE), unique per class
    reason = "INTERNAL"

    def __init__(self, message: str, *, layer: str | None = None, field: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.layer = layer
        self.field = field
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return self.message

    #: what was wrong and what was expected, without the field's path, when the message is
    #: ``"<field>: <description>"`` (tensor errors; see :meth:`moved`)
    description = None

    def moved(self, field: str) -> None:
        """Report the same fault at another field path (a stream's header instead of ``x``)."""
        self.field = field
        if self.description is not None:
            self.message = f"{field}: {self.description}"


#: The name this base had when only the store raised it.
StoreError = NormsvcError


class InvalidArgument(NormsvcError, ValueError):
    """An argument is malformed: name, config, moments (shape, NaN/Inf, sign), input tensor."""

    code = reason = "INVALID_ARGUMENT"


class InvalidType(InvalidArgument, TypeError):
    """An argument of the wrong type (a string for a number, a list for an array)."""

    reason = "INVALID_TYPE"


class InvalidTensor(InvalidArgument):
    """A tensor or moments message that does not describe a valid array.

    Built by :func:`normsvc.wire.tensors.tensor_error`: its message is
    ``"<field>: <description>"``.
    """

    reason = "INVALID_TENSOR"


class LayerNotFound(NormsvcError, LookupError):
    """No layer with this name exists."""

    code = "NOT_FOUND"
    reason = "LAYER_NOT_FOUND"


class AlreadyExists(NormsvcError):
    """Something that may exist once already does (e.g. a rank of an AllReduceMoments step)."""

    code = reason = "ALREADY_EXISTS"


class ConfigConflict(AlreadyExists):
    """``create_layer`` with a name that already holds a different config."""

    reason = "CONFIG_CONFLICT"


class FailedPrecondition(NormsvcError):
    """The layer's state does not allow the operation."""

    code = reason = "FAILED_PRECONDITION"


class FrozenLayer(FailedPrecondition):
    """An update was pushed to a frozen layer (Keras ``trainable=False``)."""

    reason = "FROZEN_LAYER"


class NoStatistics(FailedPrecondition):
    """Inference asked of a cumulative layer that has not seen a sample yet."""

    reason = "NO_STATISTICS"


class ResourceExhausted(NormsvcError):
    """A request over a configured limit (message size, memory, open streams)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "LIMIT_EXCEEDED"


class TensorTooLarge(ResourceExhausted, ValueError):
    """A tensor with more elements than the receiver accepts."""

    reason = "TENSOR_TOO_LARGE"


class Unauthenticated(NormsvcError, PermissionError):
    """No token, or one the server does not know."""

    code = reason = "UNAUTHENTICATED"


class PermissionDenied(NormsvcError, PermissionError):
    """The token's role or layer prefixes do not allow the call."""

    code = reason = "PERMISSION_DENIED"


class DeadlineExceeded(NormsvcError, TimeoutError):
    """The call's deadline passed (or, for AllReduceMoments, a rank never came)."""

    code = reason = "DEADLINE_EXCEEDED"


class Cancelled(NormsvcError):
    """The call was cancelled."""

    code = reason = "CANCELLED"


class Unavailable(NormsvcError):
    """The server cannot be reached (after the client's retries)."""

    code = reason = "UNAVAILABLE"


class StoreUnavailable(Unavailable):
    """The backend failed (I/O error, lock held past the busy timeout, connection lost)."""

    reason = "STORE_UNAVAILABLE"


class Internal(NormsvcError):
    """A failure that no other class describes: a bug, reported without internals."""
