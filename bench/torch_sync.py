"""normsvc.torch benchmark: ResNet-50's 53 BatchNorm layers in shared mode and in sync mode.

Run with ``python bench/torch_sync.py [--rounds N] [--steps S] [--world W] [--store URL] [--profile]``.

A ``normsvc serve`` subprocess (``--store``, default ``memory://``: the
service, not the disk) runs on this machine, as the trainers do.  The model
is 53 BatchNorm2d layers with ResNet-50's channel counts (64 to 2048, 26,560
channels in all), each on a tiny input of its own (2 x C x 2 x 2), so the
figures are normsvc's cost, not the arithmetic of the normalization.

Shared mode (this process, one rank): the time the TRAINING THREAD spends in
normsvc per step.  Each training forward of the converted model is timed,
and so are torch's ``F.batch_norm`` calls inside it (a timing wrapper, for
that call only): the rest is normsvc's module code, the step's hooks and the
hand-off to the background thread (plus the nn.Module call that any
BatchNorm pays).  The same is measured for plain ``nn.BatchNorm2d`` layers
(torch's own module code) in the same step, alternating which goes first;
medians.  After each forward the script pauses ``--pace`` ms (the rest of a
training step: the background thread sends its step contribution then, as
it would during the backward and the optimizer).  Target: < 1 ms per step,
under 1% of a 100 ms step.  Two more rows time one 53-layer step
contribution (``update_many``) alone: the background thread's request per
step, wall time and its CPU time (the most it can hold the GIL).

Sync mode (``--world`` spawned processes, gloo): one training step's
reductions, a forward reduction per layer in layer order then a backward
reduction per layer in reverse order, as ``normsvc.torch``'s sync mode does
them (``allreduce`` on the rank's ``Client.allreduce_stream()`` of the
layer's count, mean and m2 with ``update_stats=True``, then of its
``sum(dy)`` and ``sum(dy * x_hat)`` with ``update_stats=False``), against
``torch.distributed.all_reduce`` on gloo of the same float64 payloads
(2C + 1, then 2C values).  Cases interleave step by step (a barrier before
each step, the order rotating each round); rank 0's medians.  Target:
normsvc / gloo <= 1.0.  Further rows, for where the time goes: the whole
``normsvc.torch`` sync module (forward + backward of the converted layers,
minus the same plain layers' forward + backward), the same reductions as
unary ``Client.allreduce`` calls (sync mode's way before the stream), the
same on the stream with ``world_size=1`` (no waiting for other ranks:
client, transport and service), and a bare gRPC echo of the same
AllReduceMoments request bytes, on one stream and as unary calls (the
transport alone: ``bench/rpc.py --serve-echo``).  Two columns say where the
CPU goes, summed over each case's timed steps (from /proc, so Linux only)
and divided by the step's 106 reductions: the server process that answers
the case (normsvc, or the echo; every rank's messages, so in the
world_size=1 row every rank's own reductions), and rank 0's process
(every thread).  ``--profile`` adds
cProfile's top functions of the training thread (shared mode) and of rank
0's sync reductions.

Last, sync mode's local work where activations have their real size (no
network: one rank on an in-process Store): one BatchNorm2d's forward and
backward at 32 x 256 x 28 x 28 and 32 x 64 x 112 x 112, converted against
``nn.BatchNorm2d``, alternating.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import queue
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import normsvc
import normsvc.torch
from normsvc import Moments

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling bench/rpc.py, also in spawned ranks (they import this file)
from rpc import resnet50_bn_channels  # noqa: E402


class Layers(nn.Module):
    """The 53 BatchNorm2d layers, each applied to an input of its own."""

    def __init__(self, channels):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for c in channels)

    def forward(self, xs):
        return [bn(x) for bn, x in zip(self.bns, xs)]


def _inputs(channels, seed: int, grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, 2, 2, generator=gen).requires_grad_(grad) for c in channels]


def _start(cmd) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    if " serving on " not in line:
        proc.kill()
        raise SystemExit(f"server did not start ({' '.join(cmd)}): {line!r}")
    return proc, line.split(" serving on ")[1].split()[0]


@contextlib.contextmanager
def _servers(store: str):
    """``normsvc serve`` and bench/rpc.py's echo server, as subprocesses: their addresses and pids."""
    procs = []
    try:
        svc, svc_address = _start([sys.executable, "-m", "normsvc", "serve", "--port", "0", "--store", store,
                                   "--log-level", "WARNING"])
        procs.append(svc)
        echo, echo_address = _start([sys.executable, str(HERE / "rpc.py"), "--serve-echo"])
        procs.append(echo)
        yield svc_address, echo_address, {"normsvc": svc.pid, "echo": echo.pid}
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _profile_text(profile: cProfile.Profile, lines: int = 18) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(lines)
    text = out.getvalue()
    return text[text.find("   ncalls"):].rstrip()


# --- shared mode: the training thread's time in normsvc -------------------------------------


def shared_mode(address: str, rounds: int, steps: int, pace: float, profile: bool) -> dict:
    torch.set_num_threads(1)  # the machine's other core is the server's and the background thread's
    channels = resnet50_bn_channels()
    run = uuid.uuid4().hex[:12]
    xs = _inputs(channels, seed=0)
    plain = Layers(channels).train()
    client = normsvc.Client(address, timeout=60)
    converted = normsvc.torch.convert(Layers(channels), client, mode="shared", prefix=f"bench-torch/{run}/shared/",
                                      run=run, rank=0, world_size=1).train()

    # torch's batch_norm inside each forward, timed in the same call: the rest of a converted
    # forward is normsvc's time on the training thread (with the module call every BatchNorm pays),
    # the rest of a plain forward is torch's own BatchNorm bookkeeping
    kernel = [0.0]
    real_batch_norm = F.batch_norm

    def timed_batch_norm(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_batch_norm(*a, **k)
        finally:
            kernel[0] += time.perf_counter() - t0

    def timing_kernel(model, out):
        def step():
            kernel[0] = 0.0
            F.batch_norm = timed_batch_norm  # torch.nn.functional's, for this call only
            try:
                model(xs)
            finally:
                F.batch_norm = real_batch_norm
            out.append(kernel[0])
        return step

    inside = {"plain": [], "converted": []}
    cases = {"plain": timing_kernel(plain, inside["plain"]), "converted": timing_kernel(converted, inside["converted"])}
    times = {case: [] for case in cases}
    with torch.no_grad():
        for _ in range(10):  # warm up both, and the connection
            for fn in cases.values():
                fn()
                time.sleep(pace)
        normsvc.torch.flush(converted)
        for v in inside.values():
            v.clear()
        for r in range(rounds):
            for s in range(steps):
                order = ("plain", "converted") if (r * steps + s) % 2 == 0 else ("converted", "plain")
                for case in order:
                    t0 = time.perf_counter()
                    cases[case]()
                    times[case].append(time.perf_counter() - t0)
                    time.sleep(pace)  # the rest of the step: the background thread sends meanwhile
        normsvc.torch.flush(converted)  # every step answered: nothing was left behind
        prof_text = ""
        if profile:
            prof = cProfile.Profile()
            for _ in range(100):
                prof.enable()
                converted(xs)
                prof.disable()
                time.sleep(pace)
            normsvc.torch.flush(converted)
            prof_text = _profile_text(prof)
    nbt = int(converted.bns[0].num_batches_tracked)
    # the background thread's request per step: one 53-layer step contribution, timed alone
    rng = np.random.default_rng(1)
    updates = {f"bench-torch/{run}/shared/bns.{i}": normsvc.moments(rng.standard_normal((8, c)), axes=[0])
               for i, c in enumerate(channels)}
    push, push_cpu = [], []
    for step in range(nbt, nbt + 30):
        t0, c0 = time.perf_counter(), time.thread_time()
        client.update_many(updates, step=step, rank=0, world_size=1, run=run)
        push.append(time.perf_counter() - t0)
        push_cpu.append(time.thread_time() - c0)
    normsvc.torch.close(converted)
    client.close()
    rest = {case: [a - b for a, b in zip(times[case], inside[case])] for case in times}
    return {**times, "kernel": inside["converted"], "push": push, "push_cpu": push_cpu, "steps": nbt,
            "profile": prof_text, "normsvc": rest["converted"], "torch_rest": rest["plain"],
            "added": [a - b for a, b in zip(rest["converted"], rest["plain"])],
            "over_plain": [a - b for a, b in zip(times["converted"], times["plain"])]}


# --- sync mode: one step's reductions against gloo ---------------------------------------------


CASES = ("gloo", "normsvc", "unary", "module", "solo", "echo", "stream_echo")


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) process ``pid`` has used so far (Linux; clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sync_rank(rank: int, world: int, address: str, echo_address: str, pids: dict, tmp: str, run: str, rounds: int,
               steps: int, profile: bool) -> None:
    """One rank of the sync-mode benchmark; rank 0 writes its timings to ``tmp``/sync.json."""
    import grpc

    from normsvc._proto import normsvc_pb2 as pb
    from normsvc.wire.messages import moments_to_pb

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=world)
    channels = resnet50_bn_channels()
    client = normsvc.Client(address, timeout=60)
    names = [f"bench-torch/{run}/sync/bn{i:02d}" for i in range(len(channels))]
    unary = [f"bench-torch/{run}/unary/bn{i:02d}" for i in range(len(channels))]
    solo = [f"bench-torch/{run}/solo{rank}/bn{i:02d}" for i in range(len(channels))]
    for i, c in enumerate(channels):
        for name in [solo[i], *([names[i], unary[i]] if rank == 0 else [])]:
            client.create_layer(name, kind="batch", axis=1, convention="torch", momentum=0.1, epsilon=1e-5,
                                num_features=c)
    rng = np.random.default_rng(rank)
    fwd, bwd = [], []
    for c in channels:  # what sync mode sends: count, mean, m2; then sum(dy) and sum(dy * x_hat) as one sample
        x = rng.standard_normal((8, c))
        fwd.append(Moments(np.float64(8.0), x.mean(axis=0), ((x - x.mean(axis=0)) ** 2).sum(axis=0)))
        sums = rng.standard_normal((2, c))
        bwd.append(Moments(np.float64(1.0), sums, np.zeros_like(sums)))
    fwd_t = [torch.from_numpy(np.concatenate([[m.count], m.mean, m.m2])) for m in fwd]  # 2C + 1 float64
    bwd_t = [torch.from_numpy(m.mean.ravel().copy()) for m in bwd]  # 2C float64

    def request(name, m, group, update):
        req = pb.AllReduceMomentsRequest(group=group, step=0, rank=rank, world_size=world, update_stats=update,
                                         run=f"{run}-normsvc", wait_seconds=60.0)
        moments_to_pb(name, m, req.moments.add())
        return req.SerializeToString()

    fwd_bytes = [request(n, m, f"torch.fwd/{n}", True) for n, m in zip(names, fwd)]
    bwd_bytes = [request(n, m, f"torch.bwd/{n}", False) for n, m in zip(names, bwd)]
    channel = grpc.insecure_channel(echo_address)
    echo = channel.unary_unary("/normsvc.v1.NormService/UpdateStats")
    echo_requests = queue.SimpleQueue()
    echo_answers = channel.stream_stream("/normsvc.v1.NormService/AllReduceMomentsStream")(
        iter(echo_requests.get, None))
    streams = {"normsvc": client.allreduce_stream(), "solo": client.allreduce_stream()}

    torch.manual_seed(0)
    plain = Layers(channels).train()
    torch.manual_seed(0)
    module = normsvc.torch.convert(Layers(channels), client, mode="sync", prefix=f"bench-torch/{run}/module/",
                                   run=run, timeout=60).train()
    xs = _inputs(channels, seed=100 + rank, grad=True)
    counter = {"normsvc": 0, "solo": 0, "unary": 0}

    def reductions(layers, world_size, key):
        """One step's reductions as sync mode makes them: on an AllReduceStream (``unary``: one
        Client.allreduce call each, as sync mode did before the stream)."""
        step = counter[key]
        counter[key] += 1
        r = rank if world_size > 1 else 0
        call = client.allreduce if key == "unary" else streams[key].allreduce
        for name, m in zip(layers, fwd):
            call({name: m}, step=step, rank=r, world_size=world_size, group=f"torch.fwd/{name}",
                 update_stats=True, run=f"{run}-{key}")
        for name, m in zip(reversed(layers), reversed(bwd)):
            call({name: m}, step=step, rank=r, world_size=world_size, group=f"torch.bwd/{name}",
                 update_stats=False, run=f"{run}-{key}")

    def fwd_bwd(model):
        outs = model(xs)
        torch.stack([o.sum() for o in outs]).sum().backward()

    def gloo():
        for t in fwd_t:
            dist.all_reduce(t)
        for t in reversed(bwd_t):
            dist.all_reduce(t)

    def echo_step():
        for b in fwd_bytes:
            echo(b)
        for b in reversed(bwd_bytes):
            echo(b)

    def stream_echo_step():
        for b in fwd_bytes:
            echo_requests.put(b)
            next(echo_answers)
        for b in reversed(bwd_bytes):
            echo_requests.put(b)
            next(echo_answers)

    run_case = {"gloo": gloo, "normsvc": lambda: reductions(names, world, "normsvc"),
                "unary": lambda: reductions(unary, world, "unary"),
                "module": lambda: fwd_bwd(module), "plain": lambda: fwd_bwd(plain),
                "solo": lambda: reductions(solo, 1, "solo"), "echo": echo_step, "stream_echo": stream_echo_step}
    order = [*CASES, "plain"]
    for case in order:  # warm up: connections, gloo's pairs, first calls
        for _ in range(2):
            dist.barrier()
            run_case[case]()
    times = {case: [] for case in order}
    # CPU seconds over all timed steps of each case: the server that answers it (none for gloo), this rank
    server_of = {"echo": pids["echo"], "stream_echo": pids["echo"], "gloo": None}
    cpu = {case: [0.0, 0.0] for case in order}
    for r in range(rounds):
        rotated = order[r % len(order):] + order[:r % len(order)]
        for _ in range(steps):
            for case in rotated:
                server = server_of.get(case, pids["normsvc"])
                dist.barrier()
                s0, c0 = _process_cpu(server) if server else 0.0, time.process_time()
                t0 = time.perf_counter()
                run_case[case]()
                times[case].append(time.perf_counter() - t0)
                cpu[case][0] += (_process_cpu(server) - s0) if server else 0.0
                cpu[case][1] += time.process_time() - c0
    prof_text = ""
    if profile:
        prof = cProfile.Profile()
        for _ in range(steps):
            dist.barrier()
            if rank == 0:
                prof.enable()
            reductions(names, world, "normsvc")
            if rank == 0:
                prof.disable()
        prof_text = _profile_text(prof) if rank == 0 else ""
    dist.barrier()
    if rank == 0:
        nbt = int(module.bns[0].num_batches_tracked)
        with open(os.path.join(tmp, "sync.json"), "w") as f:
            json.dump({"times": times, "cpu": cpu, "module_updates": nbt, "profile": prof_text}, f)
    for stream in streams.values():
        stream.close()
    echo_requests.put(None)
    client.close()
    channel.close()
    dist.destroy_process_group()


def sync_mode(address: str, echo_address: str, pids: dict, world: int, rounds: int, steps: int,
              profile: bool) -> dict:
    run = uuid.uuid4().hex[:12]
    with tempfile.TemporaryDirectory(prefix="normsvc-bench-torch-") as tmp:
        mp.spawn(_sync_rank, args=(world, address, echo_address, pids, tmp, run, rounds, steps, profile),
                 nprocs=world, join=True)
        with open(os.path.join(tmp, "sync.json")) as f:
            return json.load(f)


def sync_compute(rounds: int) -> dict:
    """Sync mode's local work on activations of real size: one BatchNorm2d's forward + backward,
    converted (sync mode, one rank, an in-process Store: no network) against nn.BatchNorm2d, alternating.
    Returns {shape: (plain times, converted times)}."""
    out = {}
    for shape in ((32, 256, 28, 28), (32, 64, 112, 112)):
        torch.manual_seed(0)
        plain = nn.BatchNorm2d(shape[1])
        with normsvc.Store.open("memory://") as store:
            converted = normsvc.torch.convert(nn.BatchNorm2d(shape[1]), store, prefix="compute")
            x = torch.randn(*shape, requires_grad=True)
            dy = torch.randn(*shape)
            times = ([], [])
            for i in range(2 + 4 * rounds):
                for model, into in ((plain, times[0]), (converted, times[1])):
                    t0 = time.perf_counter()
                    model(x).backward(dy)
                    if i >= 2:  # after the warm-up
                        into.append(time.perf_counter() - t0)
        out["x".join(map(str, shape))] = times
    return out


# --- the report ---------------------------------------------------------------------------


def _ms(values) -> str:
    v = np.asarray(values) * 1e3
    return f"{np.median(v):.3f} ({np.percentile(v, 10):.3f} to {np.percentile(v, 90):.3f})"


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on Linux
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--steps", type=int, default=40, help="shared mode: steps per round (sync: a fifth of it)")
    p.add_argument("--world", type=int, default=2, help="sync mode: ranks (processes; default 2)")
    p.add_argument("--pace", type=float, default=20.0, help="shared mode: ms between steps (default 20)")
    p.add_argument("--store", default="memory://", help="the server's store (default memory://)")
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions of both modes")
    args = p.parse_args(argv)
    if args.world < 2:
        p.error("--world: expected at least 2 ranks")
    load_before = _load()
    started = time.perf_counter()
    with _servers(args.store) as (address, echo_address, pids):
        shared = shared_mode(address, args.rounds, args.steps, args.pace / 1e3, args.profile)
        sync = sync_mode(address, echo_address, pids, args.world, args.rounds, max(1, args.steps // 5), args.profile)
    compute = sync_compute(args.rounds)
    elapsed = time.perf_counter() - started
    channels = resnet50_bn_channels()
    t = sync["times"]
    med = {case: statistics.median(v) for case, v in t.items()}
    module_net = [a - b for a, b in zip(t["module"], t["plain"])]  # same round and position: paired
    diff = statistics.median(shared["normsvc"])

    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# normsvc.torch benchmark (bench/torch_sync.py), {now:%Y-%m-%d %H:%M} UTC")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__}, numpy {np.__version__}; load average before {load_before}, "
          f"after {_load()}; {elapsed:.0f} s")
    print(f"# server: normsvc serve ({args.store}) in a subprocess on this machine; {len(channels)} BatchNorm2d "
          f"layers, ResNet-50's channels ({sum(channels)} in all), inputs 2 x C x 2 x 2; {args.rounds} interleaved "
          f"rounds, medians (10th to 90th percentile)")
    print()
    print(f"Shared mode, one rank, {len(shared['converted'])} steps, each case followed by a {args.pace:g} ms pause "
          f"({shared['steps']} step contributions applied, all answered):")
    print()
    print("| per training step, 53 layers | ms | target |")
    print("| --- | ---: | ---: |")
    print(f"| forward, plain nn.BatchNorm2d | {_ms(shared['plain'])} |  |")
    print(f"| forward, converted (shared mode) | {_ms(shared['converted'])} |  |")
    print(f"| ... of which torch's F.batch_norm calls | {_ms(shared['kernel'])} |  |")
    print(f"| **training thread in normsvc**: converted forward minus its F.batch_norm calls | "
          f"**{_ms(shared['normsvc'])}** | < 1 |")
    print(f"| the same for plain nn.BatchNorm2d (torch's own module code) | {_ms(shared['torch_rest'])} |  |")
    print(f"| normsvc's module code minus torch's, same step | {_ms(shared['added'])} |  |")
    print(f"| converted - plain forward, same step | {_ms(shared['over_plain'])} |  |")
    print(f"| background thread: one 53-layer step contribution (update_many), wall | {_ms(shared['push'])} |  |")
    print(f"| background thread: the same, its CPU time (holds the GIL at most this) | {_ms(shared['push_cpu'])} |  |")
    print()
    verdict = "met" if diff < 1e-3 else f"missed by {diff * 1e3 - 1:.3f} ms"
    torch_own = statistics.median(shared["torch_rest"])
    print(f"Shared mode: {diff * 1e3:.3f} ms per step in normsvc, {diff / 0.1:.2%} of a 100 ms step: target {verdict} "
          f"(torch's own nn.BatchNorm2d module code, counted the same way: {torch_own * 1e3:.3f} ms).")
    print()
    print(f"Sync mode, {args.world} ranks (processes, gloo), one step's reductions: 53 forward + 53 backward, "
          f"{len(t['gloo'])} steps per case:")
    print()
    print("| one training step's reductions (106 calls) | ms per step | us per layer (fwd + bwd) | / gloo | target "
          "| server CPU per reduction (us) | rank 0 CPU per reduction (us) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = [("torch.distributed.all_reduce, gloo (baseline)", "gloo", t["gloo"]),
            ("**normsvc allreduce on an AllReduceStream, as sync mode calls it**", "normsvc", t["normsvc"]),
            ("normsvc.torch sync module: fwd + bwd minus plain fwd + bwd", None, module_net),
            ("  the same reductions as unary Client.allreduce calls", "unary", t["unary"]),
            ("  the same on the stream, world_size=1 (no waiting for ranks)", "solo", t["solo"]),
            ("  bare gRPC echo of the same request bytes on one stream (the stream's transport)", "stream_echo",
             t["stream_echo"]),
            ("  bare gRPC echo of the same request bytes, unary calls (the unary transport)", "echo", t["echo"])]
    reductions = 2 * len(channels)
    for label, case, values in rows:
        m = statistics.median(values)
        target = "<= 1.0" if case == "normsvc" else ""
        server_cpu, rank_cpu = (f"{c * 1e6 / (len(t[case]) * reductions):.0f}" for c in sync["cpu"][case]) \
            if case is not None else ("", "")
        if case == "gloo":
            server_cpu = "(none)"
        print(f"| {label} | {_ms(values)} | {m / len(channels) * 1e6:.0f} | {m / med['gloo']:.2f} | {target} "
              f"| {server_cpu} | {rank_cpu} |")
    print(f"| (plain fwd + bwd of the 53 layers, local compute) | {_ms(t['plain'])} |  |  |  |  |  |")
    ratio = med["normsvc"] / med["gloo"]
    print()
    verdict = "met" if ratio <= 1.0 else f"missed: {ratio:.2f}x gloo's time"
    floor = med["stream_echo"] / med["gloo"]
    print(f"Sync mode: normsvc / gloo = {ratio:.2f} (target <= 1.0): {verdict} (the transport's floor, a bare "
          f"stream echo of the same bytes doing no work: {floor:.2f}x gloo).")
    print()
    print(f"Sync mode's local work on activations of real size: one BatchNorm2d, forward + backward, one rank on an "
          f"in-process Store (no network), {torch.get_num_threads()} torch threads:")
    print()
    print("| input | nn.BatchNorm2d (ms) | sync mode (ms) | sync / plain |")
    print("| --- | ---: | ---: | ---: |")
    for shape, (plain_t, conv_t) in compute.items():
        p_med, c_med = statistics.median(plain_t), statistics.median(conv_t)
        print(f"| {shape} | {_ms(plain_t)} | {_ms(conv_t)} | {c_med / p_med:.2f} |")
    if args.profile:
        print()
        print("cProfile, shared mode, the training thread (100 converted forwards), by own time:")
        print(shared["profile"])
        print()
        print(f"cProfile, sync mode, rank 0's reductions ({max(1, args.steps // 5)} steps), by own time:")
        print(sync["profile"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
