"""normsvc.wire.status: every error class <-> gRPC status with google.rpc details, both directions.

The round trips go through real gRPC servers on 127.0.0.1 (port 0): a tiny
generic service whose handlers raise what the test hands them, served once
behind normsvc's ErrorInterceptor and once calling ``abort`` directly.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from concurrent import futures

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from normsvc import errors
from normsvc.server.interceptors import ErrorInterceptor
from normsvc.wire.status import abort, from_rpc_error, to_status

LAYER = "enc/bn1"
FIELD = "updates[2].moments.mean"
MESSAGE = "updates[2].moments.mean has shape (3,): expected (4,), the layer's num_features"

#: every class of the hierarchy -> (status code name, ErrorInfo reason, the class the client gets back,
#: the detail besides ErrorInfo that the code promises), written out by hand from normsvc/errors.py
EXPECTED = {
    errors.NormsvcError: ("INTERNAL", "INTERNAL", errors.Internal, None),
    errors.InvalidArgument: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", errors.InvalidArgument, "BadRequest"),
    errors.InvalidType: ("INVALID_ARGUMENT", "INVALID_TYPE", errors.InvalidType, "BadRequest"),
    errors.InvalidTensor: ("INVALID_ARGUMENT", "INVALID_TENSOR", errors.InvalidTensor, "BadRequest"),
    errors.LayerNotFound: ("NOT_FOUND", "LAYER_NOT_FOUND", errors.LayerNotFound, "ResourceInfo"),
    errors.AlreadyExists: ("ALREADY_EXISTS", "ALREADY_EXISTS", errors.AlreadyExists, "ResourceInfo"),
    errors.ConfigConflict: ("ALREADY_EXISTS", "CONFIG_CONFLICT", errors.ConfigConflict, "ResourceInfo"),
    errors.FailedPrecondition: ("FAILED_PRECONDITION", "FAILED_PRECONDITION", errors.FailedPrecondition,
                                "PreconditionFailure"),
    errors.FrozenLayer: ("FAILED_PRECONDITION", "FROZEN_LAYER", errors.FrozenLayer, "PreconditionFailure"),
    errors.NoStatistics: ("FAILED_PRECONDITION", "NO_STATISTICS", errors.NoStatistics, "PreconditionFailure"),
    errors.ResourceExhausted: ("RESOURCE_EXHAUSTED", "LIMIT_EXCEEDED", errors.ResourceExhausted, "QuotaFailure"),
    errors.TensorTooLarge: ("RESOURCE_EXHAUSTED", "TENSOR_TOO_LARGE", errors.TensorTooLarge, "QuotaFailure"),
    errors.Unauthenticated: ("UNAUTHENTICATED", "UNAUTHENTICATED", errors.Unauthenticated, None),
    errors.PermissionDenied: ("PERMISSION_DENIED", "PERMISSION_DENIED", errors.PermissionDenied, None),
    errors.DeadlineExceeded: ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", errors.DeadlineExceeded, None),
    errors.Cancelled: ("CANCELLED", "CANCELLED", errors.Cancelled, None),
    errors.Unavailable: ("UNAVAILABLE", "UNAVAILABLE", errors.Unavailable, None),
    errors.StoreUnavailable: ("UNAVAILABLE", "STORE_UNAVAILABLE", errors.StoreUnavailable, None),
    errors.Internal: ("INTERNAL", "INTERNAL", errors.Internal, None),
}
CLASSES = sorted(EXPECTED, key=lambda cls: cls.__name__)
#: the codes whose status names the request field at fault (BadRequest)
FIELD_CODES = {"INVALID_ARGUMENT"}


def _hierarchy(base):
    yield base
    for sub in base.__subclasses__():
        yield from _hierarchy(sub)


def _details(status_proto: status_pb2.Status) -> dict:
    """{detail type name: unpacked message} of a google.rpc.Status; a type twice is an error."""
    out = {}
    for any_msg in status_proto.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.ResourceInfo,
                    error_details_pb2.PreconditionFailure, error_details_pb2.QuotaFailure):
            if any_msg.Is(cls.DESCRIPTOR):
                assert cls.__name__ not in out, f"two {cls.__name__} details"
                out[cls.__name__] = cls()
                any_msg.Unpack(out[cls.__name__])
        assert any_msg.type_url.rsplit(".", 1)[-1] in out, f"unexpected detail {any_msg.type_url}"
    return out


def _rich(status: grpc.Status) -> tuple[status_pb2.Status, dict]:
    """The google.rpc.Status a grpc.Status carries in its trailing metadata, and its details."""
    blobs = [value for key, value in status.trailing_metadata if key == "grpc-status-details-bin"]
    assert len(blobs) == 1, status.trailing_metadata
    proto = status_pb2.Status.FromString(blobs[0])
    return proto, _details(proto)


# --- to_status ---------------------------------------------------------------

def test_the_table_covers_every_class_of_the_hierarchy():
    walked = {cls for cls in _hierarchy(errors.NormsvcError) if cls.__module__.startswith("normsvc")}
    assert walked == set(EXPECTED)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("layer, field", [(LAYER, FIELD), (None, None)], ids=["layer+field", "bare"])
def test_to_status_gives_the_code_error_info_and_the_detail_of_the_code(cls, layer, field):
    code, reason, _, detail = EXPECTED[cls]
    status = to_status(cls(MESSAGE, layer=layer, field=field))
    assert status.code == grpc.StatusCode[code]
    assert status.details == MESSAGE
    proto, details = _rich(status)
    assert proto.code == getattr(code_pb2, code) and proto.message == MESSAGE
    info = details.pop("ErrorInfo")
    assert (info.domain, info.reason) == ("normsvc", reason)
    # the layer and the field at fault, for every code (BadRequest only exists for INVALID_ARGUMENT)
    assert dict(info.metadata) == ({"layer": LAYER, "field": FIELD} if layer else {})
    if detail == "BadRequest":
        if field is None:  # no one field at fault: no BadRequest at all
            assert details == {}
        else:
            (violation,) = details.pop("BadRequest").field_violations
            assert (violation.field, violation.description) == (FIELD, MESSAGE)
    elif detail == "ResourceInfo":
        if layer is None:
            assert details == {}
        else:
            resource = details.pop("ResourceInfo")
            assert (resource.resource_type, resource.resource_name) == ("normsvc.v1.Layer", LAYER)
    elif detail == "PreconditionFailure":
        (violation,) = details.pop("PreconditionFailure").violations
        assert (violation.type, violation.subject, violation.description) == (reason, layer or "", MESSAGE)
    elif detail == "QuotaFailure":
        (violation,) = details.pop("QuotaFailure").violations
        assert (violation.subject, violation.description) == (field or reason, MESSAGE)
    assert details == {}, f"{cls.__name__}: details beyond ErrorInfo and {detail}: {sorted(details)}"


@pytest.mark.parametrize("exc, code, reason", [
    (errors.AlreadyExists("rank 1 joined step 3 twice", field="rank", reason="DUPLICATE_RANK"),
     "ALREADY_EXISTS", "DUPLICATE_RANK"),
    (errors.ResourceExhausted("the store holds 4 layers", field="name", reason="TOO_MANY_LAYERS"),
     "RESOURCE_EXHAUSTED", "TOO_MANY_LAYERS"),
    (errors.InvalidArgument("not a valid request", reason="MALFORMED_REQUEST"), "INVALID_ARGUMENT",
     "MALFORMED_REQUEST"),
])
def test_an_instance_reason_travels_in_error_info(exc, code, reason):
    status = to_status(exc)
    assert status.code == grpc.StatusCode[code]
    assert _rich(status)[1]["ErrorInfo"].reason == reason


def test_a_finer_failed_precondition_reason_is_the_violation_type():
    _, details = _rich(to_status(errors.FailedPrecondition("stored format 9", layer=LAYER, reason="FORMAT_TOO_NEW")))
    (violation,) = details["PreconditionFailure"].violations
    assert (violation.type, violation.subject) == ("FORMAT_TOO_NEW", LAYER)


def test_an_exception_that_is_not_a_normsvc_error_is_internal_without_internals(caplog):
    secret = KeyError("/var/lib/normsvc/secret.db row 17")
    with caplog.at_level(logging.ERROR, logger="normsvc.server"):
        status = to_status(secret)
    assert status.code == grpc.StatusCode.INTERNAL
    assert "secret" not in status.details and "row 17" not in status.details
    assert "KeyError" in status.details and "server log" in status.details
    _, details = _rich(status)
    assert details["ErrorInfo"].reason == "INTERNAL" and set(details) == {"ErrorInfo"}
    logged = [r for r in caplog.records if r.name == "normsvc.server" and r.exc_info]
    assert [r.exc_info[1] for r in logged] == [secret]  # the traceback goes to the server's log


def test_memory_error_is_resource_exhausted():
    status = to_status(MemoryError())
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory" in status.details
    _, details = _rich(status)
    assert set(details) == {"ErrorInfo", "QuotaFailure"}


# --- through a real server -----------------------------------------------------

class _Thrower:
    """A real gRPC server whose methods end each call with the exception registered under its request.

    ``/t.Errors/Raise`` raises it (to be reported by an interceptor); ``/t.Errors/Abort``
    calls :func:`normsvc.wire.status.abort`; ``/t.Errors/Plain`` calls ``context.abort``
    with (code, message) and no rich details; ``/t.Errors/Status`` ends it with a
    google.rpc.Status built by the test.
    """

    def __init__(self, interceptors=()):
        self._pending, self._ids, self._lock = {}, itertools.count(), threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=list(interceptors))
        methods = {
            "Raise": self._raise,
            "Abort": lambda request, context: abort(context, self._take(request)),
            "Plain": lambda request, context: context.abort(*self._take(request)),
            "Status": lambda request, context: context.abort_with_status(rpc_status.to_status(self._take(request))),
        }
        handlers = {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in methods.items()}
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Errors", handlers)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def _take(self, request: bytes):
        with self._lock:
            return self._pending.pop(request)

    def _raise(self, request, context):
        raise self._take(request)

    def fail(self, method: str, what) -> grpc.RpcError:
        """The RpcError of a call to ``method`` that ends with ``what``."""
        key = str(next(self._ids)).encode()
        with self._lock:
            self._pending[key] = what
        with pytest.raises(grpc.RpcError) as info:
            self.channel.unary_unary(f"/t.Errors/{method}")(key, timeout=10)
        return info.value

    def close(self):
        self.channel.close()
        self.server.stop(0)


@pytest.fixture(scope="module")
def servers():
    """{"interceptor": a server behind ErrorInterceptor, "abort": one whose handlers call abort}."""
    made = {"interceptor": _Thrower([ErrorInterceptor()]), "abort": _Thrower()}
    yield made
    for server in made.values():
        server.close()


def _fail(servers, route: str, exc) -> errors.NormsvcError:
    return from_rpc_error(servers[route].fail("Raise" if route == "interceptor" else "Abort", exc))


@pytest.mark.parametrize("route", ["interceptor", "abort"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_class_comes_back_from_a_real_server(servers, route, cls):
    code, reason, back, _ = EXPECTED[cls]
    field = FIELD if code in FIELD_CODES else None
    got = _fail(servers, route, cls(MESSAGE, layer=LAYER, field=field))
    assert type(got) is back
    assert (got.message, str(got), got.layer, got.field, got.code, got.reason) == (
        MESSAGE, MESSAGE, LAYER, field, code, reason)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_without_a_layer_or_field_none_comes_back(servers, cls):
    got = _fail(servers, "interceptor", cls(MESSAGE))
    assert type(got) is EXPECTED[cls][2] and (got.layer, got.field) == (None, None)


@pytest.mark.parametrize("cls", [errors.ResourceExhausted, errors.TensorTooLarge], ids=lambda cls: cls.__name__)
def test_the_field_of_a_resource_exhausted_error_comes_back(servers, cls):
    got = _fail(servers, "interceptor", cls("x has 20000 elements: expected at most 10000", field="x"))
    assert type(got) is cls and got.field == "x"


def test_a_long_message_still_reaches_the_client_as_its_error(servers):
    message = "request_id='" + "r" * 20_000 + "': expected None or a string of 1 to 256 characters"
    got = _fail(servers, "interceptor", errors.InvalidArgument(message, field="request_id"))
    assert type(got) is errors.InvalidArgument
    assert (got.code, got.field) == ("INVALID_ARGUMENT", "request_id")


def test_a_finer_reason_comes_back_as_the_class_of_its_code(servers):
    got = _fail(servers, "interceptor",
                errors.AlreadyExists("rank 1 joined step 3 twice", layer=LAYER, reason="DUPLICATE_RANK"))
    assert type(got) is errors.AlreadyExists
    assert (got.reason, got.code, got.layer) == ("DUPLICATE_RANK", "ALREADY_EXISTS", LAYER)
    got = _fail(servers, "abort", errors.ResourceExhausted("the store holds 4 layers", reason="TOO_MANY_LAYERS"))
    assert type(got) is errors.ResourceExhausted and got.reason == "TOO_MANY_LAYERS"


def test_a_bug_in_a_handler_is_internal_without_internals_and_logged(servers, caplog):
    with caplog.at_level(logging.ERROR, logger="normsvc.server"):
        got = _fail(servers, "interceptor", RuntimeError("password=hunter2 in /etc/normsvc.conf"))
    assert type(got) is errors.Internal and got.code == "INTERNAL"
    assert "hunter2" not in got.message and "/etc" not in got.message
    assert "RuntimeError" in got.message
    assert any("hunter2" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_memory_error_in_a_handler_is_resource_exhausted(servers):
    got = _fail(servers, "abort", MemoryError())
    assert type(got) is errors.ResourceExhausted
    assert (got.code, got.reason) == ("RESOURCE_EXHAUSTED", "OUT_OF_MEMORY")


# --- statuses without normsvc details ----------------------------------------------

#: status code -> the class a bare status of that code becomes (hand-written)
BY_CODE = {
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
    "INTERNAL": errors.Internal,
    "UNKNOWN": errors.Internal,
    "UNIMPLEMENTED": errors.Internal,
    "DATA_LOSS": errors.Internal,
    "ABORTED": errors.Internal,
    "OUT_OF_RANGE": errors.Internal,
}
#: the class each bare code picks keeps its own reason
CLASS_REASON = {cls: reason for cls, (_, reason, _, _) in EXPECTED.items()}


@pytest.mark.parametrize("code", sorted(BY_CODE))
def test_a_status_without_normsvc_details_falls_back_by_code(servers, code):
    got = from_rpc_error(servers["abort"].fail("Plain", (grpc.StatusCode[code], "upstream said no")))
    assert type(got) is BY_CODE[code]
    assert (got.message, got.code, got.layer, got.field) == ("upstream said no", code, None, None)
    assert got.reason == CLASS_REASON[BY_CODE[code]]


def test_a_foreign_error_info_is_not_read_as_normsvc_s(servers):
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad input")
    status.details.add().Pack(error_details_pb2.ErrorInfo(domain="example.com", reason="FROZEN_LAYER",
                                                          metadata={"layer": LAYER}))
    got = from_rpc_error(servers["abort"].fail("Status", status))
    assert type(got) is errors.InvalidArgument
    assert (got.reason, got.layer, got.message) == ("INVALID_ARGUMENT", None, "bad input")


def test_a_transport_failure_is_unavailable_with_the_context_in_its_message():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/t.Errors/Raise")(b"", timeout=5)
    got = from_rpc_error(info.value, context=f"cannot reach 127.0.0.1:{port}")
    assert type(got) is errors.Unavailable and got.code == "UNAVAILABLE"
    assert got.message.startswith(f"cannot reach 127.0.0.1:{port}: ")
