"""The rendezvous behind AllReduceMoments: synchronized batch statistics.

``world_size`` trainers call :meth:`Rendezvous.join` with the same
``((run, group), step)``, each with its rank and its per-layer batch moments.  When
the last rank arrives it merges all contributions (Chan's formula, in rank
order, so every run gives the same bits), runs ``reduce`` once (the servicer
passes a store update, so the running statistics take exactly one update per
step, as SyncBatchNorm's do), and every caller returns the same result.

Failure modes, each cleaning up what it leaves behind:

* a rank that never comes: the others raise :class:`DeadlineExceeded` at their
  deadline (or ``max_wait``), each withdrawing its contribution; the last one
  out removes the step;
* a caller that goes away (cancelled) withdraws the same way;
* a rank that joins twice, or joins a step that already completed:
  :class:`AlreadyExists`;
* a rank whose ``world_size``, layers or shapes differ from the first
  rank's: :class:`InvalidArgument` (the step keeps waiting for a good one);
* ``reduce`` raising (say, a frozen layer): every rank gets that error.

Completed steps are remembered (the last ``remember`` of them) only to reject
latecomers; a new run uses a new ``run``.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..moments import merge_all
from ..errors import AlreadyExists, Cancelled, DeadlineExceeded, InvalidArgument

__all__ = ["Rendezvous", "ReductionStreams", "gave_up", "describe_step", "options_text", "shapes_text"]


@dataclass
class _Step:
    world_size: int
    signature: tuple
    first_rank: int
    arrived: dict = field(default_factory=dict)  # rank -> {layer: Moments}
    joined: set = field(default_factory=set)  # every rank that came, including those that gave up
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


def shapes_text(layers) -> str:
    """``(('a', (2,)), ('b', ()))`` -> ``'a' [2], 'b' []``: a message's words, not a Python repr."""
    return ", ".join(f"{name!r} {list(shape)}" for name, shape in layers) or "none"


def options_text(options) -> str:
    return ", ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)


def describe_step(key) -> str:
    (run, group), step = key
    return f"step {step}" + (f" of group {group!r}" if group else "") + (f" of run {run!r}" if run else "")


def gave_up(key, rank: int, world_size: int, arrived: int, missing: list, gone: bool) -> Exception:
    """The error of a rank that stopped waiting: its caller went away, or its deadline passed."""
    if gone:
        return Cancelled(f"{describe_step(key)}: rank {rank} went away before the others arrived")
    return DeadlineExceeded(
        f"{describe_step(key)}: {arrived} of {world_size} ranks arrived before rank {rank}'s deadline; "
        f"missing ranks {missing[:16]}{' ...' if len(missing) > 16 else ''}",
        reason="RANKS_MISSING",
    )


class Rendezvous:
    """Meeting point of the ranks of each ``((run, group), step)``.

    Parameters
    ----------
    max_wait : float
        Longest a rank waits for the others when its call has no deadline (seconds).
    max_world_size : int
        Larger ``world_size`` values are refused (INVALID_ARGUMENT).
    remember : int
        How many completed steps are remembered to reject duplicates.
    poll : float
        How often a waiting rank checks whether its caller is still there.
    """

    def __init__(self, *, max_wait: float = 300.0, max_world_size: int = 4096, remember: int = 4096,
                 poll: float = 0.2, on_outcome: Callable[[str], None] | None = None):
        self.max_wait = max_wait
        self.max_world_size = max_world_size
        self.poll = poll
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._lock = threading.Lock()
        self._pending: dict[tuple, _Step] = {}
        self._completed: collections.OrderedDict = collections.OrderedDict()
        self._remember = remember

    def pending(self) -> dict:
        """``{(group, step): sorted ranks arrived}`` of the steps still waiting (for tests and debugging)."""
        with self._lock:
            return {key: sorted(s.arrived) for key, s in self._pending.items()}

    def join(self, group: tuple, step: int, rank: int, world_size: int, moments: dict, *,
             reduce: Callable[[dict], Any], timeout: float | None = None,
             is_active: Callable[[], bool] = lambda: True, options: tuple = ()):
        """Contribute ``moments`` ({layer: Moments}) and wait for the others.

        ``group`` is ``(run, group)``: steps of different runs or groups never meet.

        Returns ``(merged, reduce(merged))`` where ``merged`` is {layer: Moments}
        in the order of this caller's ``moments``.  ``options`` must be equal
        across ranks (e.g. whether to update the running statistics).
        """
        key = (group, int(step))
        self._validate(key, rank, world_size, moments)
        signature = (tuple(sorted((name, m.mean.shape) for name, m in moments.items())), options)
        timeout = self.max_wait if timeout is None else min(timeout, self.max_wait)
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            if key in self._completed:
                raise AlreadyExists(
                    f"{describe_step(key)} already completed with all ranks: rank {rank} is a duplicate "
                    "(expected each rank once per step; use a new run to start over)",
                    field="rank", reason="DUPLICATE_RANK",
                )
            st = self._pending.get(key)
            if st is None:
                st = self._pending[key] = _Step(world_size, signature, rank)
            self._check_matches(key, st, rank, world_size, signature)
            st.arrived[rank] = moments
            st.joined.add(rank)
            leader = len(st.arrived) == st.world_size
            if leader:
                del self._pending[key]
                self._completed[key] = True
                while len(self._completed) > self._remember:
                    self._completed.popitem(last=False)
        if leader:
            return self._finish(st, list(moments), reduce)
        return self._wait(key, st, rank, deadline, is_active, list(moments))

    def _validate(self, key, rank, world_size, moments):
        if not 1 <= world_size <= self.max_world_size:
            raise InvalidArgument(
                f"world_size={world_size}: expected 1 to {self.max_world_size}", field="world_size"
            )
        if not 0 <= rank < world_size:
            raise InvalidArgument(f"rank={rank}: expected 0 <= rank < world_size={world_size}", field="rank")
        if not moments:
            raise InvalidArgument(f"{describe_step(key)}: no layer moments: expected at least one", field="moments")

    def _check_matches(self, key, st: _Step, rank, world_size, signature):
        if world_size != st.world_size:
            raise InvalidArgument(
                f"{describe_step(key)}: rank {rank} says world_size={world_size}, rank {st.first_rank} "
                f"said {st.world_size}: expected the same world_size from every rank",
                field="world_size",
            )
        if rank in st.arrived:
            raise AlreadyExists(
                f"{describe_step(key)}: rank {rank} already joined (expected each rank once per step)",
                field="rank", reason="DUPLICATE_RANK",
            )
        if signature != st.signature:
            (layers, options), (want_layers, want_options) = signature, st.signature
            if layers == want_layers:
                what, got, want = "options", f"update_stats={options_text(options)}", f"update_stats={options_text(want_options)}"
                where = "update_stats"
            else:
                what, got, want, where = "layers and shapes", shapes_text(layers), shapes_text(want_layers), "moments"
            raise InvalidArgument(
                f"{describe_step(key)}: rank {rank} sent {what} {got}, rank {st.first_rank} sent {want}: "
                "expected the same from every rank",
                field=where,
            )

    def _finish(self, st: _Step, order: list, reduce):
        ranks = [st.arrived[r] for r in sorted(st.arrived)]
        try:
            merged = {name: merge_all([r[name] for r in ranks]) for name in order}
            st.result = (merged, reduce(merged))
        except BaseException as exc:  # every rank reports the same failure
            st.error = exc
            self._on_outcome("failed")
            raise
        finally:
            st.done.set()
        self._on_outcome("completed")
        return st.result

    def _wait(self, key, st: _Step, rank, deadline, is_active, order):
        while True:
            remaining = deadline - time.monotonic()
            if st.done.wait(max(min(self.poll, remaining), 0.0)):
                break
            gone = not is_active()
            if gone or remaining <= 0:
                with self._lock:
                    if not st.done.is_set():
                        st.arrived.pop(rank, None)
                        if not st.arrived and self._pending.get(key) is st:
                            del self._pending[key]
                        missing = sorted(set(range(st.world_size)) - st.joined)
                        arrived = len(st.joined)
                if not st.done.is_set():
                    self._on_outcome("cancelled" if gone else "timed_out")
                    raise gave_up(key, rank, st.world_size, arrived, missing, gone)
                st.done.wait()
                break
        if st.error is not None:
            raise st.error
        merged, reduced = st.result
        return {name: merged[name] for name in order}, reduced


class ReductionStreams:
    """The open AllReduceMomentsStreams of a server, so that shutting down need not wait for them.

    A trainer's stream stays open between its reductions.  :meth:`close`
    (the server stopping) cancels the streams that are between reductions at
    once, and each other one as soon as its reduction is answered: their
    clients take the CANCELLED of a server going away as a cue to reconnect
    (to another replica), and the server's grace period is left to the
    reductions actually in flight.  A message that arrives after ``close``
    is not reduced; its stream is cancelled.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: dict = {}  # context -> whether its stream waits for its next message
        self.closing = False

    def messages(self, request_iterator, context):
        """The stream's requests, one at a time, for as long as the server is not closing."""
        with self._lock:
            if self.closing:
                context.cancel()
                return
            self._idle[context] = True
        try:
            for request in request_iterator:
                with self._lock:
                    if self.closing:
                        break
                    self._idle[context] = False
                yield request  # reduced and answered before the stream asks for the next one
                with self._lock:
                    if self.closing:
                        break
                    self._idle[context] = True
            else:
                return  # the client ended the stream
            context.cancel()
        finally:
            with self._lock:
                self._idle.pop(context, None)

    def open(self) -> int:
        """Streams open now."""
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        """Cancel the streams that wait for their next message; the others end after their answer."""
        with self._lock:
            self.closing = True
            idle = [context for context, waiting in self._idle.items() if waiting]
        for context in idle:
            context.cancel()
