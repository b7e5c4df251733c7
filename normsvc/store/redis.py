"""``redis://host:port/db``: records in Redis, shared by every process and replica that opens it.

Needs the ``redis`` package (``pip install normsvc[redis]``); ``rediss://``
connects with TLS.  Options (URL query or keyword arguments):
``prefix`` (key namespace, default ``normsvc``; several stores can share one
Redis database), ``request_window`` (as for every backend),
``socket_timeout`` (seconds, default 10).

Keys, with a Redis Cluster hash tag per layer (``{name}``: everything a
layer owns lives in one hash slot)::

    {prefix}:{name}:layer    hash: the fields of records.encode_record, plus "rev"
    {prefix}:{name}:ids      sorted set: request id -> the version it made
    {prefix}:{name}:digests  hash: request id -> the digest of its content
    {prefix}:names           sorted set (all scores 0): every layer name, for listing
    {prefix}:format          the storage format (records.FORMAT)
    {prefix}:changes         pub/sub channel: the name of every layer written

Atomicity is optimistic and enforced inside Redis, with the statistics
computed once, in Python (the same code, so the same bits, as every other
backend): ``mutate`` reads the records (one MULTI/EXEC, so the reads are one
snapshot), calls the pure ``fn``, then commits every written layer with ONE
Lua script that first checks each layer's ``rev`` (a counter every write
moves on) and writes nothing unless all are unchanged.  On a conflict the
call reads and computes again.  A committed script is all or nothing: Redis
runs it alone, and with ``appendonly yes`` it is logged as one unit.

Durability is Redis's (docs/scaling.md): with ``appendfsync always`` an
acknowledged update survives a crash of Redis; with ``everysec`` up to a
second of them may be lost; without AOF, what the last snapshot holds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .backend import REQUEST_WINDOW, Backend, is_retry, not_found, oldest_remembered
from ..errors import InvalidArgument, StoreUnavailable
from .records import FORMAT, Record, check_format, decode_record, encode_record

__all__ = ["RedisBackend"]

log = logging.getLogger("normsvc.store")

#: Attempts of one mutate before it gives up under contention (each conflict means another writer won).
MAX_ATTEMPTS = 1000

# KEYS: layer, names.  ARGV: name, then field, value pairs.  1 if inserted, 0 if the name existed.
_INSERT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'rev', 0, unpack(ARGV, 2))
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
"""

# KEYS: names, channel, then per layer: layer, ids, digests.
# ARGV: n, window, request_id ('' for none), digest, then per layer:
#   name, expected rev ('' for a layer to create), version, remember (1: record request_id), k, k field/value pairs.
# Returns 0 when committed, or i (1-based) of the first layer whose rev moved (nothing written).
_COMMIT = """
local n, window, rid, digest = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local pos, layers = 5, {}
for i = 1, n do
  local k = tonumber(ARGV[pos + 4])
  layers[i] = {name = ARGV[pos], rev = ARGV[pos + 1], version = tonumber(ARGV[pos + 2]),
               remember = ARGV[pos + 3] == '1', first = pos + 5, last = pos + 4 + 2 * k}
  pos = pos + 5 + 2 * k
  local key = KEYS[3 * i]
  local current = redis.call('HGET', key, 'rev')
  if layers[i].rev == '' then
    if current then return i end
  elseif current ~= layers[i].rev then
    return i
  end
end
for i = 1, n do
  local l, key, ids, digests = layers[i], KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  if l.rev == '' then
    redis.call('HSET', key, 'rev', 0)
    redis.call('ZADD', KEYS[1], 0, l.name)
  end
  if l.last >= l.first then
    redis.call('HSET', key, unpack(ARGV, l.first, l.last))
  end
  redis.call('HINCRBY', key, 'rev', 1)
  if l.remember and rid ~= '' then
    redis.call('ZADD', ids, l.version, rid)
    redis.call('HSET', digests, rid, digest)
    local old = redis.call('ZRANGEBYSCORE', ids, '-inf', l.version - window)
    if #old > 0 then
      redis.call('HDEL', digests, unpack(old))
      redis.call('ZREMRANGEBYSCORE', ids, '-inf', l.version - window)
    end
  end
  redis.call('PUBLISH', KEYS[2], l.name)
end
return 0
"""

# KEYS: layer, ids, digests, names, channel.  ARGV: name.  1 if the layer existed.
_DELETE = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
if existed == 1 then redis.call('PUBLISH', KEYS[5], ARGV[1]) end
return existed
"""

_TEXT_FIELDS = ("config", "shape", "steps")


class _errors:
    """Turn connection failures into StoreUnavailable (naming the store); let store errors through."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        import redis

        if exc_type is not None and issubclass(exc_type, redis.RedisError):
            raise StoreUnavailable(f"redis store {self.where}: {exc}") from exc
        return False


class RedisBackend(Backend):
    """Records in Redis; see the module docstring for the keys and the commit script."""

    shared = True

    def __init__(self, client, *, prefix: str = "normsvc", request_window: int = REQUEST_WINDOW,
                 where: str = "redis"):
        self.redis = client
        self.prefix = prefix
        self.request_window = int(request_window)
        self.where = where
        self.channel = f"{prefix}:changes"
        self._stripes = [threading.Lock() for _ in range(64)]
        self._names_key = f"{prefix}:names"
        with _errors(where):
            self._insert = client.register_script(_INSERT)
            self._commit = client.register_script(_COMMIT)
            self._delete = client.register_script(_DELETE)
            self._check_format()

    @classmethod
    def from_url(cls, url: str, **options) -> "RedisBackend":
        try:
            import redis
        except ImportError:  # pragma: no cover - the extra is not installed
            raise InvalidArgument(f"store URL {url!r} needs the redis package: pip install 'normsvc[redis]'",
                                  field="url") from None
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        mine = {key: query.pop(key) for key in ("prefix", "request_window", "socket_timeout") if key in query}
        mine.update(options)
        unknown = set(mine) - {"prefix", "request_window", "socket_timeout"}
        if unknown:
            raise InvalidArgument(f"unknown redis options {sorted(unknown)}: expected prefix, request_window, "
                                  "socket_timeout (or the redis client's URL options)", field="url")
        try:
            window = int(mine.get("request_window", REQUEST_WINDOW))
            timeout = float(mine.get("socket_timeout", 10.0))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"bad redis option in {url!r}: {exc}", field="url") from None
        prefix = str(mine.get("prefix", "normsvc"))
        if window < 1 or not prefix or "{" in prefix or "}" in prefix:
            raise InvalidArgument(f"store URL {url!r}: expected request_window >= 1 and a prefix without braces",
                                  field="url")
        client_url = urlunsplit(parts._replace(query=urlencode(query)))
        try:
            client = redis.Redis.from_url(client_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        except ValueError as exc:
            raise InvalidArgument(f"store URL {url!r}: {exc}", field="url") from None
        port = f":{parts.port}" if parts.port else ""
        where = urlunsplit(parts._replace(netloc=f"{parts.hostname or ''}{port}", query=""))  # no password
        try:
            return cls(client, prefix=prefix, request_window=window, where=where)
        except TypeError as exc:  # the redis client takes unknown URL options to the first connection
            client.close()
            raise InvalidArgument(f"store URL {url!r}: {exc}: expected prefix, request_window, socket_timeout "
                                  "or the redis client's URL options", field="url") from None

    # --- keys -----------------------------------------------------------------

    def _keys(self, name: str) -> tuple[str, str, str]:
        tag = f"{self.prefix}:{{{name}}}"
        return f"{tag}:layer", f"{tag}:ids", f"{tag}:digests"

    def _check_format(self) -> None:
        key = f"{self.prefix}:format"
        found = self.redis.get(key)
        if found is None:
            self.redis.set(key, FORMAT, nx=True)
            found = self.redis.get(key)
        check_format(int(found), f"redis store {self.where} (prefix {self.prefix!r})", field="url")

    # --- reads ----------------------------------------------------------------

    @staticmethod
    def _decode(name: str, fields: dict) -> Record:
        fields = {k.decode(): v for k, v in fields.items()}
        for key in _TEXT_FIELDS:
            if key in fields:
                fields[key] = fields[key].decode()
        return decode_record(name, fields)

    def get(self, name: str) -> Record | None:
        with _errors(self.where):
            fields = self.redis.hgetall(self._keys(name)[0])
        return self._decode(name, fields) if fields else None

    def names(self, prefix: str = "", after: str | None = None, limit: int | None = None) -> list[str]:
        low = f"[{prefix}" if prefix else "-"
        if after is not None and after >= prefix:
            low = f"({after}"
        high = f"({prefix}\x7f" if prefix else "+"
        with _errors(self.where):
            if limit is None:
                found = self.redis.zrangebylex(self._names_key, low, high)
            else:
                found = self.redis.zrangebylex(self._names_key, low, high, start=0, num=int(limit))
        return [n.decode() for n in found]

    # --- writes ---------------------------------------------------------------

    def insert(self, record: Record) -> Record:
        layer = self._keys(record.name)[0]
        pairs = [item for kv in encode_record(record).items() for item in kv]
        with _errors(self.where):
            self._insert(keys=[layer, self._names_key], args=[record.name, *pairs])
        return self.require(record.name)

    def delete(self, name: str) -> bool:
        with _errors(self.where):
            return bool(self._delete(keys=[*self._keys(name), self._names_key, self.channel], args=[name]))

    def _snapshot(self, names, request_id):
        """Each layer's fields and rev, and what it remembers of ``request_id``, read as one snapshot."""
        pipe = self.redis.pipeline(transaction=True)
        for name in names:
            layer, ids, digests = self._keys(name)
            pipe.hgetall(layer)
            if request_id is not None:
                pipe.zscore(ids, request_id)
                pipe.hget(digests, request_id)
        out, step = pipe.execute(), 3 if request_id is not None else 1
        return {name: out[i * step:(i + 1) * step] for i, name in enumerate(names)}

    def mutate(self, names, fn, request_id, create=None, digest=None):
        names = list(dict.fromkeys(names))
        # Writers of one process queue per layer (striped locks, taken in order): only writers in other
        # processes or replicas can make a commit conflict, and a conflict retries after a random pause.
        stripes = sorted({hash(name) % len(self._stripes) for name in names})
        for i in stripes:
            self._stripes[i].acquire()
        try:
            with _errors(self.where):
                for attempt in range(MAX_ATTEMPTS):
                    result = self._attempt(names, fn, request_id, create, digest)
                    if result is not None:
                        return result
                    time.sleep(random.uniform(0.0, 0.0002 * min(attempt + 1, 25)))
        finally:
            for i in reversed(stripes):
                self._stripes[i].release()
        raise StoreUnavailable(f"redis store {self.where}: {MAX_ATTEMPTS} conflicting writers in a row on "
                               f"{names[:4]}: expected less contention (retry later)")

    def _attempt(self, names, fn, request_id, create, digest):
        """One optimistic try: the records after the call, or None when another writer came first."""
        snapshot = self._snapshot(names, request_id)
        records, revs, fresh = {}, {}, set()
        for name in names:
            fields, *seen = snapshot[name]
            if fields:
                records[name], revs[name] = self._decode(name, fields), fields[b"rev"].decode()
            elif create and name in create:
                records[name], revs[name] = create[name], ""
                fresh.add(name)
            else:
                raise not_found(name)
        writes = {name: records[name] for name in fresh}
        remember = set()
        for name in names:
            if request_id is not None and name not in fresh:
                version, remembered = snapshot[name][1:]
                if version is not None and version >= oldest_remembered(records[name], self.request_window) \
                        and is_retry(name, request_id, remembered, digest):
                    continue
            new = fn(records[name])
            if new is not None:
                records[name] = writes[name] = new
                remember.add(name)
        if not writes:
            return records
        keys, args = [self._names_key, self.channel], [len(writes), self.request_window, request_id or "",
                                                       digest or b""]
        for name, record in writes.items():
            keys += self._keys(name)
            fields = encode_record(record)
            if name not in fresh:
                del fields["config"]  # a layer's config never changes
            args += [name, revs[name], record.stats.version, int(name in remember), len(fields)]
            args += [item for kv in fields.items() for item in kv]
        if self._commit(keys=keys, args=args) != 0:
            return None
        return records

    # --- change notices -------------------------------------------------------

    def subscribe(self, callback) -> "callable":
        """Call ``callback(name)`` (on a thread of its own) after every write to a layer, whoever made
        it; returns the function that stops it.  Notices sent while the connection is down are lost
        (the server's watchers poll the store as well)."""
        import redis

        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        stopped = threading.Event()

        def listen() -> None:
            while not stopped.is_set():
                try:
                    if not pubsub.subscribed:
                        pubsub.subscribe(self.channel)
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "message":
                        callback(message["data"].decode())
                except (redis.RedisError, OSError) as exc:
                    if stopped.is_set():
                        break
                    log.warning("redis store %s: change notices interrupted (%s); retrying", self.where, exc)
                    stopped.wait(1.0)
                except Exception:  # noqa: BLE001 - a failing callback must not end the notices
                    log.exception("redis store %s: a change notice handler failed", self.where)
            pubsub.close()

        thread = threading.Thread(target=listen, name="normsvc-redis-changes", daemon=True)
        thread.start()

        def stop() -> None:
            stopped.set()
            thread.join(2.0)

        return stop

    def close(self) -> None:
        self.redis.close()

