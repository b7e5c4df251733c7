"""Server interceptors: metrics (outermost), errors, auth (innermost).

* :class:`MetricsInterceptor` counts every call by method and final status
  code and times it (streams: until their last message).
* :class:`ErrorInterceptor` turns any exception from the layers below into a
  status with rich details, through :func:`.errors.to_status` (the one place
  that maps exceptions to codes).
* :class:`AuthInterceptor` checks the bearer token and the token's role and
  layer prefixes against the request (:mod:`.auth`); health and reflection
  stay open.

Each wraps the method handler's behaviour, so it sees the deserialized
request; NormalizeStream is authorized on its first (header) message.
"""

from __future__ import annotations

import time

import grpc

from . import auth
from .errors import abort

__all__ = ["MetricsInterceptor", "ErrorInterceptor", "AuthInterceptor", "wrap_handler"]


def wrap_handler(handler, decorate):
    """A copy of ``handler`` whose behaviour is ``decorate(behaviour, response_streaming)``."""
    if handler is None:
        return None
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


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        method = _short(details.method)
        m = self.metrics

        def record(context, start, failed):
            code = context.code()
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            m.requests.labels(method, code.name).inc()
            m.latency.labels(method).observe(time.perf_counter() - start)
            m.in_flight.labels(method).dec()

        def decorate(behaviour, streaming):
            if streaming:
                def wrapper(request, context):
                    start, failed = time.perf_counter(), True
                    m.in_flight.labels(method).inc()
                    try:
                        yield from behaviour(request, context)
                        failed = False
                    finally:
                        record(context, start, failed)
            else:
                def wrapper(request, context):
                    start, failed = time.perf_counter(), True
                    m.in_flight.labels(method).inc()
                    try:
                        response = behaviour(request, context)
                        failed = False
                        return response
                    finally:
                        record(context, start, failed)
            return wrapper

        return wrap_handler(continuation(details), decorate)


def _aborted(context) -> bool:
    """Whether the call already carries a failure status (``context.abort`` was called)."""
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


class ErrorInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, details):
        def decorate(behaviour, streaming):
            if streaming:
                def wrapper(request, context):
                    try:
                        yield from behaviour(request, context)
                    except GeneratorExit:
                        raise
                    except Exception as exc:
                        if _aborted(context):
                            raise
                        abort(context, exc)
            else:
                def wrapper(request, context):
                    try:
                        return behaviour(request, context)
                    except Exception as exc:
                        if _aborted(context):
                            raise
                        abort(context, exc)
            return wrapper

        return wrap_handler(continuation(details), decorate)


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, tokens: auth.TokenTable):
        self.tokens = tokens

    def intercept_service(self, continuation, details):
        method = auth.method_name(details.method)
        if method is None:  # health, reflection
            return continuation(details)
        metadata = details.invocation_metadata
        tokens = self.tokens

        def decorate(behaviour, streaming):
            if method == "NormalizeStream":
                def wrapper(request_iterator, context):
                    principal = auth.authenticate(tokens, metadata)
                    header, messages = auth.stream_header(request_iterator)
                    if header is not None:
                        auth.authorize(principal, method, header)
                    yield from behaviour(messages, context)
            elif streaming:
                def wrapper(request, context):
                    auth.authorize(auth.authenticate(tokens, metadata), method, request)
                    yield from behaviour(request, context)
            else:
                def wrapper(request, context):
                    auth.authorize(auth.authenticate(tokens, metadata), method, request)
                    return behaviour(request, context)
            return wrapper

        return wrap_handler(continuation(details), decorate)
