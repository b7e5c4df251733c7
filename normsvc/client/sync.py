"""Client, the blocking driver, and Watch, its iterator of new versions."""

from __future__ import annotations

import threading
import time

import grpc

from .allreduce_stream import AllReduceStream
from .api import ClientApi
from .operations import Call
from .results import LayerStats
from .watch import WatchState

__all__ = ["Client", "Watch"]


class Client(ClientApi):
    """Store's interface on a normsvc server.

    Parameters
    ----------
    target : str
        ``host:port`` of the server (any gRPC target, e.g. ``dns:///normsvc:50051``).
    token : str, optional
        Bearer token, sent as ``authorization: Bearer <token>``.
    tls : optional
        None: plaintext; True: TLS with the system roots; a CA bundle (PEM
        bytes or path); or ``{"root": ..., "cert": ..., "key": ...,
        "server_name": ...}`` for a private CA and mutual TLS (see
        :func:`~normsvc.client.transport.channel_credentials`).
    timeout : float or None
        Deadline of every call in seconds, retries included (default 30).
    retry : Retry, optional
        UNAVAILABLE retries (default ``Retry()``: 5 attempts, 0.1 s doubling).
    max_message_bytes : int
        The server's message limit: Normalize requests above it use NormalizeStream.

    Thread-safe; close it (or use ``with``) to release the connection.

    Examples
    --------
    >>> client = normsvc.Client("127.0.0.1:50051")               # doctest: +SKIP
    >>> bn = client.create_layer("bn", convention="torch")      # doctest: +SKIP
    >>> bn.update(normsvc.moments(x, axes=[0])).version         # doctest: +SKIP
    1
    """

    channels = grpc

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self.connection.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def execute(self, operation):
        """Run one operation of :mod:`normsvc.client.operations` with blocking calls; return its value."""
        try:
            call = next(operation)
            while True:
                call = operation.send(self._invoke(call))
        except StopIteration as done:
            return done.value

    def _invoke(self, call: Call):
        method = self.connection.method(call.method, call.raw)
        attempts = self.transport.attempts(call.method, call.timeout)
        while True:
            try:
                if call.streaming:
                    return list(method(call.request(), **attempts.options()))
                return method(call.request, **attempts.options())
            except grpc.RpcError as error:
                time.sleep(attempts.retry_after(error))

    def allreduce_stream(self) -> AllReduceStream:
        """An :class:`~normsvc.client.AllReduceStream`: :meth:`allreduce` calls over one open stream
        (AllReduceMomentsStream), for a trainer that reduces once per layer.

        Same arguments, results and errors as :meth:`allreduce`, about half
        the transport time per call.  The stream opens at its first call and
        holds one of the server's stream slots until it is closed.
        """
        return AllReduceStream(self)

    def watch(self, names, *, skip_initial: bool = False, timeout: float | None = None) -> "Watch":
        """Every new version of the layers' statistics, as :class:`LayerStats` items.

        Starts with each layer's current statistics unless ``skip_initial``;
        returns once the server has subscribed, so no later version is missed
        (LayerNotFound here if a layer does not exist).
        Iterate it; ``cancel()`` (or leaving a ``with`` block) ends it.  If
        the server goes away the watch reconnects (UNAVAILABLE is retried)
        and resumes after the last version it delivered; a deleted layer
        ends it with LayerNotFound.  ``timeout`` bounds the whole watch.
        """
        return Watch(self, WatchState(names, skip_initial, self.transport.attempts("WatchLayer", timeout)))


class Watch:
    """An iterator of :class:`LayerStats` from WatchLayer; ``cancel()`` stops it."""

    def __init__(self, client: Client, state: WatchState):
        self._client = client
        self._state = state
        self._lock = threading.Lock()
        self._call = None
        self._cancelled = False
        self._messages = self._follow()
        try:
            while not state.ready and next(self._messages, False):
                pass
        except BaseException:
            self.cancel()
            raise

    def __iter__(self):
        return self

    def __next__(self) -> LayerStats:
        while not self._state.pending:
            next(self._messages)
        return self._state.pending.popleft()

    def _follow(self):
        """Reads the stream into the state (yields True per message), reconnecting on UNAVAILABLE."""
        state, stub = self._state, self._client.connection.stub
        while True:
            with self._lock:
                if self._cancelled:
                    return
                self._call = stub.WatchLayer(state.request(), **state.attempts.options())
            try:
                for message in self._call:
                    state.receive(message)
                    yield True
                return
            except grpc.RpcError as error:
                if self._cancelled:
                    return
                time.sleep(state.attempts.retry_after(error))
            finally:
                self._call.cancel()

    def cancel(self) -> None:
        """End the stream (iteration then stops); safe from another thread."""
        with self._lock:
            self._cancelled = True
            if self._call is not None:
                self._call.cancel()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
