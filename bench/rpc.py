"""gRPC service benchmark: normsvc (server + Client) against a bare gRPC echo of the same bytes.

Run with ``python bench/rpc.py [--rounds N] [--seconds S] [--record]``.

Two servers run side by side as subprocesses of this script, on 127.0.0.1:

* ``normsvc serve`` over a memory store (the transport and service cost, not
  the disk: see bench/store.py for the store alone);
* an echo service: the same server type (``grpc.server`` over a thread pool
  of the same size, the same message limits), one generic handler per method
  name that returns the request bytes unchanged, no protobuf at all.

The clients run here, in one process: normsvc through ``normsvc.Client`` (so
building and parsing messages, numpy encoding and decoding are counted), the
echo through a raw channel sending pre-serialized bytes of the request the
Client sends (one layer as LayerMoments, a 53-layer step as PackedMoments).  Cases, each interleaved echo/normsvc round by round (medians):

* UpdateStats of one layer with 256 channels from 32 concurrent callers:
  requests/s and p50/p99 latency;
* one training step of a 53-layer model (ResNet-50's BatchNorm layers and
  channel counts): one UpdateStats of 53 layers vs 53 single-layer calls;
* the same 53 layers pushed as one step contribution (step, rank,
  world_size=4, run): each call is one rank's share, every 4th completes a
  step (one merged update of each layer), as 4 data-parallel workers do;
  and the same Client call against a service that does no work (a third
  server of the echo's type answering normsvc's own response bytes at once):
  the ceiling any server-side code could reach with this Client and wire form;
* Normalize of a 4 MiB float32 tensor (inference mode) from 1 and from 4
  concurrent callers: MB/s of x.

Targets: UpdateStats >= 0.7x echo requests/s, a 53-layer step contribution
>= 0.5x the echo of the same bytes, Normalize >= 0.6x echo MB/s.
``--record`` appends the table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

ECHO_WORKERS = 64  # normsvc serve's default --workers
MAX_MESSAGE = 64 << 20  # normsvc serve's default --max-message-mb
SERVICE = "normsvc.v1.NormService"
MiB = 1 << 20

#: ResNet-50's 53 BatchNorm layers: channel counts (stem, then 16 bottlenecks, 4 with a downsample).
def resnet50_bn_channels() -> list[int]:
    channels = [64]
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            channels += [width, width, 4 * width]
            if block == 0:
                channels.append(4 * width)  # downsample
    assert len(channels) == 53
    return channels


# --- the echo server (runs in a subprocess: `bench/rpc.py --serve-echo`) --------------


def serve_echo(canned: str | None = None) -> None:
    """The echo server; with ``canned`` (a file), UpdateStats answers that file's bytes instead:
    a service that does no work, the most any server-side code could reach with the real Client."""
    # the same allocator settings `normsvc serve` takes at start-up, so the
    # echo's large buffers are reused too and the comparison stays like for like
    from normsvc.server.malloc import keep_large_blocks

    keep_large_blocks()
    answer = None if canned is None else Path(canned).read_bytes()

    def echo(request, context):
        return request if answer is None else answer

    def echo_each(requests, context):  # a stream: each message answered by itself
        yield from requests

    methods = ("UpdateStats", "Normalize")
    handlers = {m: grpc.unary_unary_rpc_method_handler(echo) for m in methods}  # bytes in, bytes out
    handlers["AllReduceMomentsStream"] = grpc.stream_stream_rpc_method_handler(echo_each)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=ECHO_WORKERS),
        options=[("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
                 ("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"echo serving on 127.0.0.1:{port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin (or kills us)
    server.stop(0)


def start(cmd) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    if " serving on " not in line:
        proc.kill()
        raise SystemExit(f"server did not start ({' '.join(cmd)}): {line!r}")
    return proc, line.split(" serving on ")[1].split()[0]


# --- measurement -----------------------------------------------------------------------


def closed_loop(call, callers: int, seconds: float) -> dict:
    """``callers`` threads call ``call()`` back to back for ``seconds``; calls/s and latencies."""
    barrier = threading.Barrier(callers + 1)
    latencies = [[] for _ in range(callers)]
    stop = [0.0]

    def worker(i):
        out = latencies[i]
        barrier.wait()
        while True:
            t0 = time.perf_counter()
            if t0 >= stop[0]:
                return
            call()
            out.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    start_time = time.perf_counter()
    stop[0] = start_time + seconds
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start_time
    lat = np.concatenate([np.asarray(x) for x in latencies])
    return {"rate": lat.size / elapsed, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (default 5)")
    parser.add_argument("--seconds", type=float, default=1.5, help="seconds per closed-loop run (default 1.5)")
    parser.add_argument("--callers", type=int, default=32, help="concurrent UpdateStats callers (default 32)")
    parser.add_argument("--record", action="store_true", help="append the results to docs/benchmarks.md")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--canned", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_echo:
        serve_echo(args.canned)
        return 0

    import normsvc
    from normsvc._proto import normsvc_pb2 as pb
    from normsvc.client import Client
    from normsvc.wire.messages import moments_to_pb
    from normsvc.wire.packed import pack_moments
    from normsvc.wire.tensors import encode

    echo_proc, echo_address = start([sys.executable, os.path.abspath(__file__), "--serve-echo"])
    svc_proc, svc_address = start([sys.executable, "-m", "normsvc.cli", "serve", "--port", "0",
                                   "--store", "memory://", "--log-level", "WARNING"])
    rng = np.random.default_rng(0)
    rows = []
    procs = [echo_proc, svc_proc]
    try:
        channel = grpc.insecure_channel(echo_address, options=[("grpc.max_send_message_length", -1),
                                                               ("grpc.max_receive_message_length", -1)])
        echo_update = channel.unary_unary(f"/{SERVICE}/UpdateStats")
        echo_normalize = channel.unary_unary(f"/{SERVICE}/Normalize")
        client = Client(svc_address, timeout=120)

        # UpdateStats, 256 channels, one layer shared by every caller
        layer = client.create_layer("bench/bn256", num_features=256)
        m256 = normsvc.moments(rng.standard_normal((64, 256)), axes=[0])
        # the echo sends the bytes the Client sends: one layer as LayerMoments, a step's layers packed
        single = pb.UpdateStatsRequest(request_id=uuid.uuid4().hex)
        moments_to_pb("bench/bn256", m256, single.updates.add())
        single_bytes = single.SerializeToString()

        # a 53-layer step
        channels = resnet50_bn_channels()
        step_moments = {}
        for i, c in enumerate(channels):
            name = f"bench/resnet50/bn{i:02d}"
            client.create_layer(name, num_features=c)
            step_moments[name] = normsvc.moments(rng.standard_normal((32, c)), axes=[0])
        batched = pb.UpdateStatsRequest(request_id=uuid.uuid4().hex)
        pack_moments(step_moments, batched.packed)
        per_layer = []
        for name, m in step_moments.items():
            one = pb.UpdateStatsRequest(request_id=uuid.uuid4().hex)
            moments_to_pb(name, m, one.updates.add())
            per_layer.append(one.SerializeToString())
        batched_bytes = batched.SerializeToString()
        contribution = pb.UpdateStatsRequest()
        contribution.CopyFrom(batched)
        contribution.step, contribution.rank, contribution.world_size, contribution.run = 0, 0, 4, "bench"
        contribution_bytes = contribution.SerializeToString()
        contributions = iter(range(1 << 62))

        # the ceiling: the same Client against a service that answers a canned UpdateStats response
        # (normsvc's own answer to the same request) at once, doing no work
        svc_channel = grpc.insecure_channel(svc_address, options=[("grpc.max_send_message_length", -1),
                                                                  ("grpc.max_receive_message_length", -1)])
        canned = {}
        for key, request in (("update", single_bytes), ("contribution", contribution_bytes)):
            path = Path(tempfile.mkdtemp()) / "answer.bin"
            path.write_bytes(svc_channel.unary_unary(f"/{SERVICE}/UpdateStats")(request))
            proc, address = start([sys.executable, os.path.abspath(__file__), "--serve-echo", "--canned", str(path)])
            procs.append(proc)
            canned[key] = Client(address, timeout=120)
        svc_channel.close()

        def null_update():  # what layer.update sends (its handle would ask the canned service for the layer)
            canned["update"].update_many({"bench/bn256": m256})

        def null_contribute():
            canned["contribution"].update_many(step_moments, step=0, rank=0, world_size=4, run=run)

        def svc_contribute():
            i = next(contributions)  # rank i % 4 of step i // 4: every 4th call completes a step
            client.update_many(step_moments, step=i // 4, rank=i % 4, world_size=4, run=run)

        run = uuid.uuid4().hex
        handles = [client.layer(name) for name in step_moments]

        # Normalize, 4 MiB of float32
        x = rng.standard_normal((4096, 256), dtype=np.float32)
        assert x.nbytes == 4 * MiB
        norm_layer = client.create_layer("bench/normalize", num_features=256)
        norm_layer.update(normsvc.moments(x, axes=[0]))
        normalize_bytes = pb.NormalizeRequest(layer="bench/normalize", x=encode(x),
                                              mode=pb.MODE_INFERENCE).SerializeToString()

        def svc_step_batched():
            client.update_many(step_moments)

        def svc_step_single():
            for h, m in zip(handles, step_moments.values()):
                h.update(m)

        def echo_step_single():
            for b in per_layer:
                echo_update(b)

        cases = {
            "update": (lambda: echo_update(single_bytes), lambda: layer.update(m256)),
            "step_batched": (lambda: echo_update(batched_bytes), svc_step_batched),
            "step_single": (echo_step_single, svc_step_single),
            "step_contribution": (lambda: echo_update(contribution_bytes), svc_contribute),
            "normalize": (lambda: echo_normalize(normalize_bytes), lambda: norm_layer.normalize(x, training=False)),
        }
        for echo_fn, svc_fn in cases.values():  # warm up: connections, numba, caches
            for _ in range(3):
                echo_fn()
                svc_fn()
        for _ in range(3):
            null_contribute()
            null_update()
        y = norm_layer.normalize(x, training=False)
        assert y.shape == x.shape and y.dtype == x.dtype

        results = {key: {"echo": [], "normsvc": []} for key in ("update", "step_batched", "step_single",
                                                                  "step_contribution", "normalize_1",
                                                                  "normalize_4")}
        results["step_null"] = {"normsvc": []}
        results["update_null"] = {"normsvc": []}
        for r in range(args.rounds):
            order = ("echo", "normsvc") if r % 2 == 0 else ("normsvc", "echo")
            for who in order:
                i = 0 if who == "echo" else 1
                results["update"][who].append(closed_loop(cases["update"][i], args.callers, args.seconds))
                results["step_batched"][who].append(timed(cases["step_batched"][i], 20))
                results["step_single"][who].append(timed(cases["step_single"][i], 5))
                results["step_contribution"][who].append(timed(cases["step_contribution"][i], 20))
                if who == "normsvc":
                    results["step_null"]["normsvc"].append(timed(null_contribute, 20))
                    results["update_null"]["normsvc"].append(closed_loop(null_update,
                                                                         args.callers, args.seconds))
                results["normalize_1"][who].append(closed_loop(cases["normalize"][i], 1, args.seconds))
                results["normalize_4"][who].append(closed_loop(cases["normalize"][i], 4, args.seconds))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        client.close()
        for c in canned.values():
            c.close()
        channel.close()
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.kill()
            proc.wait(timeout=30)

    def med(key, who, field=None):
        values = results[key][who]
        return statistics.median(v[field] for v in values) if field else statistics.median(values)

    def spread(key, who, field):
        values = [v[field] for v in results[key][who]]
        return f"{min(values):,.0f} to {max(values):,.0f}"

    mb = 4 * MiB / 1e6
    e_rate, s_rate = med("update", "echo", "rate"), med("update", "normsvc", "rate")
    rows.append((f"UpdateStats, 256 channels, {args.callers} callers: requests/s",
                 f"{e_rate:,.0f} ({spread('update', 'echo', 'rate')})",
                 f"{s_rate:,.0f} ({spread('update', 'normsvc', 'rate')})", s_rate / e_rate, ">= 0.7"))
    n_rate = med("update_null", "normsvc", "rate")
    rows.append(("... the same Client against a service doing no work (canned answer): the ceiling",
                 f"{e_rate:,.0f}", f"{n_rate:,.0f} ({spread('update_null', 'normsvc', 'rate')})", n_rate / e_rate, ""))
    for q in ("p50", "p99"):
        e, s = med("update", "echo", q) * 1e3, med("update", "normsvc", q) * 1e3
        rows.append((f"UpdateStats, {args.callers} callers: {q} latency (ms)", f"{e:.2f}", f"{s:.2f}", e / s, ""))
    eb, sb = med("step_batched", "echo") * 1e3, med("step_batched", "normsvc") * 1e3
    es, ss = med("step_single", "echo") * 1e3, med("step_single", "normsvc") * 1e3
    rows.append(("53-layer step, one batched UpdateStats (ms)", f"{eb:.2f}", f"{sb:.2f}", eb / sb, ""))
    rows.append(("53-layer step, 53 single UpdateStats (ms)", f"{es:.2f}", f"{ss:.2f}", es / ss, ""))
    rows.append(("53-layer step: single / batched time", f"{es / eb:.1f}x", f"{ss / sb:.1f}x", None, ""))
    ec, sc = med("step_contribution", "echo") * 1e3, med("step_contribution", "normsvc") * 1e3
    rows.append(("53-layer step contribution, 1 of 4 ranks (ms)", f"{ec:.2f}", f"{sc:.2f}", ec / sc, ">= 0.5"))
    nc = med("step_null", "normsvc") * 1e3
    rows.append(("... the same Client against a service doing no work (canned answer): the ceiling (ms)",
                 f"{ec:.2f}", f"{nc:.2f}", ec / nc, ""))
    for callers in (1, 4):
        key = f"normalize_{callers}"
        e, s = med(key, "echo", "rate") * mb, med(key, "normsvc", "rate") * mb
        rows.append((f"Normalize 4 MiB float32, inference, {callers} caller{'s' if callers > 1 else ''}: MB/s",
                     f"{e:,.0f}", f"{s:,.0f}", s / e, ">= 0.6"))

    headers = ("case", "echo", "normsvc", "normsvc speed / echo", "target")
    lines = ["| " + " | ".join(headers) + " |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, e, s, ratio, target in rows:
        lines.append(f"| {name} | {e} | {s} | {'' if ratio is None else f'{ratio:.2f}'} | {target} |")
    table = "\n".join(lines)
    print(table)

    if args.record:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        machine = f"{os.cpu_count()}-core shared VM ({platform.machine()})"
        text = (
            f"\n## gRPC service (bench/rpc.py)\n\n"
            f"{now}, {machine}, Python {platform.python_version()}, grpcio {grpc.__version__}, "
            f"numpy {np.__version__}.\n"
            f"`python bench/rpc.py --rounds {args.rounds} --seconds {args.seconds}`: `normsvc serve` (memory store, "
            f"default 64 workers) and a bare echo server of the same type (sync `grpc.server`, 64-thread pool, "
            f"generic handler returning the request bytes) run side by side as subprocesses; the clients run in "
            f"one process (`normsvc.Client` vs a raw channel sending the same pre-serialized request bytes). "
            f"Echo and normsvc runs interleaved round by round; medians (range over rounds in parentheses). "
            f"The ratio is normsvc's speed relative to the echo (rates: normsvc / echo; times: echo / normsvc), "
            f"so 1.00 is the transport limit.\n\n"
            f"{table}\n"
        )
        path = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        with open(path, "a") as f:
            f.write(text)
        print(f"appended to {path.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
