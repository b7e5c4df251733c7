"""AllReduceMoments across replicas: the rendezvous of :mod:`.allreduce`, kept in the shared Redis store.

Several ``normsvc serve`` replicas on one ``redis://`` store behave as one
service only if the ranks of a step may reach different replicas, so the
meeting point lives in Redis, under the store's key prefix, one hash slot
per step (``{prefix}:ar:{<run>|<group>|<step>}:...``):

``meta``      world_size, the first rank's layers and options, its rank
``arrived``   rank -> its moments (an AllReduceMomentsRequest's bytes)
``joined``    every rank that came (for the "missing ranks" message)
``completed`` set once all ranks are in: latecomers are duplicates
``result``    the running statistics after the step, or the error, once applied
``done``      a list the waiting ranks block on (one token each)

Joining is one Lua script (check, add, and detect the last rank
atomically).  The last rank to arrive is the leader: it merges the moments
in rank order, runs ``reduce`` once (the store's one update for the step),
writes ``result`` and wakes the others, who merge the same contributions
in the same order themselves (so every rank gets the same bits without
sending them again).  Semantics and errors are those of
:class:`~.allreduce.Rendezvous`; what is kept expires by itself (the
step's state after twice the longest wait, the completion mark after
``remember_seconds``).
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from .._proto import normsvc_pb2 as pb
from ..errors import AlreadyExists, InvalidArgument, NormsvcError, Unavailable
from ..moments import merge_all
from ..wire import messages
from ..wire.status import error_class
from ..wire.tensors import decode_moments
from .allreduce import describe_step, options_text, shapes_text, gave_up

__all__ = ["SharedRendezvous"]

_JOIN = """
if redis.call('EXISTS', KEYS[4]) == 1 then return {'completed'} end
local ws = redis.call('HGET', KEYS[1], 'world_size')
if not ws then
  redis.call('HSET', KEYS[1], 'world_size', ARGV[2], 'signature', ARGV[3], 'first_rank', ARGV[1])
else
  local first = redis.call('HGET', KEYS[1], 'first_rank')
  if ws ~= ARGV[2] then return {'world_size', ws, first} end
  local signature = redis.call('HGET', KEYS[1], 'signature')
  if signature ~= ARGV[3] then return {'signature', signature, first} end
  if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {'duplicate'} end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[1])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
if redis.call('HLEN', KEYS[2]) == tonumber(ARGV[2]) then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[6])
  return {'leader'}
end
return {'waiting'}
"""

_WITHDRAW = """
if redis.call('EXISTS', KEYS[4]) == 1 then return {'completed'} end
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[1]) end
return {'withdrawn', unpack(redis.call('SMEMBERS', KEYS[3]))}
"""


def _payload(moments: dict) -> bytes:
    request = pb.AllReduceMomentsRequest()
    for name, m in moments.items():
        messages.moments_to_pb(name, m, request.moments.add())
    return request.SerializeToString()


def _moments(payload: bytes) -> dict:
    request = pb.AllReduceMomentsRequest.FromString(payload)
    return {entry.layer: decode_moments(entry.moments, field="moments") for entry in request.moments}


def _stats_bytes(stats: dict) -> bytes:
    response = pb.AllReduceMomentsResponse()
    for name, s in stats.items():
        messages.stats_to_pb(s, response.stats.add(layer=name).stats)
    return response.SerializeToString()


def _stats_from(data: bytes) -> dict:
    return {e.layer: messages.stats_from_pb(e.stats) for e in pb.AllReduceMomentsResponse.FromString(data).stats}


def _signature(moments: dict, options: tuple) -> str:
    layers = sorted((name, list(m.mean.shape)) for name, m in moments.items())
    return json.dumps([layers, list(options)])


class SharedRendezvous:
    """The meeting point of the ranks of each ``((run, group), step)``, in a Redis store.

    Takes the store's :class:`~normsvc.store.redis.RedisBackend`; the other
    parameters are :class:`~.allreduce.Rendezvous`'s.
    """

    def __init__(self, backend, *, max_wait: float = 300.0, max_world_size: int = 4096,
                 remember_seconds: float = 3600.0, poll: float = 0.2,
                 on_outcome: Callable[[str], None] | None = None):
        self.redis = backend.redis
        self.prefix = backend.prefix
        self.max_wait = max_wait
        self.max_world_size = max_world_size
        self.remember_seconds = remember_seconds
        self.poll = poll
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._join = self.redis.register_script(_JOIN)
        self._withdraw = self.redis.register_script(_WITHDRAW)

    def pending(self) -> dict:
        """Steps still waiting are in Redis, seen by every replica: not listed per replica."""
        return {}

    def _keys(self, key) -> dict:
        (run, group), step = key
        tag = f"{self.prefix}:ar:{{{json.dumps([run, group, step])}}}"
        return {part: f"{tag}:{part}" for part in ("meta", "arrived", "joined", "completed", "result", "done")}

    def join(self, group: tuple, step: int, rank: int, world_size: int, moments: dict, *,
             reduce: Callable[[dict], Any], timeout: float | None = None,
             is_active: Callable[[], bool] = lambda: True, options: tuple = ()):
        """As :meth:`.allreduce.Rendezvous.join`: ``(merged, reduce(merged))``, the same on every rank."""
        import redis

        key = (group, int(step))
        if not 1 <= world_size <= self.max_world_size:
            raise InvalidArgument(f"world_size={world_size}: expected 1 to {self.max_world_size}",
                                  field="world_size")
        if not 0 <= rank < world_size:
            raise InvalidArgument(f"rank={rank}: expected 0 <= rank < world_size={world_size}", field="rank")
        if not moments:
            raise InvalidArgument(f"{describe_step(key)}: no layer moments: expected at least one", field="moments")
        timeout = self.max_wait if timeout is None else min(timeout, self.max_wait)
        deadline = time.monotonic() + max(timeout, 0.0)
        keys = self._keys(key)
        order = list(moments)
        try:
            answer = self._join(
                keys=[keys["meta"], keys["arrived"], keys["joined"], keys["completed"]],
                args=[rank, world_size, _signature(moments, options), _payload(moments),
                      int(2000 * self.max_wait), int(1000 * self.remember_seconds)])
            state = answer[0].decode()
            if state != "waiting" and state != "leader":
                self._refuse(key, state, answer[1:], rank, world_size, moments, options)
            if state == "leader":
                return self._lead(keys, world_size, order, reduce)
            return self._wait(key, keys, rank, world_size, deadline, is_active, order)
        except redis.RedisError as exc:
            raise Unavailable(f"{describe_step(key)}: the shared store is unreachable ({exc}): retry") from exc

    def _refuse(self, key, state, found, rank, world_size, moments, options):
        if state in ("completed", "duplicate"):
            what = ("already completed with all ranks: rank {rank} is a duplicate (expected each rank once per "
                    "step; use a new run to start over)" if state == "completed"
                    else "rank {rank} already joined (expected each rank once per step)")
            raise AlreadyExists(f"{describe_step(key)}: " + what.format(rank=rank), field="rank",
                                reason="DUPLICATE_RANK")
        first = int(found[1])
        if state == "world_size":
            raise InvalidArgument(
                f"{describe_step(key)}: rank {rank} says world_size={world_size}, rank {first} said {int(found[0])}: "
                "expected the same world_size from every rank", field="world_size")
        want_layers, want_options = json.loads(found[0])
        layers = sorted((name, list(m.mean.shape)) for name, m in moments.items())
        if layers == want_layers:
            what, got, want, where = ("options", f"update_stats={options_text(options)}",
                                      f"update_stats={options_text(want_options)}", "update_stats")
        else:
            what, got, want, where = "layers and shapes", shapes_text(layers), shapes_text(want_layers), "moments"
        raise InvalidArgument(f"{describe_step(key)}: rank {rank} sent {what} {got}, rank {first} sent {want}: "
                              "expected the same from every rank", field=where)

    def _merged(self, keys, order) -> dict:
        arrived = self.redis.hgetall(keys["arrived"])
        ranks = [_moments(arrived[r]) for r in sorted(arrived, key=int)]
        return {name: merge_all([r[name] for r in ranks]) for name in order}

    def _lead(self, keys, world_size, order, reduce):
        merged = self._merged(keys, order)
        try:
            reduced = reduce(merged)
            result = {"stats": _stats_bytes(reduced).hex()}
            outcome = "completed"
        except NormsvcError as exc:
            result = {"error": {"code": exc.code, "reason": exc.reason, "message": exc.message,
                                "layer": exc.layer, "field": exc.field}}
            outcome = "failed"
        expire = int(1000 * self.remember_seconds)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys["result"], json.dumps(result), px=expire)
        if world_size > 1:
            pipe.rpush(keys["done"], *[b"1"] * (world_size - 1))
            pipe.pexpire(keys["done"], expire)
        pipe.execute()
        self._on_outcome(outcome)
        return merged, self._outcome(result)

    @staticmethod
    def _outcome(result: dict):
        if "error" in result:
            e = result["error"]
            raise error_class(e["reason"], e["code"])(e["message"], layer=e["layer"], field=e["field"],
                                                      reason=e["reason"])
        return _stats_from(bytes.fromhex(result["stats"]))

    def _woken(self, done: str, remaining: float) -> bool:
        """Whether the leader woke us within about ``poll`` seconds.  Redis checks the timeouts of
        blocked calls only every 100 ms or so, so the last stretch before the deadline polls instead."""
        if remaining > 0.15:
            return bool(self.redis.blpop([done], timeout=min(self.poll, remaining - 0.1)))
        if remaining > 0:
            if self.redis.lpop(done) is not None:
                return True
            time.sleep(min(0.005, remaining))
        return False

    def _wait(self, key, keys, rank, world_size, deadline, is_active, order):
        while True:
            if self._woken(keys["done"], deadline - time.monotonic()):
                break
            remaining = deadline - time.monotonic()
            gone = not is_active()
            if gone or remaining <= 0:
                answer = self._withdraw(keys=[keys["meta"], keys["arrived"], keys["joined"], keys["completed"]],
                                        args=[rank])
                if answer[0].decode() == "withdrawn":
                    joined = {int(r) for r in answer[1:]}
                    missing = sorted(set(range(world_size)) - joined)
                    self._on_outcome("cancelled" if gone else "timed_out")
                    raise gave_up(key, rank, world_size, len(joined), missing, gone)
                # all ranks are in: the leader is applying the step; wait for it (bounded)
                if not self.redis.blpop([keys["done"]], timeout=max(self.max_wait, 1.0)):
                    raise Unavailable(f"{describe_step(key)}: every rank arrived but the step's result never came "
                                      "(the replica applying it went away?): retry with a new step or run")
                break
        result = json.loads(self.redis.get(keys["result"]))
        return self._merged(keys, order), self._outcome(result)
