"""Request limits: exceeding one is RESOURCE_EXHAUSTED, and the server keeps serving.

The message size limit is gRPC's own (``max_message_mb``, both directions);
the others are checked before any work is done, and before any allocation
they bound.  Two of them are capacities shared by all callers rather than
sizes of one request:

* :class:`StreamSlots`: the calls that hold a server thread for as long as
  they last (WatchLayer, NormalizeStream, a rank waiting in
  AllReduceMoments, server reflection's stream) get at most ``max_streams``
  of the ``workers`` threads, and at most ``max_streams_per_token`` per
  token, so unary calls and ``grpc.health.v1`` always find a thread;
* :class:`StreamBudget`: the bytes NormalizeStream buffers hold at once.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace

from ..errors import InvalidArgument, ResourceExhausted, TensorTooLarge
from ..wire.tensors import tensor_error

__all__ = ["Limits", "StreamSlots", "StreamBudget", "ANSWER_MARGIN"]

MiB = 1 << 20
#: Room left in an answer for everything but its statistics (field tags, names, configs, a page token).
ANSWER_MARGIN = 64 * 1024
#: max_stream_mb by default: this many messages' worth of NormalizeStream buffers at once.
STREAM_MESSAGES = 8


@dataclass(frozen=True)
class Limits:
    """
    Attributes
    ----------
    max_message_mb : int
        Largest gRPC message, sent or received (MiB).  Larger tensors go through NormalizeStream.
    max_tensor_elements : int
        Largest tensor (x of Normalize/NormalizeStream, any moments tensor).
    max_layers_per_request : int
        Layers one UpdateStats / AllReduceMoments / GetLayer / WatchLayer may name.
    max_layers : int
        Layers the store may hold; CreateLayer beyond it fails.
    stream_chunk_bytes : int
        Size of the y chunks NormalizeStream sends back.
    max_page_size : int
        Largest ListLayers page (pages also stop before their encoded size
        reaches ``max_message_bytes`` minus :data:`ANSWER_MARGIN`).
    max_streams : int, optional
        Calls that hold a server thread while they last (WatchLayer and
        NormalizeStream streams, ranks waiting in AllReduceMoments, server
        reflection streams), all callers together; beyond it such a call is
        refused at once (RESOURCE_EXHAUSTED).  None: ``workers`` minus a
        reserve of ``max(2, workers // 4)`` threads that only unary calls and
        health checks use (48 of the default 64 workers; at least 1).  At
        most ``workers - 1``.
    max_streams_per_token : int, optional
        The same, per token (entries of the tokens file with the same name
        share one count; callers without a valid token share one count).
        None: half of ``max_streams`` when the server has a tokens file (no
        token takes every stream), ``max_streams`` without one (every caller
        is then the same tokenless caller).  An AllReduceMoments step holds
        one per rank until its last rank arrives: keep world_size within this.
    max_stream_mb : int, optional
        MiB that NormalizeStream buffers may hold at once, all streams
        together (``max_stream_bytes``).  A stream reserves twice its tensor's
        bytes (x as it arrives, y as it leaves) on its header, before
        allocating anything, and releases them when it ends or is
        cancelled; a tensor that needs more than the whole budget is refused
        (TENSOR_TOO_LARGE), one that does not fit while other streams hold
        the budget too (reason STREAM_BUDGET_EXHAUSTED).  None:
        ``8 * max_message_mb`` (512 MiB by default, so tensors of up to 256 MiB).
    """

    max_message_mb: int = 64
    max_tensor_elements: int = 1 << 28
    max_layers_per_request: int = 4096
    max_layers: int = 1_000_000
    stream_chunk_bytes: int = 1 * MiB
    max_page_size: int = 1000
    default_page_size: int = 100
    max_streams: int | None = None
    max_streams_per_token: int | None = None
    max_stream_mb: int | None = None

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * MiB)

    @property
    def max_answer_bytes(self) -> int:
        """The bytes of statistics an answer may carry: a message less :data:`ANSWER_MARGIN`."""
        return self.max_message_bytes - ANSWER_MARGIN

    @property
    def max_stream_bytes(self) -> int:
        mb = STREAM_MESSAGES * self.max_message_mb if self.max_stream_mb is None else self.max_stream_mb
        return int(mb * MiB)

    def for_server(self, workers: int, *, tokens: bool) -> "Limits":
        """These limits with ``max_streams`` and ``max_streams_per_token`` resolved for a server of
        ``workers`` threads, with (``tokens``) or without a tokens file; InvalidArgument if they
        would leave no thread to unary calls and health checks."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 2:
            raise InvalidArgument(f"workers={workers!r}: expected an int >= 2 (threads for streams, and at "
                                  "least one for unary calls and health checks)", field="workers")
        streams = self.max_streams
        if streams is None:
            streams = max(workers - max(2, workers // 4), 1)
        elif isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams < workers:
            raise InvalidArgument(
                f"max_streams={streams!r}: expected 1 to {workers - 1} (workers - 1): every stream holds "
                "one of the workers threads, and unary calls and health checks need at least one",
                field="max_streams")
        per_token = self.max_streams_per_token
        if per_token is None:
            per_token = max(streams // 2, 1) if tokens else streams
        elif isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1:
            raise InvalidArgument(f"max_streams_per_token={per_token!r}: expected a positive int",
                                  field="max_streams_per_token")
        if self.max_stream_bytes <= 0:
            raise InvalidArgument(f"max_stream_mb={self.max_stream_mb!r}: expected a positive number",
                                  field="max_stream_mb")
        return replace(self, max_streams=streams, max_streams_per_token=min(per_token, streams))

    def check_layers_per_request(self, n: int, field: str) -> None:
        if n > self.max_layers_per_request:
            raise ResourceExhausted(
                f"{field} names {n} layers: expected at most {self.max_layers_per_request} per request "
                "(split the request)",
                field=field,
            )

    def check_statistics(self, shape: tuple, field: str) -> None:
        """A layer's statistics shape: at most ``max_tensor_elements`` values, and an answer that fits a message."""
        n = 1
        for size in shape:
            n *= size
        if n > self.max_tensor_elements:
            raise ResourceExhausted(
                f"{field} gives the layer {n} statistics per tensor: expected at most {self.max_tensor_elements}",
                field=field,
            )
        if 16 * n > self.max_answer_bytes:  # mean and variance, float64, in one answer
            raise ResourceExhausted(
                f"{field} gives the layer {n} statistics per tensor: its answers would exceed the "
                f"{self.max_message_mb} MiB message limit (expected at most {self.max_answer_bytes // 16})",
                field=field,
            )

    def check_layer_count(self, n: int) -> None:
        if n >= self.max_layers:
            raise ResourceExhausted(
                f"the store holds {n} layers, the server's maximum: delete layers before creating more",
                field="name",
                reason="TOO_MANY_LAYERS",
            )


class StreamSlots:
    """Counts the calls that hold a server thread while they last: at most ``total`` at once, and
    at most ``per_token`` for one token (key None: the callers without a valid token).

    :meth:`held` takes a slot for the length of a ``with`` block, or refuses at once with
    RESOURCE_EXHAUSTED (reason ``TOO_MANY_STREAMS``; the QuotaFailure names the limit).
    """

    def __init__(self, total: int, per_token: int):
        self.total = total
        self.per_token = per_token
        self._lock = threading.Lock()
        self._open = 0
        self._by_token: dict = {}

    @property
    def open(self) -> int:
        """Slots held now."""
        return self._open

    def open_for(self, token) -> int:
        """Slots ``token`` (a token's name, or None) holds now."""
        return self._by_token.get(token, 0)

    def acquire(self, token, method: str) -> None:
        with self._lock:
            mine = self._by_token.get(token, 0)
            if mine >= self.per_token and self.per_token < self.total:  # else the server's limit says it
                who = f"token {token!r} has" if token is not None else "callers without a token have"
                raise ResourceExhausted(
                    f"{method} refused: {who} {mine} streams open (WatchLayer, NormalizeStream, ranks waiting "
                    f"in AllReduceMoments), the most one token may (max_streams_per_token={self.per_token}): "
                    "close one first, or ask the operator to raise --max-streams-per-token",
                    field="max_streams_per_token", reason="TOO_MANY_STREAMS")
            if self._open >= self.total:
                raise ResourceExhausted(
                    f"{method} refused: the server has {self._open} streams open (WatchLayer, NormalizeStream, "
                    f"ranks waiting in AllReduceMoments), its maximum (max_streams={self.total}; the other "
                    "threads are kept for unary calls and health checks): retry later, or ask the operator "
                    "to raise --workers",
                    field="max_streams", reason="TOO_MANY_STREAMS")
            self._open += 1
            self._by_token[token] = mine + 1

    def release(self, token) -> None:
        with self._lock:
            self._open -= 1
            left = self._by_token[token] - 1
            if left:
                self._by_token[token] = left
            else:
                del self._by_token[token]

    @contextlib.contextmanager
    def held(self, token, method: str):
        self.acquire(token, method)
        try:
            yield
        finally:
            self.release(token)


class StreamBudget:
    """The bytes NormalizeStream buffers may hold at once (``max_stream_bytes``), reserved before
    they are allocated and given back when the stream ends, fails or is cancelled."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._used = 0

    @property
    def used(self) -> int:
        """Bytes reserved now."""
        return self._used

    @contextlib.contextmanager
    def reserve(self, nbytes: int, *, field: str, what: str):
        """Hold ``nbytes`` for the ``with`` block; ``what`` says what needs them (in messages).

        A need over the whole budget is :class:`TensorTooLarge` at ``field``; one over what
        other streams left free is RESOURCE_EXHAUSTED, reason ``STREAM_BUDGET_EXHAUSTED``.
        """
        if nbytes > self.limit:
            raise tensor_error(field, f"{what} needs {nbytes} bytes of stream buffers: expected at most "
                                      f"{self.limit} (max_stream_bytes)", TensorTooLarge)
        with self._lock:
            free = self.limit - self._used
            if nbytes > free:
                raise ResourceExhausted(
                    f"{what} needs {nbytes} bytes of stream buffers, and other streams hold "
                    f"{self._used} of the server's {self.limit} (max_stream_bytes): retry later",
                    field="max_stream_bytes", reason="STREAM_BUDGET_EXHAUSTED")
            self._used += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._used -= nbytes
