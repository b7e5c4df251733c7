"""AsyncClient, the asyncio driver (``grpc.aio``), and AsyncWatch, its async iterator of new versions.

Only the driver differs from the blocking client: the operations are the same
generators (:mod:`.operations`), run here with awaited calls, and the methods
are the same (:mod:`.api`, :mod:`.layer`).  So ``await
client.layer("bn").update(m)`` behaves exactly as ``client.layer("bn").update(m)``
does on a :class:`~normsvc.client.Client`, deadlines and retries included.

Create it inside the event loop that uses it::

    async with normsvc.AsyncClient("127.0.0.1:50051") as client:
        bn = await client.create_layer("bn")
        stats = await bn.update(moments)
        config = await bn.config()
        async for item in await client.watch(["bn"]):
            ...
"""

from __future__ import annotations

import asyncio

import grpc
from grpc import aio

from .allreduce_stream import AsyncAllReduceStream
from .api import ClientApi
from .operations import Call
from .results import LayerStats
from .watch import WatchState

__all__ = ["AsyncClient", "AsyncWatch"]


class AsyncClient(ClientApi):
    """:class:`~normsvc.client.Client` for asyncio: the same arguments, every method a coroutine.

    Layer handles' methods return awaitables too (``await layer.config()``).
    """

    channels = aio

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self.connection.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def execute(self, operation):
        """Run one operation of :mod:`normsvc.client.operations` with awaited calls; return its value."""
        try:
            call = next(operation)
            while True:
                call = operation.send(await self._invoke(call))
        except StopIteration as done:
            return done.value

    async def _invoke(self, call: Call):
        method = self.connection.method(call.method, call.raw)
        attempts = self.transport.attempts(call.method, call.timeout)
        while True:
            try:
                if call.streaming:
                    return [r async for r in method(call.request(), **attempts.options())]
                return await method(call.request, **attempts.options())
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.retry_after(error))

    def allreduce_stream(self) -> AsyncAllReduceStream:
        """:meth:`Client.allreduce_stream <normsvc.client.Client.allreduce_stream>`: an
        :class:`~normsvc.client.AsyncAllReduceStream`, ``await stream.allreduce(...)``."""
        return AsyncAllReduceStream(self)

    async def watch(self, names, *, skip_initial: bool = False, timeout: float | None = None) -> "AsyncWatch":
        """:meth:`Client.watch <normsvc.client.Client.watch>`: ``async for item in await client.watch(...)``."""
        watch = AsyncWatch(self, WatchState(names, skip_initial, self.transport.attempts("WatchLayer", timeout)))
        await watch._subscribe()
        return watch


class AsyncWatch:
    """An async iterator of :class:`~normsvc.client.LayerStats`; ``cancel()`` stops it."""

    def __init__(self, client: AsyncClient, state: WatchState):
        self._client = client
        self._state = state
        self._call = None
        self._cancelled = False
        self._messages = self._follow()

    async def _subscribe(self) -> None:
        """Read up to the layers' initial versions: the server has subscribed then."""
        try:
            while not self._state.ready and await anext(self._messages, False):
                pass
        except BaseException:
            self.cancel()
            raise

    def __aiter__(self):
        return self

    async def __anext__(self) -> LayerStats:
        while not self._state.pending:
            await anext(self._messages)
        return self._state.pending.popleft()

    async def _follow(self):
        """Reads the stream into the state (yields True per message), reconnecting on UNAVAILABLE."""
        state, stub = self._state, self._client.connection.stub
        while not self._cancelled:
            self._call = stub.WatchLayer(state.request(), **state.attempts.options())
            try:
                async for message in self._call:
                    state.receive(message)
                    yield True
                return
            except grpc.RpcError as error:
                if self._cancelled:
                    return
                await asyncio.sleep(state.attempts.retry_after(error))
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
