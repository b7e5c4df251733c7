"""``sqlite:///path/to/stats.db``: the embedded default backend.

One row per layer (config JSON, statistics as float64 little-endian blobs,
counters) and one row per remembered request id, written in the same
transaction as the layer.  Every read-modify-write runs in ``BEGIN
IMMEDIATE``, which takes the database's write lock up front, so threads and
processes sharing the file serialize their updates instead of failing at
commit; a writer waits up to ``busy_timeout`` for the lock.  Threads of one
process queue on a Python lock first, so only other processes ever meet
SQLite's (polling) busy handler.

Durability: the journal is in WAL mode.  With ``synchronous=normal`` (the
default) a committed update survives a crash of the process (kill -9), but
the last transactions may be lost on power loss or an OS crash; with
``synchronous=full`` every commit is synced to disk first and survives those
too, at the cost of one fsync per update.

Stored state is versioned: ``PRAGMA user_version`` is the storage format of
:mod:`normsvc.store.records` (files of format 1 left it at 0).  Opening an
older file migrates it in one transaction; a newer one is refused with
FailedPrecondition.

Options (keyword arguments of ``Store.open`` or URL query parameters):
``synchronous`` ("normal" or "full"), ``busy_timeout`` (seconds, default 30),
``request_window`` (default 1024).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from urllib.parse import parse_qsl, unquote, urlsplit

from .backend import REQUEST_WINDOW, Backend, is_retry, not_found, oldest_remembered
from ..errors import InvalidArgument, StoreUnavailable
from .records import FORMAT, Record, check_format, decode_config, decode_record, encode_config, encode_record

__all__ = ["SqliteBackend"]

# One statement each: executescript would commit the transaction that creates them.
_SCHEMA = ("""
CREATE TABLE layers (
    name        TEXT PRIMARY KEY,
    config      TEXT NOT NULL,
    shape       TEXT,
    mean        BLOB,
    variance    BLOB,
    count       REAL NOT NULL,
    num_batches INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    frozen      INTEGER NOT NULL,
    updated_at  REAL NOT NULL,
    steps       TEXT,
    pending     BLOB,
    renorm      BLOB
)""", """
CREATE TABLE request_ids (
    layer      TEXT NOT NULL,
    request_id TEXT NOT NULL,
    version    INTEGER NOT NULL,
    digest     BLOB,
    PRIMARY KEY (layer, request_id)
) WITHOUT ROWID""",
    "CREATE INDEX request_ids_by_version ON request_ids (layer, version)")

_FIELDS = ("config", "shape", "mean", "variance", "count", "num_batches", "version", "frozen", "updated_at", "steps",
           "pending", "renorm")
#: Columns that format 3 added (step contributions; the content digests of request ids).
_FORMAT_3 = ("ALTER TABLE layers ADD COLUMN steps TEXT", "ALTER TABLE layers ADD COLUMN pending BLOB",
             "ALTER TABLE request_ids ADD COLUMN digest BLOB")
#: The column that format 4 added (batch renormalization's statistics).
_FORMAT_4 = ("ALTER TABLE layers ADD COLUMN renorm BLOB",)
_SELECT = f"SELECT {', '.join(_FIELDS)} FROM layers WHERE name = ?"
_INSERT = f"INSERT INTO layers (name, {', '.join(_FIELDS)}) VALUES (?{', ?' * len(_FIELDS)})"
_STATS = _FIELDS[1:]  # mutate never changes the config
_UPDATE = f"UPDATE layers SET {', '.join(f + ' = ?' for f in _STATS)} WHERE name = ?"
_SYNCHRONOUS = ("normal", "full")
#: Forgotten request ids are deleted once every this many versions of a layer.
_PRUNE_EVERY = 32

# Writers of one process queue on a lock per file: SQLite's busy handler polls with
# sleeps of up to 100 ms, which would throttle threads that only wait for each other.
_WRITE_LOCKS: dict[str, threading.Lock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(path: str) -> threading.Lock:
    key = os.path.realpath(path)
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(key, threading.Lock())


def _row(record: Record) -> tuple:
    fields = encode_record(record)
    return tuple(fields[f] for f in _FIELDS)


def _decode(name: str, row) -> Record:
    return decode_record(name, dict(zip(_FIELDS, row)))


def _write_stats(conn: sqlite3.Connection, record: Record, request_id: str | None, digest: bytes | None,
                 window: int) -> None:
    """Write a mutated layer's statistics and remember ``request_id`` (and ``digest``) at its new version."""
    name, version = record.name, record.stats.version
    conn.execute(_UPDATE, (*_row(record)[1:], name))
    if request_id is not None:
        conn.execute("INSERT OR REPLACE INTO request_ids (layer, request_id, version, digest) VALUES (?, ?, ?, ?)",
                     (name, request_id, version, digest))
    if version % _PRUNE_EVERY == 0:
        # Lookups ignore ids older than the window anyway; pruning in batches is cheaper.
        conn.execute("DELETE FROM request_ids WHERE layer = ? AND version <= ?", (name, version - window))


class SqliteBackend(Backend):
    """Layers in one SQLite file, shared by threads (one connection each) and processes."""

    def __init__(self, path: str, *, synchronous: str = "normal", busy_timeout: float = 30.0,
                 request_window: int = REQUEST_WINDOW):
        if synchronous not in _SYNCHRONOUS:
            raise InvalidArgument(f"synchronous={synchronous!r}: expected 'normal' or 'full'", field="synchronous")
        if path in ("", ":memory:") or path.startswith("file:"):
            raise InvalidArgument(
                f"sqlite path {path!r}: expected a file path (for a process-local store use memory://)", field="url"
            )
        self.path = path
        self.synchronous = synchronous
        self.busy_timeout = float(busy_timeout)
        self.request_window = int(request_window)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._write_lock = _write_lock(path)
        conn = self._conn()
        with _errors(path):
            # WAL is a property of the file; switching needs a moment of exclusive access.
            conn.execute("PRAGMA journal_mode=WAL")
        try:
            if self._format(conn) != FORMAT:
                self._write(self._prepare)
        except BaseException:
            self.close()
            raise

    def _format(self, conn: sqlite3.Connection) -> int | None:
        """The file's storage format (None: no tables yet); refuses a newer one."""
        with _errors(self.path):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:  # format 1 kept no version; a new file has no tables
                version = 1 if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'layers'").fetchone() else None
        where = f"sqlite store {os.path.basename(self.path) or self.path!r}"
        return None if version is None else check_format(version, where, field="url")

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Create the tables, or migrate an older file; in the write transaction, so one process does it."""
        found = self._format(conn)
        if found is None:
            for statement in _SCHEMA:
                conn.execute(statement)
        elif found < FORMAT:
            if found < 3:
                for statement in _FORMAT_3:
                    conn.execute(statement)
            if found < 4:
                for statement in _FORMAT_4:
                    conn.execute(statement)
            # Older formats differ in the config JSON too: rewrite it in the current one.
            rows = conn.execute("SELECT name, config FROM layers").fetchall()
            conn.executemany("UPDATE layers SET config = ? WHERE name = ?",
                             [(encode_config(decode_config(text)), name) for name, text in rows])
        conn.execute(f"PRAGMA user_version = {FORMAT}")

    @classmethod
    def from_url(cls, url: str, **options) -> "SqliteBackend":
        parts = urlsplit(url)
        if parts.netloc:
            raise InvalidArgument(
                f"store URL {url!r} has a host: expected sqlite:///relative/path.db or sqlite:////absolute/path.db",
                field="url",
            )
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        query = dict(parse_qsl(parts.query))
        kwargs = {**query, **options}
        unknown = set(kwargs) - {"synchronous", "busy_timeout", "request_window"}
        if unknown:
            raise InvalidArgument(
                f"unknown sqlite options {sorted(unknown)}: expected synchronous, busy_timeout, request_window",
                field="url",
            )
        try:
            if "busy_timeout" in kwargs:
                kwargs["busy_timeout"] = float(kwargs["busy_timeout"])
            if "request_window" in kwargs:
                kwargs["request_window"] = int(kwargs["request_window"])
        except ValueError as exc:
            raise InvalidArgument(f"bad sqlite option in {url!r}: {exc}", field="url") from None
        if "synchronous" in kwargs:
            kwargs["synchronous"] = str(kwargs["synchronous"]).lower()
        return cls(path, **kwargs)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreUnavailable(f"sqlite store {self.path!r} is closed")
        with _errors(self.path):
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        self._local.conn = conn
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _write(self, body):
        """Run ``body(conn)`` inside BEGIN IMMEDIATE ... COMMIT; roll back if it raises."""
        conn = self._conn()
        with self._write_lock, _errors(self.path):
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return result

    def insert(self, record: Record) -> Record:
        def body(conn):
            row = conn.execute(_SELECT, (record.name,)).fetchone()
            if row is not None:
                return _decode(record.name, row)
            conn.execute(_INSERT, (record.name, *_row(record)))
            return record

        return self._write(body)

    def get(self, name: str) -> Record | None:
        with _errors(self.path):
            row = self._conn().execute(_SELECT, (name,)).fetchone()
        return None if row is None else _decode(name, row)

    def names(self, prefix: str = "", after: str | None = None, limit: int | None = None) -> list[str]:
        # Names are ASCII below '\x7f', so [prefix, prefix + '\x7f') is exactly the names with the prefix.
        sql = "SELECT name FROM layers WHERE name >= ? AND name < ?"
        args: list = [prefix, prefix + "\x7f"]
        if after is not None:
            sql += " AND name > ?"
            args.append(after)
        sql += " ORDER BY name"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        with _errors(self.path):
            return [r[0] for r in self._conn().execute(sql, args).fetchall()]

    def delete(self, name: str) -> bool:
        def body(conn):
            conn.execute("DELETE FROM request_ids WHERE layer = ?", (name,))
            return conn.execute("DELETE FROM layers WHERE name = ?", (name,)).rowcount > 0

        return self._write(body)

    def mutate(self, names, fn, request_id, create=None, digest=None):
        window = self.request_window

        def body(conn):
            records, fresh = {}, set()
            for name in names:
                row = conn.execute(_SELECT, (name,)).fetchone()
                if row is not None:
                    records[name] = _decode(name, row)
                elif create and name in create:
                    records[name] = create[name]
                    fresh.add(name)
                    conn.execute(_INSERT, (name, *_row(create[name])))
                else:
                    raise not_found(name)
            for name in names:
                if request_id is not None and name not in fresh:
                    seen = conn.execute(
                        "SELECT digest FROM request_ids WHERE layer = ? AND request_id = ? AND version >= ?",
                        (name, request_id, oldest_remembered(records[name], window)),
                    ).fetchone()
                    if seen is not None and is_retry(name, request_id, seen[0], digest):
                        continue
                new = fn(records[name])
                if new is not None:
                    records[name] = new
                    _write_stats(conn, new, request_id, digest, window)
            return records

        return self._write(body)

    def close(self) -> None:
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()


class _errors:
    """Turn sqlite3 failures into StoreUnavailable (naming the file); let store errors through."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, sqlite3.Error):
            where = os.path.basename(self.path) or self.path
            raise StoreUnavailable(f"sqlite store {where!r}: {exc}") from exc
        return False
