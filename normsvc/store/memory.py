"""``memory://``: records in a dict behind one lock (process-local, for tests and single processes)."""

from __future__ import annotations

import threading
from collections import deque
from urllib.parse import parse_qsl, urlsplit

from .backend import REQUEST_WINDOW, Backend, is_retry, not_found, oldest_remembered
from ..errors import InvalidArgument
from .records import Record

__all__ = ["MemoryBackend"]


def _copy(record: Record) -> Record:
    """Records handed out own their arrays, so callers cannot edit the stored state (nor each other's)."""
    return Record(record.name, record.config, record.stats.copy(), record.steps)


class MemoryBackend(Backend):
    """All layers in one dict; one lock makes every call atomic."""

    def __init__(self, *, request_window: int = REQUEST_WINDOW):
        self.request_window = int(request_window)
        self._lock = threading.Lock()
        self._records: dict[str, Record] = {}
        # Per layer: (version, request id) in order of application, and id -> (version, digest);
        # ids older than the last request_window versions are forgotten.
        self._seen: dict[str, tuple[deque, dict]] = {}

    @classmethod
    def from_url(cls, url: str, **options) -> "MemoryBackend":
        parts = urlsplit(url)
        if parts.netloc or parts.path not in ("", "/"):
            raise InvalidArgument(f"store URL {url!r}: expected just memory://", field="url")
        query = dict(parse_qsl(parts.query))
        window = options.pop("request_window", query.pop("request_window", REQUEST_WINDOW))
        if options or query:
            raise InvalidArgument(
                f"unknown options for memory://: {sorted({**options, **query})}: expected request_window",
                field="url",
            )
        try:
            checked = int(window)
        except (TypeError, ValueError):
            checked = 0
        if checked < 1:
            raise InvalidArgument(f"request_window={window!r} for {url!r}: expected a positive int", field="url")
        return cls(request_window=checked)

    def insert(self, record: Record) -> Record:
        with self._lock:
            if record.name not in self._records:
                self._commit(record.name, _copy(record), None)
            return _copy(self._records[record.name])

    def get(self, name: str) -> Record | None:
        with self._lock:
            record = self._records.get(name)
            return None if record is None else _copy(record)

    def names(self, prefix: str = "", after: str | None = None, limit: int | None = None) -> list[str]:
        with self._lock:
            names = sorted(n for n in self._records if n.startswith(prefix) and (after is None or n > after))
        return names if limit is None else names[:limit]

    def delete(self, name: str) -> bool:
        with self._lock:
            self._seen.pop(name, None)
            return self._records.pop(name, None) is not None

    def _remembered(self, name: str, request_id: str, digest: bytes | None) -> bool:
        seen = self._seen[name][1].get(request_id)
        record = self._records[name]
        if seen is None or seen[0] < oldest_remembered(record, self.request_window):
            return False
        return is_retry(name, request_id, seen[1], digest)

    def _current(self, name: str, create) -> Record:
        record = self._records.get(name)
        if record is not None:
            return record
        if create and name in create:
            return _copy(create[name])
        raise not_found(name)

    def mutate(self, names, fn, request_id, create=None, digest=None):
        with self._lock:
            current = {name: self._current(name, create) for name in names}
            inserts = {name: r for name, r in current.items() if name not in self._records}
            changed = {}
            for name in names:
                if request_id is not None and name not in inserts and self._remembered(name, request_id, digest):
                    continue
                # fn is pure: it reads the stored arrays and returns new ones, never editing them in place
                new = fn(current[name])
                if new is not None:
                    changed[name] = new
            # Nothing above raised: commit every layer at once.
            for name, record in inserts.items():
                self._commit(name, record, None)
            for name, record in changed.items():
                self._commit(name, record, request_id, digest)
            return {name: _copy(self._records[name]) for name in names}

    def _commit(self, name: str, record: Record, request_id: str | None, digest: bytes | None = None) -> None:
        """Store ``record``; remember ``request_id`` (with its content's ``digest``) as applied at its version."""
        self._records[name] = record
        order, ids = self._seen.setdefault(name, (deque(), {}))
        if request_id is None:
            return
        version = record.stats.version
        order.append((version, request_id))
        ids[request_id] = (version, digest)
        while order and order[0][0] <= version - self.request_window:
            old_version, old_id = order.popleft()
            if ids.get(old_id, (None,))[0] == old_version:
                del ids[old_id]
