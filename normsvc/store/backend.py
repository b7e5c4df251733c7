"""The backend contract, and the registry that opens a backend from a URL.

All validation and all statistics live above the backend (in
:mod:`normsvc.store.store`, :mod:`~normsvc.store.mutations` and
:mod:`normsvc.running`); a backend only keeps :class:`Record` values and
makes one read-modify-write atomic.  The contract every backend honours:

* ``mutate(names, fn, request_id, create=None)`` reads the records of
  ``names``, calls ``fn(record)`` for each and writes every result, all or
  nothing, as one atomic step per call (one transaction).  ``fn`` returns the
  new record, or None for "nothing changes" (no write, no version bump), or
  raises to abort the whole call with nothing written.  ``fn`` is pure, so an
  optimistic backend may call it again after a conflict (Redis: ``WATCH`` the
  layer keys, read, compute, ``MULTI``/``EXEC``, retry on ``WatchError``).
* A name missing from the backend is inserted from ``create[name]`` in the
  same atomic step, before ``fn`` sees it (so a crash leaves the new layers
  with their first statistics, or no trace of them); a name missing from
  ``create`` too raises LayerNotFound and nothing is written.
* A layer that already applied ``request_id`` is skipped (``fn`` is not
  called, its current record is returned) when the request's ``digest``
  (its content) is the one remembered with the id; with another digest the
  call raises :func:`reused` and nothing is written.  Each layer remembers
  the request ids (with digests) of its last ``request_window`` versions,
  since its last reset (``record.steps.origin``), written in the same atomic
  step as the record.
* ``insert(record)`` stores a new layer unless the name exists, and returns
  what is stored (either way), atomically.
* A layer's config never changes after it is stored: ``mutate`` only writes
  statistics (a backend may skip rewriting the config).
* A backend that persists records stores them in the format of
  :mod:`normsvc.store.records`, migrates older stored state when it opens it,
  and refuses state newer than it understands.

A backend that several processes or replicas share (``shared = True``:
Redis) also provides ``subscribe(callback) -> stop``, a notice of every
write whoever made it; a server on it then keeps its AllReduceMoments
rendezvous in the backend too and forwards the notices to its watchers.

A new backend registers its URL scheme in :data:`BACKENDS` and provides
``from_url(url, **options)``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

from ..errors import AlreadyExists, InvalidArgument, LayerNotFound
from .records import Record

__all__ = ["Backend", "BACKENDS", "REQUEST_WINDOW", "open_backend", "not_found", "is_retry", "oldest_remembered"]

#: Request ids a layer remembers: those of its last this-many versions.
REQUEST_WINDOW = 1024

#: URL scheme -> "module:Class" of the backend (imported on first use).
BACKENDS = {
    "memory": "normsvc.store.memory:MemoryBackend",
    "sqlite": "normsvc.store.sqlite:SqliteBackend",
    "redis": "normsvc.store.redis:RedisBackend",
}


def not_found(name: str) -> LayerNotFound:
    """The error for a layer that does not exist."""
    return LayerNotFound(f"no layer named {name!r}: expected an existing layer (create it first)", layer=name)


def oldest_remembered(record: Record, window: int) -> int:
    """The lowest version whose request ids the layer still remembers: the last ``window``
    versions, none from before its last reset (the reset's own id is remembered)."""
    return max(record.stats.version - window + 1, record.steps.origin)


def is_retry(name: str, request_id: str, remembered: bytes | None, digest: bytes | None) -> bool:
    """Whether a request whose id the layer remembers (with ``remembered``) is a retry.

    True when the contents agree (or either digest is unknown: ids remembered
    by an older normsvc, without a digest or with one of another kind);
    AlreadyExists ``REQUEST_ID_REUSED`` when they differ.
    """
    if remembered is None or digest is None or len(remembered) != len(digest) or bytes(remembered) == digest:
        return True
    raise AlreadyExists(
        f"request_id {request_id!r} was used for another request to layer {name!r}: a request id is an "
        "idempotency key bound to its content; expected the same content again (a retry) or a new id",
        layer=name, field="request_id", reason="REQUEST_ID_REUSED",
    )


class Backend(ABC):
    """Where records live; see the module docstring for the contract."""

    request_window: int = REQUEST_WINDOW
    #: Whether other processes or replicas write the same records (then ``subscribe`` exists).
    shared: bool = False

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, **options) -> "Backend":
        """Open the backend a URL names."""

    @abstractmethod
    def insert(self, record: Record) -> Record:
        """Store ``record`` unless its name exists; return the stored record."""

    @abstractmethod
    def get(self, name: str) -> Record | None:
        """The record of ``name``, or None."""

    @abstractmethod
    def names(self, prefix: str = "", after: str | None = None, limit: int | None = None) -> list[str]:
        """Sorted layer names starting with ``prefix``, greater than ``after``, at most ``limit``."""

    @abstractmethod
    def delete(self, name: str) -> bool:
        """Remove a layer and its request ids; False if it did not exist."""

    @abstractmethod
    def mutate(
        self,
        names: Sequence[str],
        fn: Callable[[Record], Record | None],
        request_id: str | None,
        create: Mapping[str, Record] | None = None,
        digest: bytes | None = None,
    ) -> dict[str, Record]:
        """Atomic read-modify-write of several layers; returns each layer's record afterwards.

        Names missing from the backend are first inserted from ``create``;
        LayerNotFound (nothing written) for a name missing from both.
        """

    def require(self, name: str) -> Record:
        """The record of ``name``; LayerNotFound if there is none."""
        record = self.get(name)
        if record is None:
            raise not_found(name)
        return record

    def close(self) -> None:
        """Release connections."""


def open_backend(url: str, options: dict) -> Backend:
    """The backend ``url`` names (its scheme picks the class in :data:`BACKENDS`)."""
    if not isinstance(url, str):
        raise InvalidArgument(f"store URL must be a string, got {type(url).__name__}", field="url")
    scheme = urlsplit(url).scheme
    if scheme == "rediss":
        scheme = "redis"
    target = BACKENDS.get(scheme)
    if target is None:
        raise InvalidArgument(
            f"store URL {url!r} has no known scheme: expected memory://, sqlite:///path/to/stats.db"
            + (" or redis://host:port/db" if "redis" in BACKENDS else ""),
            field="url",
        )
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls).from_url(url, **options)
