"""AsyncClient: :class:`~normsvc.client.Client`'s methods as coroutines, on ``grpc.aio``.

Only the driver differs from the blocking client: the operations (requests,
responses, paging, streaming) are the same generators from
:mod:`normsvc.client`, run here with awaited calls.  So ``await
client.layer("bn").update(m)`` behaves exactly as ``client.layer("bn").update(m)``
does on a :class:`~normsvc.client.Client`, deadlines and retries included.

Create it inside the event loop that uses it::

    async with normsvc.AsyncClient("127.0.0.1:50051") as client:
        bn = await client.create_layer("bn")
        stats = await bn.update(moments)
        async for item in await client.watch(["bn"]):
            ...
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time

import grpc
from grpc import aio

from ._proto import normsvc_pb2_grpc as pb_grpc
from .client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    Call,
    LayerStats,
    Retry,
    WatchFilter,
    _Api,
    _Transport,
    raw_methods,
)

__all__ = ["AsyncClient", "AsyncWatch"]


class AsyncClient(_Transport, _Api):
    """:class:`~normsvc.client.Client` for asyncio: the same arguments, every method a coroutine.

    Layer handles' methods are coroutines too (``await layer.config`` for the config).
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls=None,
                 timeout: float | None = DEFAULT_TIMEOUT, retry: Retry | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        credentials, options = self._setup(target, token, tls, timeout, retry, max_message_bytes)
        if credentials is None:
            self._channel = aio.insecure_channel(target, options=options)
        else:
            self._channel = aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.NormServiceStub(self._channel)
        self._raw = raw_methods(self._channel)

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _run(self, operation):
        try:
            call = next(operation)
            while True:
                call = operation.send(await self._invoke(call))
        except StopIteration as done:
            return done.value

    async def _invoke(self, call: Call):
        method = self._raw[call.method] if call.raw else getattr(self._stub, call.method)
        deadline = self._deadline(call)
        for attempt in itertools.count(1):
            try:
                timeout = self._remaining(deadline)
                if call.streaming:
                    return [r async for r in method(call.request(), timeout=timeout, metadata=self._metadata)]
                return await method(call.request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                delay = self._retry_delay(error, attempt, deadline)
                if delay is None:
                    raise self._error(error, call.method, attempt) from None
                await asyncio.sleep(delay)

    async def watch(self, names, *, skip_initial: bool = False, timeout: float | None = None) -> "AsyncWatch":
        """:meth:`Client.watch <normsvc.client.Client.watch>`: ``async for item in await client.watch(...)``."""
        watch = AsyncWatch(self, WatchFilter(names, skip_initial), timeout)
        await watch._prime()
        return watch


class AsyncWatch:
    """An async iterator of :class:`~normsvc.client.LayerStats`; ``cancel()`` stops it."""

    def __init__(self, client: AsyncClient, state: WatchFilter, timeout):
        self._client = client
        self._state = state
        self._timeout = timeout
        self._call = None
        self._cancelled = False
        self._ready = collections.deque()
        self._items = self._follow()

    async def _prime(self) -> None:
        """Read up to the layers' initial versions: the server has subscribed then."""
        try:
            while not self._state.ready:
                item = await self._items.__anext__()
                if item is not None:
                    self._ready.append(item)
        except StopAsyncIteration:
            pass
        except BaseException:
            self.cancel()
            raise

    def __aiter__(self):
        return self

    async def __anext__(self) -> LayerStats:
        if self._ready:
            return self._ready.popleft()
        while True:
            item = await self._items.__anext__()
            if item is not None:
                return item

    async def _follow(self):
        client, failed = self._client, 0
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while not self._cancelled:
            self._call = client._stub.WatchLayer(self._state.request(), timeout=client._remaining(deadline),
                                                 metadata=client._metadata)
            try:
                async for message in self._call:
                    failed = 0
                    yield self._state.accept(message)
                return
            except grpc.RpcError as error:
                if self._cancelled:
                    return
                failed += 1
                delay = client._retry_delay(error, failed, deadline)
                if delay is None:
                    raise client._error(error, "WatchLayer", failed) from None
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                if self._cancelled:
                    return
                raise
            finally:
                self._call.cancel()

    def cancel(self) -> None:
        """End the stream (iteration then stops)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> "AsyncWatch":
        return self

    async def __aexit__(self, *exc) -> None:
        self.cancel()
