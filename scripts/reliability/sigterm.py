"""SIGTERM with calls in flight: every call the server accepted before the signal finishes.

`normsvc serve --grace G` on a sqlite file, ROUNDS times.  While these run:

* 6 clients call UpdateStats in a loop (one layer, a request id each);
* 2 ranks call AllReduceMoments step after step (world size 2, one group);
* one rank waits alone in AllReduceMoments (its partner never comes);
* 3 WatchLayer streams follow two layers;
* a NormalizeStream sends half its chunks before the signal and the rest after,

the server gets SIGTERM (after SECONDS of load).  Then: the process must exit
0 within the grace period (plus a margin); the store (opened directly) must
hold every acknowledged update and no other (an update applied but not
acknowledged would be a call accepted and then failed); every AllReduce step
both ranks were answered OK for is applied once, and no other; the
NormalizeStream must finish OK with every byte of y; WatchLayer streams end
with UNAVAILABLE (the documented end at shutdown) after strictly increasing
versions.  Calls made after the signal are refused at once, not failed
half-way (refused, not applied: UNAVAILABLE, and for some CANCELLED, which
the table shows).  A rank waiting in AllReduceMoments whose partner is
refused after the signal cannot complete: how and when it ends is reported.

    python scripts/reliability/sigterm.py --rounds 3 --seconds 1
"""

from __future__ import annotations

import collections
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

from reliability.common import Deadline, ServerProcess, machine, parser, pb, pb_grpc, print_table, random_moments

FEATURES = 8
WRITERS = 6
WATCHERS = 3
CALL_TIMEOUT = 120.0


@dataclass
class Round:
    grace: float
    acked: int = 0
    applied: int = 0
    writer_errors: collections.Counter = field(default_factory=collections.Counter)  # code -> n; "latest": s
    allreduce_ok_steps: int = 0
    allreduce_applied: int = 0
    allreduce_errors: collections.Counter = field(default_factory=collections.Counter)
    allreduce_violations: list = field(default_factory=list)
    lone: str = ""
    lone_after: float = float("nan")
    lone_untouched: bool = False
    stream: str = ""
    watch_ends: collections.Counter = field(default_factory=collections.Counter)
    watch_disorder: int = 0
    watch_messages: int = 0
    exit_code: int | None = None
    exit_after: float = float("nan")

    @property
    def accepted_then_failed(self) -> int:
        """Calls the server accepted before the signal that did not finish OK (the lone rank excepted)."""
        return (max(self.applied - self.acked, 0) + len(self.allreduce_violations) + (self.stream != "OK")
                + self.watch_disorder)

    @property
    def ok(self) -> bool:
        return (self.accepted_then_failed == 0 and self.acked == self.applied and self.exit_code == 0
                and self.exit_after <= self.grace + 30 and self.writer_errors["latest"] < self.grace / 2
                and set(self.watch_ends) <= {"UNAVAILABLE"} and self.lone_untouched)


def _writer(stub, k: int, signalled: dict, counts: list, errors: collections.Counter, lock):
    rng = np.random.default_rng(k)
    for i in range(1_000_000):
        request = pb.UpdateStatsRequest(updates=[pb.LayerMoments(layer="t/bn", moments=random_moments(rng, FEATURES))],
                                        request_id=f"w{k}-{i}")
        try:
            stub.UpdateStats(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            with lock:
                errors[exc.code().name] += 1
                errors["latest"] = max(errors["latest"], time.monotonic() - signalled.get("at", float("nan")))
            return
        counts[k] += 1


def _rank(stub, rank: int, outcomes: dict, signalled: dict, lock):
    rng = np.random.default_rng(100 + rank)
    for step in range(1_000_000):
        request = pb.AllReduceMomentsRequest(group="pair", step=step, rank=rank, world_size=2, run="sigterm",
                                             moments=[pb.LayerMoments(layer="t/ar", moments=random_moments(rng, FEATURES))])
        try:
            stub.AllReduceMoments(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            with lock:
                outcomes[rank, step] = exc.code().name
                outcomes["after", rank] = time.monotonic() - signalled.get("at", float("nan"))
            return
        with lock:
            outcomes[rank, step] = "OK"


def _lone(stub, box: dict, signalled: dict):
    request = pb.AllReduceMomentsRequest(group="lone", step=0, rank=0, world_size=2, run="sigterm",
                                         moments=[pb.LayerMoments(layer="t/lone", moments=random_moments(
                                             np.random.default_rng(7), FEATURES))])
    box["sent"] = time.monotonic()
    try:
        stub.AllReduceMoments(request, timeout=CALL_TIMEOUT)
        box["code"] = "OK"
    except grpc.RpcError as exc:
        box["code"] = exc.code().name
    box["after"] = time.monotonic() - signalled.get("at", float("nan"))


def _watch(stub, box: list):
    versions = collections.defaultdict(list)
    end = "ended"
    try:
        for message in stub.WatchLayer(pb.WatchLayerRequest(names=["t/bn", "t/ar"]), timeout=CALL_TIMEOUT):
            versions[message.layer].append(message.stats.version)
    except grpc.RpcError as exc:
        end = exc.code().name
    box.append((end, versions))


def _stream(stub, box: dict, half_sent: threading.Event, release: threading.Event):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 256))
    parts = np.array_split(x.reshape(-1), 16)

    def requests():
        yield pb.NormalizeStreamRequest(header=pb.NormalizeStreamHeader(
            layer="t/ln", dtype=pb.DTYPE_FLOAT64, shape=x.shape, mode=pb.MODE_TRAINING))
        for i, part in enumerate(parts):
            if i == len(parts) // 2:
                half_sent.set()
                release.wait(CALL_TIMEOUT)
            yield pb.NormalizeStreamRequest(chunk=part.tobytes())

    try:
        received = 0
        for message in stub.NormalizeStream(requests(), timeout=CALL_TIMEOUT):
            received += len(message.chunk)
        box["code"] = "OK" if received == x.nbytes else f"OK with {received} of {x.nbytes} bytes"
    except grpc.RpcError as exc:
        box["code"] = exc.code().name


def one_round(folder: Path, grace: float, seconds: float, index: int) -> Round:
    from normsvc.store import Store

    result = Round(grace)
    db = folder / f"sigterm{index}.db"
    lock = threading.Lock()
    server = ServerProcess(f"sqlite:///{db}", "--grace", str(grace))
    try:
        channels = [server.channel() for _ in range(WRITERS + 6)]
        stubs = [pb_grpc.NormServiceStub(c) for c in channels]
        setup = stubs[0]
        for name, config in (("t/bn", pb.LayerConfig(num_features=[FEATURES])),
                             ("t/ar", pb.LayerConfig(num_features=[FEATURES])),
                             ("t/lone", pb.LayerConfig(num_features=[FEATURES])),
                             ("t/ln", pb.LayerConfig(kind=pb.LAYER_KIND_LAYER))):
            setup.CreateLayer(pb.CreateLayerRequest(name=name, config=config), timeout=30)
        signalled, counts, outcomes, lone, streamed, watches = {}, [0] * WRITERS, {}, {}, {}, []
        half_sent, release = threading.Event(), threading.Event()
        threads = [threading.Thread(target=_watch, args=(stubs[WRITERS + i], watches)) for i in range(WATCHERS)]
        threads += [threading.Thread(target=_stream, args=(stubs[WRITERS + 3], streamed, half_sent, release))]
        threads += [threading.Thread(target=_lone, args=(stubs[WRITERS + 4], lone, signalled))]
        threads += [threading.Thread(target=_rank, args=(stubs[WRITERS + 5 - r], r, outcomes, signalled, lock))
                    for r in (0, 1)]
        threads += [threading.Thread(target=_writer, args=(stubs[k], k, signalled, counts, result.writer_errors, lock))
                    for k in range(WRITERS)]
        for t in threads:
            t.daemon = True
            t.start()
        half_sent.wait(30)
        ready = Deadline(seconds + 30)
        time.sleep(seconds)
        while (sum(counts) < 20 or "sent" not in lone) and not ready.expired():
            time.sleep(0.01)
        time.sleep(0.2)  # the lone rank is waiting
        signalled["at"] = time.monotonic()
        server.terminate()
        time.sleep(min(0.5, grace / 4))
        release.set()  # the stream's second half goes after the signal
        result.exit_code = server.wait(grace + 60)
        result.exit_after = time.monotonic() - signalled["at"]
        for t in threads:
            t.join(30)
        for c in channels:
            c.close()
    finally:
        release.set()
        server.close()
    result.acked = sum(counts)
    result.lone, result.lone_after, result.stream = lone.get("code", "no answer"), lone.get("after"), \
        streamed.get("code", "no answer")
    for end, versions in watches:
        result.watch_ends[end] += 1
        for seen in versions.values():
            result.watch_messages += len(seen)
            result.watch_disorder += sum(1 for a, b in zip(seen, seen[1:]) if b <= a)
    after = {rank: outcomes.pop(("after", rank), None) for rank in (0, 1)}
    ok_steps = sorted({s for (r, s), code in outcomes.items() if code == "OK" and outcomes.get((1 - r, s)) == "OK"})
    result.allreduce_ok_steps = len(ok_steps)
    for (rank, step), code in sorted(outcomes.items()):
        if code != "OK":
            waited = after[rank] is not None and after[rank] > grace / 2
            result.allreduce_errors[f"{code} at the end of the grace" if waited else code] += 1
            if outcomes.get((1 - rank, step)) == "OK":
                result.allreduce_violations.append(f"step {step}: rank {rank} {code}, rank {1 - rank} OK")
    with Store.open(f"sqlite:///{db}") as store:
        result.applied = store.layer("t/bn").stats().num_batches
        ar = store.layer("t/ar").stats()
        result.allreduce_applied = 0 if ar.last_step is None else ar.last_step + 1
        if result.allreduce_applied != result.allreduce_ok_steps:
            result.allreduce_violations.append(f"{result.allreduce_applied} steps applied, "
                                               f"{result.allreduce_ok_steps} answered OK to both ranks")
        result.lone_untouched = store.layer("t/lone").stats().version == 0
    return result


def run(rounds: int = 3, seconds: float = 1.0, grace: float = 10.0, folder=None, log=print) -> list[Round]:
    results = []
    with tempfile.TemporaryDirectory(prefix="normsvc-sigterm-", dir=folder) as tmp:
        for i in range(rounds):
            results.append(one_round(Path(tmp), grace, seconds, i))
            r = results[-1]
            log(f"  round {i + 1}/{rounds}: exit {r.exit_code} after {r.exit_after:.2f} s, acknowledged {r.acked}, "
                f"applied {r.applied}, lone rank {r.lone} after {r.lone_after:.2f} s")
    return results


def _refused(errors: collections.Counter) -> str:
    codes = ", ".join(f"{code} {n}" for code, n in sorted(errors.items()) if code != "latest")
    return f"{codes} (the last {errors['latest']:.2f} s after)" if codes else "-"


HEADERS = ("round", "UpdateStats acknowledged / applied", "refused after the signal", "AllReduce steps OK / applied",
           "AllReduce calls refused or unfinishable", "lone waiting rank", "NormalizeStream across the signal",
           "WatchLayer ends (messages)", "accepted, then failed", "exit code, seconds after SIGTERM")


def rows(results):
    return [(i + 1, f"{r.acked} / {r.applied}", _refused(r.writer_errors),
             f"{r.allreduce_ok_steps} / {r.allreduce_applied}",
             ", ".join(f"{code} {n}" for code, n in sorted(r.allreduce_errors.items())) or "-",
             f"{r.lone} after {r.lone_after:.2f} s" + ("" if r.lone_untouched else ", layer changed"), r.stream,
             f"{dict(r.watch_ends)} ({r.watch_messages})", r.accepted_then_failed,
             f"{r.exit_code}, {r.exit_after:.2f}") for i, r in enumerate(results)]


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0], rounds=3, seconds=1.0, rounds_help="servers signalled, one after another",
               seconds_help="load before each signal")
    p.add_argument("--grace", type=float, default=10.0, help="the server's --grace (default 10)")
    args = p.parse_args(argv)
    print(machine(), flush=True)
    results = run(args.rounds, args.seconds, args.grace)
    print_table(f"SIGTERM with calls in flight (`normsvc serve --grace {args.grace:g}`, sqlite)", HEADERS, rows(results))
    for r in results:
        for line in r.allreduce_violations[:5]:
            print("  " + line)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
