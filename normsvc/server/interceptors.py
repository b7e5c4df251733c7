"""Server interceptors: metrics (outermost), errors, stream limits, auth (innermost).

* :class:`MetricsInterceptor` counts every call by method and final status
  code and times it (streams: until their last message).
* :class:`ErrorInterceptor` turns any exception from the layers below into a
  status with rich details, through :func:`normsvc.wire.status.to_status` (the one place
  that maps exceptions to codes); a request that did not parse
  (:mod:`.decoding`) becomes INVALID_ARGUMENT here, before auth sees it.
* :class:`StreamLimitInterceptor` admits the calls that hold a thread while
  they last (streams, ranks waiting in AllReduceMoments) within
  ``max_streams`` and ``max_streams_per_token`` (:class:`.limits.StreamSlots`),
  before anything of the call is read, and refuses the others at once.
* :class:`AuthInterceptor` checks the bearer token and the token's role and
  layer prefixes against the request (:mod:`.auth`); health and reflection
  stay open.

Each wraps the method handler's behaviour, so it sees the deserialized
request; NormalizeStream is authorized on its first (header) message.  The
wrapped handlers are built once per method (:class:`_Cached`): grpc asks the
interceptors on every call, and rebuilding closures and label lookups each
time cost the server measurable CPU per request.
"""

from __future__ import annotations

import time

import grpc

from . import auth
from ..errors import Unauthenticated
from ..wire.status import abort
from .decoding import checked, raise_if_undecodable

__all__ = ["MetricsInterceptor", "ErrorInterceptor", "StreamLimitInterceptor", "AuthInterceptor", "wrap_handler",
           "WAITING_METHODS"]


def wrap_handler(handler, decorate):
    """A copy of ``handler`` whose behaviour is ``decorate(behaviour, response_streaming)``.

    A non-blocking behaviour (grpc.health.v1's Watch: it answers through a
    callback and returns at once) is left as it is: it holds no thread, and
    a wrapper would make it hold one for as long as the watch lasts.
    """
    if handler is None:
        return None
    if any(getattr(getattr(handler, attr), "experimental_non_blocking", False)
           for attr in ("unary_stream", "stream_stream")):
        return handler
    for attr, factory, streaming in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    ):
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return factory(
                decorate(behaviour, streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _short(method: str) -> str:
    return auth.method_name(method) or method


class _Cached(grpc.ServerInterceptor):
    """Builds each method's wrapped handler once, not on every call.

    grpc calls ``intercept_service`` per call, and ``continuation`` answers
    the same handler object for a method every time (the servicer's, or the
    next interceptor's cached wrapper), so the wrapper is reused while that
    holds.  Unknown methods (handler None) are not cached.
    """

    def __init__(self):
        self._wrapped = {}  # method -> (inner handler, wrapped handler)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler, method: str):  # pragma: no cover - defined by subclasses
        raise NotImplementedError


class MetricsInterceptor(_Cached):
    def __init__(self, metrics):
        super().__init__()
        self.metrics = metrics

    def _wrap(self, handler, full_method: str):
        method = _short(full_method)
        m = self.metrics
        # the label children of this method, looked up once (labels() validates and locks)
        latency, in_flight = m.latency.labels(method), m.in_flight.labels(method)
        requests = {}

        def record(context, start, failed):
            code = context.code()
            if code is None and not context.is_active():
                code = grpc.StatusCode.CANCELLED  # the caller went away (a stream it cancelled, ended or not)
            elif code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            counter = requests.get(code)
            if counter is None:
                counter = requests[code] = m.requests.labels(method, code.name)
            counter.inc()
            latency.observe(time.perf_counter() - start)
            in_flight.dec()

        def decorate(behaviour, streaming):
            if streaming:
                def wrapper(request, context):
                    start, failed = time.perf_counter(), True
                    in_flight.inc()
                    try:
                        yield from behaviour(request, context)
                        failed = False
                    finally:
                        record(context, start, failed)
            else:
                def wrapper(request, context):
                    start, failed = time.perf_counter(), True
                    in_flight.inc()
                    try:
                        response = behaviour(request, context)
                        failed = False
                        return response
                    finally:
                        record(context, start, failed)
            return wrapper

        return wrap_handler(handler, decorate)


def _aborted(context) -> bool:
    """Whether the call already carries a failure status (``context.abort`` was called)."""
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


def _parsed(request):
    raise_if_undecodable(request)
    return request


class ErrorInterceptor(_Cached):
    def _wrap(self, handler, method: str):
        prepare = checked if handler.request_streaming else _parsed

        def decorate(behaviour, streaming):
            if streaming:
                def wrapper(request, context):
                    try:
                        yield from behaviour(prepare(request), context)
                    except GeneratorExit:
                        raise
                    except Exception as exc:
                        if _aborted(context) or not context.is_active():  # no one left to tell (cancelled)
                            raise
                        abort(context, exc)
            else:
                def wrapper(request, context):
                    try:
                        return behaviour(prepare(request), context)
                    except Exception as exc:
                        if _aborted(context):
                            raise
                        abort(context, exc)
            return wrapper

        return wrap_handler(handler, decorate)


#: Unary methods whose calls wait for other callers, holding their thread meanwhile.
WAITING_METHODS = (auth.SERVICE + "AllReduceMoments",)


class StreamLimitInterceptor(_Cached):
    """Streams of every service (NormService's, reflection's) and :data:`WAITING_METHODS` take a
    slot of ``slots`` (:class:`.limits.StreamSlots`) for as long as they last; other calls pass.

    A call counts against its token (the name of its entry in the tokens file) when it
    carries a valid one; calls without one, and every call of a server without tokens,
    count together.  Placed outside :class:`AuthInterceptor`, so that a NormalizeStream
    takes its slot before its header is read.
    """

    def __init__(self, slots, tokens: auth.TokenTable | None = None):
        super().__init__()
        self.slots = slots
        self.tokens = tokens

    def _token(self, context):
        """The name of the call's valid token, or None."""
        if self.tokens is None:
            return None
        try:
            token = auth.bearer_token(context.invocation_metadata())
        except Unauthenticated:
            return None
        principal = self.tokens.lookup(token) if token is not None else None
        return principal.name if principal is not None else None

    def _wrap(self, handler, full_method: str):
        if not (handler.request_streaming or handler.response_streaming or full_method in WAITING_METHODS):
            return handler
        method, slots = _short(full_method), self.slots

        def decorate(behaviour, streaming):
            if streaming:
                def wrapper(request, context):
                    with slots.held(self._token(context), method):
                        yield from behaviour(request, context)
            else:
                def wrapper(request, context):
                    with slots.held(self._token(context), method):
                        return behaviour(request, context)
            return wrapper

        return wrap_handler(handler, decorate)


class AuthInterceptor(_Cached):
    def __init__(self, tokens: auth.TokenTable):
        super().__init__()
        self.tokens = tokens

    def intercept_service(self, continuation, details):
        if auth.method_name(details.method) is None:  # health, reflection
            return continuation(details)
        return super().intercept_service(continuation, details)

    def _wrap(self, handler, full_method: str):
        method = auth.method_name(full_method)
        tokens = self.tokens

        def decorate(behaviour, streaming):
            # the token comes from each call's own metadata (the wrapper is shared by every call)
            if method == "NormalizeStream":
                def wrapper(request_iterator, context):
                    principal = auth.authenticate(tokens, context.invocation_metadata())
                    header, messages = auth.stream_header(request_iterator)
                    if header is not None:
                        auth.authorize(principal, method, header)
                    yield from behaviour(messages, context)
            elif handler.request_streaming:  # AllReduceMomentsStream: every message names its layers
                def wrapper(request_iterator, context):
                    principal = auth.authenticate(tokens, context.invocation_metadata())
                    yield from behaviour(auth.each_authorized(principal, method, request_iterator), context)
            elif streaming:
                def wrapper(request, context):
                    auth.authorize(auth.authenticate(tokens, context.invocation_metadata()), method, request)
                    yield from behaviour(request, context)
            else:
                def wrapper(request, context):
                    auth.authorize(auth.authenticate(tokens, context.invocation_metadata()), method, request)
                    return behaviour(request, context)
            return wrapper

        return wrap_handler(handler, decorate)
