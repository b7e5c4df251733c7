"""Client: the :class:`~normsvc.store.Store` interface over gRPC, blocking or asyncio.

User code moves from in-process to remote statistics by swapping one object::

    store = normsvc.store.Store.open("sqlite:///stats.db")      # in-process
    store = normsvc.Client("10.0.0.5:50051", token="s3cret")    # remote

:class:`Client` has Store's methods with the same arguments and return types
(layer handles, :class:`~normsvc.running.RunningStats`,
:class:`~normsvc.moments.Moments`, numpy arrays) and raises the same
exceptions (:mod:`normsvc.wire.status` maps statuses back to them).  It adds
:meth:`Client.allreduce` (synchronized batch statistics across ranks; over one
open stream with :meth:`Client.allreduce_stream`) and :meth:`Client.watch` (a
stream of new versions).  :class:`AsyncClient` has
the same methods as coroutines.

Transport behaviour (:mod:`.transport`): every call has a deadline
(``timeout``, default 30 s) that covers its retries; UNAVAILABLE is retried
with backoff (:class:`Retry`), safely, because every mutation carries a
``request_id`` that the retry reuses; tensors whose request would exceed the
server's message limit (``max_message_bytes``, default 64 MiB) travel through
NormalizeStream in chunks, transparently.

How it is built, one concept a module:

* :mod:`.operations`: each operation written once, sans-IO, as a generator
  that yields the calls it needs and returns the value;
* :mod:`.api` and :mod:`.layer`: the methods users call, shared by both drivers;
* :mod:`.sync` (:class:`Client`, :class:`Watch`) and :mod:`.aio`
  (:class:`AsyncClient`, :class:`AsyncWatch`): the drivers, which run the
  operations with blocking or awaited calls and hold no protocol logic;
  :mod:`.allreduce_stream` (:class:`AllReduceStream`,
  :class:`AsyncAllReduceStream`) runs allreduce's over one open stream;
* :mod:`.transport`: target, credentials, deadlines and retries;
  :mod:`.watch`: a watch's bookkeeping; :mod:`.results`: the values returned.
"""

from .aio import AsyncClient, AsyncWatch
from .allreduce_stream import AllReduceStream, AsyncAllReduceStream
from .layer import RemoteLayer
from .results import AllReduceResult, LayerInfo, LayerStats
from .sync import Client, Watch
from .transport import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, DEFAULT_TIMEOUT, Retry

__all__ = [
    "Client",
    "AsyncClient",
    "RemoteLayer",
    "Retry",
    "LayerInfo",
    "LayerStats",
    "AllReduceResult",
    "AllReduceStream",
    "AsyncAllReduceStream",
    "Watch",
    "AsyncWatch",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
]
