"""AllReduceStream (and AsyncAllReduceStream): ``allreduce`` over one open stream.

A trainer that reduces once per layer and direction (sync BatchNorm: 53
layers of a ResNet-50, forward and backward, every step) pays a unary call's
setup each time.  :meth:`Client.allreduce_stream
<normsvc.client.Client.allreduce_stream>` opens AllReduceMomentsStream once
and sends each reduction as one message on it, answered in order: the same
operation (:func:`.operations.allreduce`), the same arguments, results and
errors as ``Client.allreduce``, for about half the transport time.

* Each reduction waits for the other ranks at most its ``timeout`` (sent as
  ``wait_seconds``; the server answers DEADLINE_EXCEEDED then).  Should no
  answer come even ``timeout`` plus a grace after that, a watchdog thread
  cancels the stream and the call raises DeadlineExceeded: nothing hangs on a
  server that stopped answering.
* A failed reduction ends the stream with its status; the call raises the
  matching :mod:`normsvc.errors` exception and the next call opens a new
  stream.  UNAVAILABLE is retried as the client retries it (:mod:`.transport`).
* One reduction at a time: calls from several threads take turns (open one
  stream per thread for concurrent reductions).  The stream holds one of the
  server's stream slots until :meth:`AllReduceStream.close` (or the client's
  ``close``).

:class:`AsyncAllReduceStream` is the same for :class:`~normsvc.client.AsyncClient`
(``AsyncClient.allreduce_stream()``), its methods coroutines; concurrent
tasks take turns, and the overdue answer is a timeout on the read (no thread).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
from grpc import aio

from ..config import DEFAULT
from ..errors import DeadlineExceeded, FailedPrecondition, Unavailable
from . import operations
from .results import AllReduceResult
from .transport import Attempts

__all__ = ["AllReduceStream", "AsyncAllReduceStream", "ThreadStreams"]

_METHOD = "AllReduceMomentsStream"
_END = object()


def _grace(wait: float) -> float:
    """How long after a reduction's own wait the client gives up on the server's answer."""
    return max(1.0, 0.1 * wait)


def _wait(client, call) -> float | None:
    """Seconds the reduction may wait for the other ranks (sent as wait_seconds; None: the server's
    maximum), the call's timeout or the client's."""
    wait = client.transport.timeout if call.timeout is DEFAULT else call.timeout
    if wait is not None:
        call.request.wait_seconds = wait
    return wait


def _closed_error() -> FailedPrecondition:
    return FailedPrecondition("this AllReduceStream was closed: open another with the client's allreduce_stream()")


def _overdue_error(client, overdue: float, wait: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"{_METHOD} on {client.target}: no answer {overdue:g} s after the reduction was sent "
                            f"(it waits for the other ranks at most {wait:g} s): the server stopped answering")


def _ended_error(client) -> Unavailable:  # ended with OK but no answer: not what a normsvc server does
    return Unavailable(f"{_METHOD} on {client.target}: the stream ended without an answer")


class _Watchdog:
    """Cancels the stream whose answer is overdue; sleeps through calls that are answered in time.

    :meth:`arm` wakes the thread only when it sleeps past the new deadline
    (or without one), so back-to-back calls cost no thread switch.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._deadline = None
        self._call = None
        self._until = None  # what the thread sleeps until (None: no deadline)
        self._stopped = False
        self.fired = None  # the call it cancelled
        threading.Thread(target=self._run, name="normsvc-allreduce-watchdog", daemon=True).start()

    def arm(self, call, deadline: float) -> None:
        with self._cond:
            self._call, self._deadline = call, deadline
            if self._until is None or deadline < self._until:
                self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._call = self._deadline = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                self._until = self._deadline
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self.fired = self._call
                self._call.cancel()
                self._call = self._deadline = None


class AllReduceStream:
    """Reductions of one client over one AllReduceMomentsStream (see the module's documentation).

    Get it with :meth:`Client.allreduce_stream
    <normsvc.client.Client.allreduce_stream>`; use it as a context manager or
    :meth:`close` it.
    """

    def __init__(self, client):
        self._client = client
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue | None = None  # what the open stream sends, until _END
        self._responses = None
        self._watchdog: _Watchdog | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._responses is not None else "idle")
        return f"AllReduceStream({self._client.target!r}, {state})"

    def __enter__(self) -> "AllReduceStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def allreduce(self, moments, *, step: int, rank: int, world_size: int, group: str = "",
                  update_stats: bool = True, timeout=DEFAULT, run: str | None = None) -> AllReduceResult:
        """:meth:`Client.allreduce <normsvc.client.Client.allreduce>`, as one message of the stream."""
        operation = operations.allreduce(moments, step, rank, world_size, group, update_stats, timeout, run)
        call = next(operation)  # the arguments are checked before anything is sent
        with self._lock:
            if self._closed:
                raise _closed_error()
            response = self._exchange(call)
        try:
            operation.send(response)
        except StopIteration as done:
            return done.value
        raise AssertionError("operations.allreduce makes one call")  # pragma: no cover

    def close(self) -> None:
        """End the stream (its server slot is freed); later calls raise FailedPrecondition."""
        with self._lock:
            self._closed = True
            self._drop()
            if self._watchdog is not None:
                self._watchdog.stop()
                self._watchdog = None

    def _exchange(self, call):
        transport = self._client.transport
        wait, request = _wait(self._client, call), call.request
        attempts = None  # made at the first failure, as few calls fail
        started = time.monotonic()
        while True:
            if self._responses is None or self._responses.done():  # none yet, or it ended while idle
                self._open()
            try:
                return self._answer(request, wait)
            except grpc.RpcError as error:
                self._drop()
                if attempts is None:
                    attempts = Attempts(transport, _METHOD, None if wait is None else started + wait)
                time.sleep(attempts.retry_after(error))
            except BaseException:  # interrupted between request and answer: the stream is out of step
                self._drop()
                raise

    def _answer(self, request, wait):
        responses, watchdog = self._responses, self._watchdog
        if wait is not None:
            overdue = wait + _grace(wait)
            watchdog.arm(responses, time.monotonic() + overdue)
        self._requests.put(request)
        try:
            return next(responses)
        except grpc.RpcError as error:
            if watchdog.fired is responses:
                raise _overdue_error(self._client, overdue, wait) from None
            raise error
        except StopIteration:
            raise _ended_error(self._client) from None
        finally:
            watchdog.disarm()

    def _open(self) -> None:
        self._drop()
        if self._watchdog is None:
            self._watchdog = _Watchdog()
        self._requests = queue.SimpleQueue()
        method = self._client.connection.method(_METHOD)
        self._responses = method(iter(self._requests.get, _END), metadata=self._client.transport.metadata)

    def _drop(self) -> None:
        if self._responses is not None:
            self._requests.put(_END)
            self._responses.cancel()
            self._requests = self._responses = None


class ThreadStreams:
    """``allreduce`` on one :class:`AllReduceStream` of ``target`` per calling thread, each opened at its
    thread's first reduction: what a trainer that reduces from several threads needs (a training
    thread, and on CUDA autograd's thread for the device).  A ``target`` without ``allreduce_stream``
    (an in-process Store, a Client-like object) gets one ``allreduce`` call per reduction."""

    def __init__(self, target):
        self.target = target
        self._lock = threading.Lock()
        self._local = threading.local()
        self._opened: list = []  # every stream opened, for close()

    def allreduce(self, moments, **kwargs):
        stream = getattr(self._local, "stream", None)
        if stream is None:
            opener = getattr(self.target, "allreduce_stream", None)
            if opener is None:
                return self.target.allreduce(moments, **kwargs)
            stream = self._local.stream = opener()
            with self._lock:
                self._opened.append(stream)
        return stream.allreduce(moments, **kwargs)

    def close(self) -> None:
        """End every thread's stream (each holds one of the server's stream slots); a later
        reduction opens another."""
        with self._lock:
            opened, self._opened, self._local = self._opened, [], threading.local()
        for stream in opened:
            stream.close()


class AsyncAllReduceStream:
    """:class:`AllReduceStream` for :class:`~normsvc.client.AsyncClient`: ``await stream.allreduce(...)``.

    Get it with :meth:`AsyncClient.allreduce_stream
    <normsvc.client.AsyncClient.allreduce_stream>`; use it with ``async
    with`` or ``await`` :meth:`close`.
    """

    def __init__(self, client):
        self._client = client
        self._lock = asyncio.Lock()
        self._call = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._call is not None else "idle")
        return f"AsyncAllReduceStream({self._client.target!r}, {state})"

    async def __aenter__(self) -> "AsyncAllReduceStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def allreduce(self, moments, *, step: int, rank: int, world_size: int, group: str = "",
                        update_stats: bool = True, timeout=DEFAULT, run: str | None = None) -> AllReduceResult:
        """:meth:`Client.allreduce <normsvc.client.Client.allreduce>`, as one message of the stream."""
        operation = operations.allreduce(moments, step, rank, world_size, group, update_stats, timeout, run)
        call = next(operation)  # the arguments are checked before anything is sent
        async with self._lock:
            if self._closed:
                raise _closed_error()
            response = await self._exchange(call)
        try:
            operation.send(response)
        except StopIteration as done:
            return done.value
        raise AssertionError("operations.allreduce makes one call")  # pragma: no cover

    async def close(self) -> None:
        """End the stream (its server slot is freed); later calls raise FailedPrecondition."""
        async with self._lock:
            self._closed = True
            self._drop()

    async def _exchange(self, call):
        transport = self._client.transport
        wait, request = _wait(self._client, call), call.request
        attempts = None
        started = time.monotonic()
        while True:
            if self._call is None or self._call.done():  # none yet, or it ended while idle
                self._drop()
                self._call = self._client.connection.method(_METHOD)(metadata=transport.metadata)
            try:
                return await self._answer(request, wait)
            except grpc.RpcError as error:
                self._drop()
                if attempts is None:
                    attempts = Attempts(transport, _METHOD, None if wait is None else started + wait)
                await asyncio.sleep(attempts.retry_after(error))
            except BaseException:  # cancelled between request and answer: the stream is out of step
                self._drop()
                raise

    async def _answer(self, request, wait):
        await self._call.write(request)
        if wait is None:
            response = await self._call.read()
        else:
            overdue = wait + _grace(wait)
            try:
                response = await asyncio.wait_for(self._call.read(), overdue)
            except asyncio.TimeoutError:
                raise _overdue_error(self._client, overdue, wait) from None
        if response is aio.EOF:
            raise _ended_error(self._client)
        return response

    def _drop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
