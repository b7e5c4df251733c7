"""Fan-out of new statistics versions to WatchLayer streams.

Every mutation the server makes publishes the layer's new
:class:`~normsvc.running.RunningStats` here; each subscription gets every
version of the layers it watches, in version order.  Concurrent mutations
may publish out of order (version 7 before 6), so a subscription holds a
version back until its predecessor arrives, or until ``gap_wait`` passes (a
version made elsewhere, e.g. by another replica on a shared store, is never
published here: :meth:`Subscription.next` then returns what it has, and the
stream polls the store for such versions).
"""

from __future__ import annotations

import threading
import time

__all__ = ["WatchHub", "Subscription", "DELETED"]

#: Published instead of statistics when a layer is deleted.
DELETED = object()


class Subscription:
    """One stream's queue: ``next()`` returns ``(layer, stats | DELETED)`` in version order."""

    def __init__(self, hub: "WatchHub", names, gap_wait: float):
        self._hub = hub
        self.names = tuple(dict.fromkeys(names))
        self._cond = threading.Condition()
        self._pending: dict[str, dict[int, object]] = {n: {} for n in self.names}
        self._deleted: list[str] = []
        self._since: dict[str, float] = {}
        self.last: dict[str, int] = {n: -1 for n in self.names}
        self._gap_wait = gap_wait
        self.closed = False

    def _put(self, name: str, stats) -> None:
        with self._cond:
            if stats is DELETED:
                self._deleted.append(name)
            elif stats.version > self.last[name]:
                self._pending[name][stats.version] = stats
                self._since.setdefault(name, time.monotonic())
            self._cond.notify_all()

    def seen(self, name: str, version: int) -> None:
        """Mark ``version`` of ``name`` as delivered (e.g. sent from the store directly)."""
        with self._cond:
            if version > self.last[name]:
                self.last[name] = version
                self._pending[name] = {v: s for v, s in self._pending[name].items() if v > version}

    def _ready(self):
        if self._deleted:
            return self._deleted.pop(0), DELETED
        now = time.monotonic()
        for name, pending in self._pending.items():
            if not pending:
                continue
            nxt = self.last[name] + 1
            if nxt in pending or self.last[name] < 0 or now - self._since.get(name, now) >= self._gap_wait:
                version = nxt if nxt in pending else min(pending)
                stats = pending.pop(version)
                self.last[name] = version
                if pending:
                    self._since[name] = now
                else:
                    self._since.pop(name, None)
                return name, stats
        return None

    def next(self, timeout: float):
        """The next item, or None after ``timeout`` seconds (or once closed)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.closed:
                item = self._ready()
                if item is not None:
                    return item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(min(remaining, self._gap_wait))
            return None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._hub._unsubscribe(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class WatchHub:
    """Per-layer subscriber lists; ``publish`` is cheap when nobody watches."""

    def __init__(self, gap_wait: float = 0.5):
        self._lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = {}
        self._gap_wait = gap_wait
        self.closed = False

    def subscribe(self, names) -> Subscription:
        sub = Subscription(self, names, self._gap_wait)
        with self._lock:
            for name in sub.names:
                self._subs.setdefault(name, set()).add(sub)
            if self.closed:
                sub.closed = True
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            for name in sub.names:
                subs = self._subs.get(name)
                if subs is not None:
                    subs.discard(sub)
                    if not subs:
                        del self._subs[name]

    def watched(self, name: str) -> bool:
        """Whether any stream watches ``name`` now."""
        return bool(self._subs.get(name))

    def publish(self, name: str, stats) -> None:
        """Hand a new version (or :data:`DELETED`) of ``name`` to its watchers."""
        subs = self._subs.get(name)
        if not subs:
            return
        with self._lock:
            subs = list(self._subs.get(name, ()))
        for sub in subs:
            sub._put(name, stats)

    def close(self) -> None:
        """End every subscription (server shutdown)."""
        with self._lock:
            self.closed = True
            subs = {s for group in self._subs.values() for s in group}
        for sub in subs:
            with sub._cond:
                sub.closed = True
                sub._cond.notify_all()


def follow(store, hub: WatchHub, names, *, skip_initial: bool, context, poll: float = 2.0):
    """Yield ``(layer, RunningStats)`` for the current and every new version of ``names``.

    Versions made by this server come from ``hub`` as they happen; the store
    is also polled every ``poll`` seconds for versions made elsewhere (another
    process or replica on the same store), which may skip some of those.
    Ends when the caller goes away; raises LayerNotFound when a watched layer
    is deleted and Unavailable when the server shuts down.
    """
    from ..errors import LayerNotFound, Unavailable

    with hub.subscribe(names) as sub:
        context.add_callback(sub.close)
        for name in sub.names:
            stats = store.layer(name).stats()
            if not skip_initial:
                yield name, stats
            sub.seen(name, stats.version)
        last_poll = time.monotonic()
        while context.is_active():
            item = sub.next(timeout=poll)
            if item is None:
                if sub.closed:
                    if hub.closed:
                        raise Unavailable("the server is shutting down: reconnect to watch again")
                    return
                if time.monotonic() - last_poll >= poll:
                    last_poll = time.monotonic()
                    for name in sub.names:
                        stats = store.layer(name).stats()
                        if stats.version > sub.last[name]:
                            sub.seen(name, stats.version)
                            yield name, stats
                continue
            name, stats = item
            if stats is DELETED:
                raise LayerNotFound(f"layer {name!r} was deleted while being watched", layer=name)
            yield name, stats
