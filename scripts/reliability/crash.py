"""kill -9 of `normsvc serve` while clients push: every acknowledged request is there exactly once.

For each workload and each sqlite ``synchronous`` setting, ROUNDS times:

1. clients (threads, one call in flight each, no client retries) push requests
   to ``normsvc serve`` on a sqlite file and record each acknowledged one;
2. after the first acknowledgement and a random delay (up to SECONDS) the
   server gets SIGKILL;
3. the server restarts on the same file; each client's call that was in
   flight at the kill is resolved: retried with the same request id (applied
   once whether or not it had committed), or, for ImportStats (no request
   id), checked to be all there or not there at all;
4. the acknowledged (and resolved) requests are replayed, once each, on a
   reference server over ``memory://`` (never killed), and every layer of the
   killed server must equal the reference bit for bit (statistics, count,
   num_batches, version, frozen flag, run and last step; not updated_at).

A layer behind the reference lost an acknowledged request; ahead of it, a
request was applied twice (or one never acknowledged nor resolved came
through); any other difference is a mismatch.  A request over several layers
that is in some and not in others is partial.  Clients own their layers
(step contributions share theirs, merged in rank order), so the replay's order
between clients does not matter.

    python scripts/reliability/crash.py --rounds 10 --seconds 1.0
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `reliability` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import numpy as np

from reliability.common import (
    Deadline, ServerProcess, all_layers, machine, parser, pb, pb_grpc, print_table, random_moments, stats_key,
)

FEATURES = 8
CALL_TIMEOUT = 60.0
MAX_OPS_PER_ROUND = 100_000  # a bound: a round ends at the kill long before


# --- workloads ------------------------------------------------------------------------------

class Workload:
    """A kind of request the clients push.  Subclasses say which layers exist and what op ``i`` of a client is."""

    name = ""
    clients = 4
    retryable = True  # in-flight requests carry a request id: retried after the restart
    tells_commits = True  # whether a retry that changes nothing shows the request had committed

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self) -> list:
        """(method, request) pairs run once on both servers before the first round."""
        return []

    def request(self, client: int, i: int):
        """(method, request) of client ``client``'s ``i``-th op."""
        raise NotImplementedError

    def rng(self, client: int, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, client, i])

    def after_ack(self, client: int, i: int) -> bool:
        """Called after each acknowledgement; False ends the client's round."""
        return True

    def start_round(self) -> None:
        pass

    def end_round(self) -> None:
        pass

    def replay_order(self, ops: list) -> list:
        return ops

    def partial(self, layers: dict, ops: list) -> int:
        """Requests among ``ops`` (all applied) that are in some of their layers and not in others."""
        return 0


def _create(name: str, convention: int, features: int = FEATURES):
    return "CreateLayer", pb.CreateLayerRequest(name=name, config=pb.LayerConfig(
        convention=convention, num_features=[features]))


class SingleLayer(Workload):
    """UpdateStats of one layer per request; each client its own layer."""

    name = "single-layer UpdateStats"
    prefix = "crash/single/"

    def setup(self):
        return [_create(f"{self.prefix}c{k}", pb.CONVENTION_TORCH) for k in range(self.clients)]

    def request(self, client, i):
        entry = pb.LayerMoments(layer=f"{self.prefix}c{client}", moments=random_moments(self.rng(client, i), FEATURES))
        return "UpdateStats", pb.UpdateStatsRequest(updates=[entry], request_id=f"single-c{client}-{i}")


class ManyLayers(Workload):
    """UpdateStats of 53 layers in one all-or-nothing request (a ResNet-50's batch norms)."""

    name = "53-layer UpdateStats"
    prefix = "crash/multi/"
    layers = 53

    def names(self, client):
        return [f"{self.prefix}c{client}/bn{j:02d}" for j in range(self.layers)]

    def setup(self):
        return [_create(n, pb.CONVENTION_KERAS) for k in range(self.clients) for n in self.names(k)]

    def request(self, client, i):
        rng = self.rng(client, i)
        updates = [pb.LayerMoments(layer=n, moments=random_moments(rng, FEATURES)) for n in self.names(client)]
        return "UpdateStats", pb.UpdateStatsRequest(updates=updates, request_id=f"multi-c{client}-{i}")

    def partial(self, layers, ops):
        bad = 0
        for k in range(self.clients):
            versions = {layers[n].stats.version if n in layers else -1 for n in self.names(k)}
            bad += len(versions) > 1
        return bad


class Imports(Workload):
    """ImportStats of a safetensors file of thousands of new layers, under a new prefix each time."""

    name = "ImportStats of 2000 new layers"
    prefix = "crash/import/"
    clients = 2
    retryable = False
    layers = 2000

    def __init__(self, seed, layers: int = 2000):
        super().__init__(seed)
        self.layers = layers
        self.name = f"ImportStats of {layers} new layers"
        self.file = _import_file(layers, seed)

    def request(self, client, i):
        return "ImportStats", pb.ImportStatsRequest(safetensors=self.file, add_prefix=f"{self.prefix}c{client}/i{i}/")

    def partial(self, layers, ops):
        bad = 0
        for _, request in ops:
            present = sum(1 for n in layers if n.startswith(request.add_prefix))
            bad += present not in (0, self.layers)
        return bad


def _import_file(n: int, seed: int) -> bytes:
    """A safetensors file (as ExportStats writes it) of ``n`` torch layers with statistics."""
    from normsvc.testing import running_server

    rng = np.random.default_rng(seed)
    with running_server("memory://") as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.NormServiceStub(channel)
        names = [f"blk{j // 100}/bn{j % 100}" for j in range(n)]
        for name in names:
            stub.CreateLayer(_create(name, pb.CONVENTION_TORCH)[1], timeout=CALL_TIMEOUT)
        for start in range(0, n, 500):
            updates = [pb.LayerMoments(layer=name, moments=random_moments(rng, FEATURES))
                       for name in names[start:start + 500]]
            stub.UpdateStats(pb.UpdateStatsRequest(updates=updates), timeout=CALL_TIMEOUT)
        return stub.ExportStats(pb.ExportStatsRequest(naming=pb.NAMING_KERAS), timeout=CALL_TIMEOUT).safetensors


class FreezeUnfreeze(Workload):
    """Freeze, Unfreeze and UpdateStats interleaved on each client's layer, each with a request id."""

    name = "Freeze/Unfreeze interleaved"
    prefix = "crash/freeze/"

    def setup(self):
        return [_create(f"{self.prefix}c{k}", pb.CONVENTION_TORCH) for k in range(self.clients)]

    def request(self, client, i):
        name, rid = f"{self.prefix}c{client}", f"freeze-c{client}-{i}"
        if i % 3 == 0:
            return "Freeze", pb.FreezeRequest(name=name, request_id=rid)
        if i % 3 == 1:
            return "Unfreeze", pb.UnfreezeRequest(name=name, request_id=rid)
        entry = pb.LayerMoments(layer=name, moments=random_moments(self.rng(client, i), FEATURES))
        return "UpdateStats", pb.UpdateStatsRequest(updates=[entry], request_id=rid)


class StepContributions(Workload):
    """UpdateStats with step/rank/world_size/run: 4 ranks contribute to 3 shared layers each step.

    Ranks keep in step (a barrier after each acknowledgement), so no step is
    ever closed incomplete; a step applies once all 4 contributions are in.
    """

    name = "step contributions (4 ranks)"
    tells_commits = False  # a contribution that leaves its step open changes no statistics
    prefix = "crash/steps/"
    layers = ("bn_torch", "bn_keras", "bn_cumulative")

    def setup(self):
        conventions = (pb.CONVENTION_TORCH, pb.CONVENTION_KERAS, pb.CONVENTION_CUMULATIVE)
        return [_create(self.prefix + n, c) for n, c in zip(self.layers, conventions)]

    def start_round(self):
        self.barrier = threading.Barrier(self.clients, timeout=CALL_TIMEOUT)

    def end_round(self):
        self.barrier.abort()

    def request(self, client, i):
        rng = self.rng(client, i)
        updates = [pb.LayerMoments(layer=self.prefix + n, moments=random_moments(rng, FEATURES)) for n in self.layers]
        return "UpdateStats", pb.UpdateStatsRequest(updates=updates, step=i, rank=client, world_size=self.clients,
                                                    run="crash", request_id=f"steps-r{client}-s{i}")

    def after_ack(self, client, i):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            return False
        return True

    def replay_order(self, ops):
        return sorted(ops, key=lambda op: (op[1].step, op[1].rank))

    def partial(self, layers, ops):
        steps = {layers[self.prefix + n].stats.last_step if self.prefix + n in layers else None for n in self.layers}
        return int(len(steps) > 1)


WORKLOADS = {"single": SingleLayer, "multi53": ManyLayers, "import": Imports, "freeze": FreezeUnfreeze,
             "steps": StepContributions}


# --- one workload: rounds of push, kill -9, restart, resolve, replay, compare ------------------

@dataclass
class Client:
    index: int
    next_op: int = 0
    acked: list = field(default_factory=list)  # (method, request) acknowledged this round
    resolved: list = field(default_factory=list)  # the in-flight request, when it is (now) applied
    in_flight: tuple | None = None
    error: tuple = ()  # (code, whether the kill came first) of the call that ended the round


@dataclass
class Result:
    workload: str
    synchronous: str
    kills: int = 0
    acknowledged: int = 0
    in_flight: int = 0  # calls in flight at the kills
    committed_unacked: int = 0  # of those, found applied after the restart
    lost: int = 0  # layers behind the reference
    duplicated: int = 0  # layers ahead of the reference, or present without being acknowledged
    mismatched: int = 0
    partial: int = 0
    unexpected: list = field(default_factory=list)
    layers: int = 0
    seconds: float = 0.0
    tells_commits: bool = True

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.mismatched or self.partial or self.unexpected)


def _push(workload: Workload, client: Client, stub, killed: threading.Event):
    """Client loop: one call at a time until a call fails (the kill) or the workload stops it."""
    i = client.next_op
    for _ in range(MAX_OPS_PER_ROUND):
        method, request = workload.request(client.index, i)
        try:
            getattr(stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            client.in_flight = (method, request)
            client.error = (exc.code(), killed.is_set())
            break
        client.acked.append((method, request))
        i += 1
        client.next_op = i
        if not workload.after_ack(client.index, i - 1):
            break


def _compare(actual: dict, expected: dict, result: Result) -> None:
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or got.stats.version < want.stats.version:
            result.lost += 1
        elif got.stats.version > want.stats.version:
            result.duplicated += 1
        elif stats_key(got.stats) != stats_key(want.stats) or got.config != want.config:
            result.mismatched += 1
    result.duplicated += len(set(actual) - set(expected))


def run_workload(workload: Workload, synchronous: str, rounds: int, seconds: float, folder: Path,
                 rng: random.Random, log=print) -> Result:
    from normsvc.testing import running_server

    result = Result(workload.name, synchronous, tells_commits=workload.tells_commits)
    started = time.monotonic()
    url = f"sqlite:///{folder / (workload.prefix.strip('/').replace('/', '-') + '-' + synchronous + '.db')}"
    url += f"?synchronous={synchronous}"
    clients = [Client(k) for k in range(workload.clients)]
    server = ServerProcess(url)
    with running_server("memory://") as ref_server, grpc.insecure_channel(ref_server.address) as ref_channel:
        ref = pb_grpc.NormServiceStub(ref_channel)
        try:
            with server.channel() as channel:
                stub = pb_grpc.NormServiceStub(channel)
                for method, request in workload.setup():
                    getattr(stub, method)(request, timeout=CALL_TIMEOUT)
                    getattr(ref, method)(request, timeout=CALL_TIMEOUT)
            for round_ in range(rounds):
                server = _round(workload, clients, server, url, ref, seconds, rng, result)
                log(f"  {workload.name} [{synchronous}] kill {round_ + 1}/{rounds}: acknowledged "
                    f"{result.acknowledged}, lost {result.lost}, duplicated {result.duplicated}, "
                    f"partial {result.partial}, mismatched {result.mismatched}")
        finally:
            server.close()
    result.seconds = time.monotonic() - started
    return result


def _round(workload, clients, server, url, ref, seconds, rng, result) -> ServerProcess:
    killed = threading.Event()
    workload.start_round()
    with server.channel() as channel:
        stub = pb_grpc.NormServiceStub(channel)
        threads = [threading.Thread(target=_push, args=(workload, c, stub, killed), daemon=True) for c in clients]
        before = sum(len(c.acked) for c in clients)
        for t in threads:
            t.start()
        wait = Deadline(CALL_TIMEOUT)
        while sum(len(c.acked) for c in clients) == before and not wait.expired() and any(t.is_alive() for t in threads):
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, seconds))
        killed.set()
        server.kill9()
        result.kills += 1
        workload.end_round()
        for t in threads:
            t.join(CALL_TIMEOUT)
    server = ServerProcess(url)
    with server.channel() as channel:
        stub = pb_grpc.NormServiceStub(channel)
        for c in clients:
            _resolve(workload, c, stub, result)
        result.acknowledged += sum(len(c.acked) for c in clients)
        ops = [op for c in clients for op in c.acked + c.resolved]
        for method, request in workload.replay_order(ops):
            getattr(ref, method)(request, timeout=CALL_TIMEOUT)
        if workload.retryable:  # the last acknowledged request again: a retry, applied nowhere twice
            for c in clients:
                if c.acked:
                    method, request = c.acked[-1]
                    getattr(stub, method)(request, timeout=CALL_TIMEOUT)
                    getattr(ref, method)(request, timeout=CALL_TIMEOUT)
        for c in clients:
            c.acked, c.resolved = [], []
        actual = all_layers(stub, workload.prefix)
        _compare(actual, all_layers(ref, workload.prefix), result)
        result.partial += workload.partial(actual, ops)
        result.layers = len(actual)
    return server


def _resolve(workload: Workload, client: Client, stub, result: Result) -> None:
    """After the restart: settle the call that was in flight at the kill (if any)."""
    if client.in_flight is None:
        return
    method, request = client.in_flight
    code, after_kill = client.error
    client.in_flight = None
    if not after_kill:
        result.unexpected.append(f"{method} failed before the kill: {code}")
        return
    result.in_flight += 1
    if workload.retryable:
        before = stub.GetLayer(pb.GetLayerRequest(names=_layers_of(request)), timeout=CALL_TIMEOUT)
        try:
            getattr(stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            result.unexpected.append(f"retry of the in-flight {method} failed: {exc.code()} {exc.details()}")
            return
        after = stub.GetLayer(pb.GetLayerRequest(names=_layers_of(request)), timeout=CALL_TIMEOUT)
        if workload.tells_commits and [stats_key(x.stats) for x in before.layers] == \
                [stats_key(x.stats) for x in after.layers]:
            result.committed_unacked += 1  # the retry changed nothing: it had committed before the kill
    else:
        present = len(all_layers(stub, request.add_prefix, include_stats=False))
        if present == 0:
            return  # not applied: nothing to replay
        result.committed_unacked += 1
    client.resolved.append((method, request))
    client.next_op += 1


def _layers_of(request) -> list:
    if isinstance(request, pb.UpdateStatsRequest):
        return [u.layer for u in request.updates]
    return [request.name]


def every(workloads=tuple(WORKLOADS), synchronous=("normal", "full")) -> list:
    return [(w, s) for w in workloads for s in synchronous]


def run(pairs=None, rounds: int = 10, seconds: float = 1.0, seed: int = 0, folder=None, log=print,
        import_layers: int = 2000) -> list[Result]:
    """``rounds`` kills for each (workload key, synchronous setting) of ``pairs`` (default: all of them)."""
    rng = random.Random(seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="normsvc-crash-", dir=folder) as tmp:
        made = {}
        for key, sync in pairs or every():
            if key not in made:
                made[key] = Imports(seed, import_layers) if key == "import" else WORKLOADS[key](seed)
            results.append(run_workload(made[key], sync, rounds, seconds, Path(tmp), rng, log=log))
    return results


HEADERS = ("workload", "synchronous", "kill -9", "acknowledged", "in flight at kill", "of which committed",
           "lost", "duplicated", "partial", "mismatched", "unexpected errors", "layers", "seconds")


def rows(results):
    return [(r.workload, r.synchronous.upper(), r.kills, r.acknowledged, r.in_flight,
             r.committed_unacked if r.tells_commits else "-", r.lost,
             r.duplicated, r.partial, r.mismatched, len(r.unexpected), r.layers, r.seconds) for r in results]


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0], rounds=10, seconds=1.0, rounds_help="kill -9 per workload and setting",
               seconds_help="longest random delay between the first acknowledgement and the kill")
    p.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="only these (repeatable)")
    p.add_argument("--synchronous", action="append", choices=("normal", "full"), help="only these (repeatable)")
    args = p.parse_args(argv)
    print(machine(), flush=True)
    pairs = every(tuple(args.workload or WORKLOADS), tuple(args.synchronous or ("normal", "full")))
    results = run(pairs, args.rounds, args.seconds, args.seed)
    print_table(f"kill -9 of `normsvc serve` (sqlite), {args.rounds} kills per row", HEADERS, rows(results))
    for r in results:
        for line in r.unexpected[:10]:
            print(f"unexpected ({r.workload}, {r.synchronous}): {line}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
