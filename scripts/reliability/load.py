"""Load: concurrent clients mixing UpdateStats, Normalize, GetLayer, ListLayers, with WatchLayer streams.

`normsvc serve` runs on a sqlite file (synchronous NORMAL).  CLIENTS clients,
each with its own channel (its own connection), spread over PROCESSES client
processes, call without pause for SECONDS:

    35%  UpdateStats of the client's own layer          (counted)
    10%  UpdateStats of one of 4 shared layers         (counted)
    10%  Normalize, training mode, of its own layer     (an update: counted)
    10%  Normalize, inference mode, of its own layer
    20%  GetLayer of its own layer and a shared one
    15%  ListLayers of every layer (page of 100; half with statistics)

and WATCHERS WatchLayer streams follow the shared layers.  Afterwards every
layer's num_batches and version must equal the acknowledged updates exactly;
every stream must have seen strictly increasing versions up to the last one.
Any error is unexpected.  Latency is measured per call in the client (p50,
p99), throughput is acknowledged calls per second, and the server's RSS is
read from /proc/<pid>/status.

    python scripts/reliability/load.py --seconds 60 --clients 64
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
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
    Deadline, ServerProcess, encode, machine, parser, pb, pb_grpc, percentile, print_table, random_moments,
)

FEATURES = 16
SHARED = 4
PREFIX = "load/"
CALL_TIMEOUT = 30.0
MIX = (("UpdateStats", 0.35), ("UpdateStats shared", 0.10), ("Normalize training", 0.10),
       ("Normalize inference", 0.10), ("GetLayer", 0.20), ("ListLayers", 0.15))


def own(k: int) -> str:
    return f"{PREFIX}client{k:03d}"


def shared(j: int) -> str:
    return f"{PREFIX}shared{j}"


# --- the client processes --------------------------------------------------------------------

def _client(k: int, address: str, seconds: float, seed: int, out: dict, lock: threading.Lock):
    rng = np.random.default_rng([seed, k])
    kinds = [m for m, _ in MIX]
    weights = np.array([w for _, w in MIX])
    x = encode(rng.normal(size=(32, FEATURES)).astype(np.float32))
    counts, lat, errors = collections.Counter(), collections.defaultdict(list), collections.Counter()
    samples = []
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.NormServiceStub(channel)
        deadline = Deadline(seconds)
        for i in range(10_000_000):
            if deadline.expired():
                break
            kind = kinds[rng.choice(len(kinds), p=weights)]
            j = int(rng.integers(SHARED))
            counted = None
            if kind == "UpdateStats" or kind == "UpdateStats shared":
                counted = own(k) if kind == "UpdateStats" else shared(j)
                call, request = stub.UpdateStats, pb.UpdateStatsRequest(
                    updates=[pb.LayerMoments(layer=counted, moments=random_moments(rng, FEATURES))],
                    request_id=f"c{k}-{i}")
            elif kind == "Normalize training":
                counted = own(k)
                call, request = stub.Normalize, pb.NormalizeRequest(layer=own(k), x=x, mode=pb.MODE_TRAINING,
                                                                    request_id=f"c{k}-{i}")
            elif kind == "Normalize inference":
                call, request = stub.Normalize, pb.NormalizeRequest(layer=own(k), x=x, mode=pb.MODE_INFERENCE)
            elif kind == "GetLayer":
                call, request = stub.GetLayer, pb.GetLayerRequest(names=[own(k), shared(j)])
            else:
                call, request = stub.ListLayers, pb.ListLayersRequest(prefix=PREFIX, page_size=100,
                                                                      include_stats=bool(i % 2))
            started = time.perf_counter()
            try:
                call(request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                errors[kind, exc.code().name] += 1
                if len(samples) < 5:
                    samples.append(f"{kind}: {exc.code().name} {exc.details()}")
                continue
            lat[kind].append(time.perf_counter() - started)
            if counted is not None:
                counts[counted] += 1
    with lock:
        out["counts"].update(counts)
        out["errors"].update(errors)
        out["samples"] += samples
        for kind, values in lat.items():
            out["lat"][kind].extend(values)


def client_process(ids, address: str, seconds: float, seed: int) -> dict:
    """Run clients ``ids`` as threads of this process; returns their counts, latencies and errors."""
    out = {"counts": collections.Counter(), "errors": collections.Counter(), "samples": [],
           "lat": collections.defaultdict(list)}
    lock = threading.Lock()
    threads = [threading.Thread(target=_client, args=(k, address, seconds, seed, out, lock), daemon=True)
               for k in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 2 * CALL_TIMEOUT)
    out["lat"] = {kind: np.asarray(v, dtype=np.float32) for kind, v in out["lat"].items()}
    return out


# --- the watchers ----------------------------------------------------------------------------

class Watcher(threading.Thread):
    """A WatchLayer stream on the shared layers; records the versions it sees per layer."""

    def __init__(self, address: str, seconds: float):
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.seconds = seconds
        self.versions = collections.defaultdict(list)
        self.ready = threading.Event()
        self.error = None
        self.call = None

    def run(self):
        stub = pb_grpc.NormServiceStub(self.channel)
        try:
            self.call = stub.WatchLayer(pb.WatchLayerRequest(names=[shared(j) for j in range(SHARED)]),
                                        timeout=self.seconds)
            for message in self.call:
                self.versions[message.layer].append(message.stats.version)
                if len(self.versions) == SHARED:
                    self.ready.set()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.ready.set()

    def caught_up(self, final: dict) -> bool:
        return all(self.versions[name] and self.versions[name][-1] >= v for name, v in final.items())

    def stop(self):
        if self.call is not None:
            self.call.cancel()
        self.join(30)
        self.channel.close()

    def check(self, final: dict) -> dict:
        """Out-of-order deliveries, versions never delivered, and whether it reached each final version."""
        disorder = gaps = behind = 0
        for name, last in final.items():
            seen = self.versions[name]
            disorder += sum(1 for a, b in zip(seen, seen[1:]) if b <= a)
            gaps += max(last - seen[0], 0) + 1 - len(set(seen)) if seen else last + 1
            behind += (not seen) or seen[-1] != last
        return {"disorder": disorder, "gaps": gaps, "behind": behind, "messages": sum(map(len, self.versions.values()))}


# --- one run -----------------------------------------------------------------------------------

@dataclass
class Result:
    clients: int
    seconds: float
    calls: int = 0
    errors: dict = field(default_factory=dict)
    error_samples: list = field(default_factory=list)
    count_mismatches: list = field(default_factory=list)
    latency: dict = field(default_factory=dict)  # kind -> (calls, p50 ms, p99 ms)
    rss_mib: dict = field(default_factory=dict)  # start, end, max sampled, peak (VmHWM)
    watch: list = field(default_factory=list)
    updates: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors and not self.count_mismatches and all(
            w["disorder"] == 0 and w["gaps"] == 0 and w["behind"] == 0 and not w["error"] for w in self.watch)


def run(seconds: float = 60.0, clients: int = 64, watchers: int = 4, processes: int = 4, seed: int = 0,
        folder=None, log=print) -> Result:
    result = Result(clients, seconds)
    with tempfile.TemporaryDirectory(prefix="normsvc-load-", dir=folder) as tmp, \
            ServerProcess(f"sqlite:///{Path(tmp) / 'load.db'}") as server, server.channel() as channel:
        stub = pb_grpc.NormServiceStub(channel)
        for name in [own(k) for k in range(clients)] + [shared(j) for j in range(SHARED)]:
            stub.CreateLayer(pb.CreateLayerRequest(name=name, config=pb.LayerConfig(num_features=[FEATURES])),
                             timeout=CALL_TIMEOUT)
        watching = [Watcher(server.address, seconds + 120) for _ in range(watchers)]
        for w in watching:
            w.start()
        for w in watching:
            w.ready.wait(30)
        rss = [server.rss_mib()]
        result.rss_mib["start"] = rss[0]
        log(f"  server pid {server.pid}: {rss[0]:.0f} MiB before the load; {clients} clients in {processes} "
            f"processes for {seconds:g} s")
        groups = [list(range(clients))[p::processes] for p in range(processes)]
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            # the processes import numpy and grpc first; the clients' clocks start in each one
            futures = [pool.submit(client_process, ids, server.address, seconds, seed) for ids in groups if ids]
            sampling = Deadline(seconds + 3 * CALL_TIMEOUT + 60)
            while not all(f.done() for f in futures) and not sampling.expired():
                time.sleep(0.5)
                rss.append(server.rss_mib())
            parts = [f.result(timeout=sampling.left() + 1) for f in futures]
        result.rss_mib.update(end=server.rss_mib(), max=max(rss), peak=server.status("VmHWM") / 1024)
        counts, errors, lat = collections.Counter(), collections.Counter(), collections.defaultdict(list)
        for part in parts:
            counts.update(part["counts"])
            errors.update(part["errors"])
            result.error_samples += part["samples"]
            for kind, values in part["lat"].items():
                lat[kind].append(values)
        result.errors = {f"{k} {c}": n for (k, c), n in errors.items()}
        lat = {kind: np.concatenate(v) for kind, v in lat.items()}
        everything = np.concatenate(list(lat.values())) if lat else np.array([])
        result.calls = len(everything)
        for kind, values in [*sorted(lat.items()), ("all", everything)]:
            result.latency[kind] = (len(values), 1e3 * percentile(values, 50), 1e3 * percentile(values, 99))
        # exact counts: every acknowledged update, once
        names = [own(k) for k in range(clients)] + [shared(j) for j in range(SHARED)]
        final = {}
        for start in range(0, len(names), 1000):
            for layer in stub.GetLayer(pb.GetLayerRequest(names=names[start:start + 1000]), timeout=CALL_TIMEOUT).layers:
                s, want = layer.stats, counts.get(layer.name, 0)
                if not s.num_batches == s.version == want:
                    result.count_mismatches.append(f"{layer.name}: num_batches {s.num_batches}, version "
                                                   f"{s.version}, acknowledged updates {want}")
                if layer.name.startswith(f"{PREFIX}shared"):
                    final[layer.name] = s.version
        result.updates = sum(counts.values())
        catch_up = Deadline(15)
        while not all(w.caught_up(final) or w.error for w in watching) and not catch_up.expired():
            time.sleep(0.1)
        for w in watching:
            w.stop()
            result.watch.append({**w.check(final), "error": w.error})
    return result


def report(result: Result, seconds: float) -> None:
    rows = [(kind, n, n / seconds, p50, p99) for kind, (n, p50, p99) in result.latency.items()]
    print_table(f"{result.clients} clients for {seconds:g} s against `normsvc serve` (sqlite, NORMAL)",
                ("call", "acknowledged", "per second", "p50 ms", "p99 ms"), rows)
    print_table("checks", ("check", "value"), [
        ("unexpected errors", sum(result.errors.values())),
        ("layers whose num_batches/version differ from the acknowledged updates", len(result.count_mismatches)),
        ("acknowledged updates (UpdateStats + Normalize training)", result.updates),
        ("WatchLayer streams", len(result.watch)),
        ("stream messages", sum(w["messages"] for w in result.watch)),
        ("versions out of order / never delivered / streams short of the last",
         f"{sum(w['disorder'] for w in result.watch)} / {sum(w['gaps'] for w in result.watch)} / "
         f"{sum(w['behind'] for w in result.watch)}"),
        ("stream errors", sum(1 for w in result.watch if w["error"])),
        ("server RSS MiB: start / end / max sampled / peak (VmHWM)",
         " / ".join(f"{result.rss_mib[k]:.0f}" for k in ("start", "end", "max", "peak"))),
    ])
    for line in result.error_samples[:5] + result.count_mismatches[:5]:
        print("  " + line)
    for w in result.watch:
        if w["error"]:
            print(f"  stream error: {w['error']}")


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0], rounds=1, seconds=60.0, rounds_help="runs, one after another",
               seconds_help="how long the clients call")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--watchers", type=int, default=4)
    p.add_argument("--processes", type=int, default=4, help="client processes the clients are spread over")
    args = p.parse_args(argv)
    print(machine(), flush=True)
    ok = True
    for round_ in range(args.rounds):
        result = run(args.seconds, args.clients, args.watchers, args.processes, args.seed + round_)
        report(result, args.seconds)
        ok &= result.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
