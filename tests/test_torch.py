"""normsvc.torch: BatchNorm backed by the service, against plain torch on the concatenated batch.

The multi-rank tests spawn real worker processes (tests/torch_workers.py)
that join a gloo process group and talk to a real server on loopback; the
reference is ONE process running plain torch BatchNorms on the concatenated
batch of every rank, computed here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import normsvc  # noqa: E402
import normsvc.torch as nt  # noqa: E402
from normsvc.testing import running_server  # noqa: E402

import torch_workers as tw  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
README = Path(__file__).resolve().parents[1] / "README.md"


def close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **TOL, msg=lambda m: f"{what}: {m}")


def spawn(fn, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(fn, args=args, nprocs=tw.WORLD, join=True)


# --- sync mode: 2 processes, gloo, DDP --------------------------------------------------------------


def _reference_sync(ranks: list, prefix: str, steps: int, dtype, follow: bool, tol: dict):
    """ONE plain model on the concatenated batches, checked against every rank at every step.

    ``follow``: each step starts from the ranks' parameters (float32, where
    two independent trajectories drift apart by more than 1e-5 within a few
    SGD steps, torch's own float32 run against float64 included); otherwise
    the reference trains on its own (float64).
    """
    def check(actual, expected, what):
        torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")

    ref = tw.make_net().to(dtype)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    total = sum(tw.BATCH)
    for step in range(steps):
        if follow:
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    p.copy_(ranks[0][prefix]["steps"][step]["params"][name])
        xs, ts = zip(*(tw.batch(r, step) for r in range(tw.WORLD)))
        x = torch.cat(xs).to(dtype).requires_grad_(True)
        y = ref(x)
        loss = (y * torch.cat(ts).to(dtype)).sum() / total
        opt.zero_grad()
        loss.backward()
        for r, (y_r, g_r) in enumerate(zip(y.split(tw.BATCH), x.grad.split(tw.BATCH))):
            got = ranks[r][prefix]["steps"][step]
            check(got["y"], y_r, f"{prefix} rank {r} step {step} output")
            check(got["x_grad"], g_r, f"{prefix} rank {r} step {step} input gradient")
            for name, p in ref.named_parameters():
                check(got["grads"][name], p.grad, f"{prefix} rank {r} step {step} gradient of {name}")
        opt.step()
    expected = ref.state_dict()
    for r in range(tw.WORLD):
        state = ranks[r][prefix]["state"]
        assert state.keys() == expected.keys()
        for key in expected:
            if not follow or "running" in key or "num_batches" in key:
                check(state[key], expected[key], f"{prefix} rank {r} {key} after {steps} steps")
    ref.eval()
    with torch.no_grad():
        check(ranks[0][prefix]["eval"], ref(tw.eval_batch().to(dtype)), f"{prefix} inference")
    return expected


@pytest.mark.timeout(240)
def test_sync_mode_equals_one_process_on_the_concatenated_batch(tmp_path):
    """Outputs, input and parameter gradients, running statistics after 5 DDP steps (BatchNorm2d,
    momentum=None, BatchNorm1d with affine=False, 5 and 3 rows per rank); then a rank dies mid-step."""
    steps = 5
    with running_server() as server:
        spawn(tw.sync_worker, server.address, str(tmp_path), steps)
        with normsvc.Client(server.address) as client:
            stored = {info.name: info.stats for info in client.describe()}
    ranks = [torch.load(tmp_path / f"sync{r}.pt") for r in range(tw.WORLD)]

    for prefix, dtype, follow, tol in (("sync/", torch.float32, True, TOL),
                                       ("sync64/", torch.float64, False, dict(rtol=1e-9, atol=1e-10))):
        expected = _reference_sync(ranks, prefix, steps, dtype, follow, tol)
        for bn in ("bn1", "bn2", "bn3"):
            stats = stored[prefix + bn]
            for got, key in ((stats.mean, "running_mean"), (stats.variance, "running_var")):
                torch.testing.assert_close(torch.from_numpy(got), expected[f"{bn}.{key}"].double(), **tol,
                                           msg=lambda m: f"stored {prefix}{bn} {key}: {m}")
            assert stats.num_batches == steps and stats.last_step == steps - 1
            assert stats.run == ranks[0][prefix]["run"] == ranks[1][prefix]["run"] != ""  # rank 0's, broadcast

    kind, message, waited = ranks[0]["dead"]
    assert kind == "DeadlineExceeded", message
    assert "missing ranks [1]" in message or "deadline" in message.lower(), message
    assert waited < 30


def test_sync_rank_that_never_comes_times_out():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with running_server() as server, normsvc.Client(server.address) as client:
        model = nt.convert(model, client, prefix="lonely/", rank=0, world_size=2, run="r", timeout=1.0)
        start = time.monotonic()
        with pytest.raises(normsvc.DeadlineExceeded, match=r"1 of 2 ranks|deadline"):
            model(torch.randn(5, 3))
        assert time.monotonic() - start < 15


def test_sync_mode_reduces_over_one_stream_per_thread_that_close_ends():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    with running_server() as server, normsvc.Client(server.address) as client:
        model = nt.convert(model, client, prefix="one/", rank=0, world_size=1, run="r")
        for _ in range(3):
            model(torch.randn(5, 3)).sum().backward()
        registry = server.metrics.registry
        assert registry.get_sample_value("normsvc_allreduce_steps_total", {"outcome": "completed"}) == 3 * 2
        assert registry.get_sample_value("normsvc_rpc_requests_total",
                                         {"method": "AllReduceMoments", "code": "OK"}) is None  # no unary call
        assert server.streams.open == 1  # one training thread: one stream, whatever the layers and steps
        nt.close(model)
        deadline = time.monotonic() + 10
        while server.streams.open and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.streams.open == 0
        model(torch.randn(5, 3)).sum().backward()  # training again opens another
        assert server.streams.open == 1
        assert client.layer("one/1").stats().num_batches == 4


@pytest.mark.parametrize("dtype, tol", [(torch.float64, dict(rtol=1e-9, atol=1e-10)), (torch.float32, TOL)])
def test_sync_mode_in_process_store_world_size_one(dtype, tol):
    """A Store serves one rank: the same numbers as plain torch, and the running statistics in the store.

    In float32 the gradient of the bias of a convolution just before a
    BatchNorm is left to the float64 run: it is the batch sum of the
    BatchNorm's input gradient, 0 in exact arithmetic, so two float32
    computations of it differ by their rounding noise alone (1e-5 here).
    """
    def check(actual, expected, what):
        torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")

    torch.manual_seed(1)
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                          nn.BatchNorm2d(3)).to(dtype)
    converted = copy.deepcopy(plain)
    noise_only = {"0.bias", "3.bias"} if dtype == torch.float32 else set()
    with normsvc.Store.open("memory://") as store:
        converted = nt.convert(converted, store, prefix="one/")
        for step in range(3):
            x = (torch.randn(6, 2, 5, 5) * 3 + 1).to(dtype)
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ya, yb = converted(xa), plain(xb)
            check(ya, yb, "output")
            g = torch.randn_like(ya)
            ya.backward(g)
            yb.backward(g)
            check(xa.grad, xb.grad, "input gradient")
            for (name, pa), (_, pb) in zip(converted.named_parameters(), plain.named_parameters()):
                if name not in noise_only:
                    check(pa.grad, pb.grad, f"gradient of {name}")
        stats = store.layer("one/1").stats()
    check(torch.from_numpy(stats.mean), plain[1].running_mean, "stored mean")
    assert stats.num_batches == 3 and converted[1].num_batches_tracked.item() == 3


# --- sync mode: 2 ranks as threads of this process, on CPU and on CUDA ----------------------------

_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"CUDA is not available (torch {torch.__version__}, CUDA build: {torch.version.cuda}): the cuda case "
           "runs on a machine with an NVIDIA GPU"))]
#: Seconds a rank's step may take (a reduction waits at most _RANK_TIMEOUT for the other rank).
_RANK_TIMEOUT, _STEP_JOIN = 15.0, 90.0


@contextlib.contextmanager
def _ieee_float32():
    """float32 convolutions and matmuls in IEEE float32 on CUDA, then the flags as they were.

    cuDNN convolves float32 in TF32 by default on Ampere and later (H100):
    its 10-bit mantissa makes two float32 computations of one model on two
    batchings differ by far more than TOL (a perturbation of 1e-7 flips a
    TF32 rounding now and then).  Only flags that are on are changed (and
    restored); nothing changes on a CPU-only torch but the flags' values.
    """
    changed = []
    for owner in (torch.backends.cudnn, torch.backends.cuda.matmul):
        if owner.allow_tf32:
            owner.allow_tf32 = False
            changed.append(owner)
    try:
        yield
    finally:
        for owner in changed:
            owner.allow_tf32 = True


def _memcpy_summary(trace_path: Path, bound: int) -> tuple[list, int, str]:
    """The sizes of the device-to-host copies in a chrome trace, how many have no readable size, and a
    summary of every copy seen (for assertion messages).

    GPU copies are the events of category ``gpu_memcpy`` (kineto), named
    ``Memcpy DtoH (Device -> Pageable)``, ``Memcpy HtoD (Pageable -> Device)``,
    ...; their size is ``args["bytes"]``.  The CPU side's runtime calls
    (``cudaMemcpyAsync``, category ``cuda_runtime``) are not copies.  The
    summary shows the first device-to-host copy without a readable size.
    """
    with open(trace_path) as f:
        trace = json.load(f)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    categories: dict = {}
    copies = []
    for ev in events:
        if not isinstance(ev, dict):
            continue
        cat, name = str(ev.get("cat", "")), str(ev.get("name", ""))
        categories[cat] = categories.get(cat, 0) + 1
        if cat.lower() in ("cuda_runtime", "cuda_driver", "cpu_op", "python_function", "user_annotation"):
            continue
        if cat.lower() == "gpu_memcpy" or name.startswith("Memcpy"):
            copies.append(ev)

    def size(ev):
        args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
        for key in ("bytes", "Bytes", "size", "Size"):
            if isinstance(args.get(key), (int, float)):
                return int(args[key])
        found = [v for k, v in args.items() if "byte" in k.lower() and isinstance(v, (int, float))]
        return int(found[0]) if found else None

    def direction(ev):
        name = str(ev.get("name", ""))
        if "DtoH" in name or "Device -> Pageable" in name or "Device -> Pinned" in name:
            return "DtoH"
        if "HtoD" in name or "Pageable -> Device" in name or "Pinned -> Device" in name:
            return "HtoD"
        return "other"

    kinds: dict = {"DtoH": [], "HtoD": [], "other": []}
    for ev in copies:
        kinds[direction(ev)].append(ev)
    dtoh = [size(ev) for ev in kinds["DtoH"]]
    unsized = [ev for ev in kinds["DtoH"] if size(ev) is None]
    summary = (f"{len(copies)} GPU copies in the trace: {len(kinds['DtoH'])} device-to-host of sizes "
               f"{sorted(b for b in dtoh if b is not None)} bytes ({len(unsized)} without a size), "
               f"{len(kinds['HtoD'])} host-to-device, {len(kinds['other'])} other "
               f"({sorted({str(ev.get('name')) for ev in kinds['other']})}); bound {bound} bytes; event "
               f"categories {categories}")
    if unsized:
        summary += f"; a device-to-host copy without a size: {unsized[0]}"
    return [b for b in dtoh if b is not None], len(unsized), summary


def test_memcpy_summary_reads_the_copies_of_a_kineto_trace(tmp_path):
    """The parser of the CUDA case of the next test, on events as kineto writes them."""
    def copy_event(name, size):
        return {"ph": "X", "cat": "gpu_memcpy", "name": name, "pid": 0, "tid": 7, "ts": 1.0, "dur": 1.0,
                "args": {"device": 0, "stream": 7, "correlation": 3, "bytes": size,
                         "memory bandwidth (GB/s)": 0.1}}

    events = [copy_event("Memcpy DtoH (Device -> Pageable)", 192), copy_event("Memcpy DtoH (Device -> Pinned)", 96),
              copy_event("Memcpy HtoD (Pageable -> Device)", 4096), copy_event("Memcpy DtoD (Device -> Device)", 8),
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 0.5, "dur": 2.0,
               "args": {"correlation": 3}},
              {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 0.4, "dur": 3.0, "args": {}},
              {"ph": "M", "name": "process_name", "args": {"name": "python"}}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"schemaVersion": 1, "traceEvents": events}))
    sizes, unsized, summary = _memcpy_summary(path, 384)
    assert sorted(sizes) == [96, 192] and unsized == 0, summary
    assert "1 host-to-device" in summary and "1 other" in summary, summary
    del events[0]["args"]["bytes"]
    path.write_text(json.dumps(events))  # a bare list of events is a chrome trace too
    sizes, unsized, summary = _memcpy_summary(path, 384)
    assert sizes == [96] and unsized == 1 and "without a size: {" in summary, summary


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, dict(rtol=1e-9, atol=1e-10)), (torch.float32, TOL)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("device", _DEVICES)
def test_sync_mode_two_ranks_in_threads_on_device(device, dtype, tol, tmp_path):
    """Sync mode with 2 ranks as threads of this process (each its Client), on ``device``.

    Per step: every rank's output and input gradient equal the matching
    rows of ONE plain model on the concatenated batch (5 and 3 rows, each
    rank its own distribution), and the sum over the ranks of each parameter
    gradient equals its gradient; after 3 steps every rank's running
    statistics equal the plain model's.  Outputs, gradients and buffers stay
    on ``device``.  On CUDA the last step runs under the profiler: every
    device-to-host copy must be per-channel statistics, never an activation.

    Each rank runs its backward on its own thread
    (``set_multithreading_enabled(False)``): autograd otherwise runs the
    backward of CUDA tensors on ONE engine thread per GPU, where rank 0's
    backward reduction would wait for rank 1's, queued behind it on that
    very thread, until DeadlineExceeded (one process per rank, the real
    setup, does not have that problem).
    """
    def check(actual, expected, what):
        torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")

    steps, world, total = 3, tw.WORLD, sum(tw.BATCH)
    assert world == 2 and tw.BATCH == (5, 3)
    # a conv or linear bias feeding straight into a BatchNorm has the gradient 0 in exact arithmetic: in float32
    # two computations of it differ by their rounding noise alone (see test_sync_mode_in_process_store_...)
    noise_only = {"conv1.bias", "conv2.bias", "fc1.bias"} if dtype == torch.float32 else set()
    profile_step = steps - 1  # on CPU too: the profiler and the trace parser run everywhere, the checks on CUDA
    name = str(dtype).rsplit(".", 1)[-1]
    prefix, run = f"dev-{device}-{name}/", f"threads-{device}-{name}-{uuid.uuid4().hex}"

    with _ieee_float32(), running_server() as server, contextlib.ExitStack() as stack:
        base = tw.make_net().to(device=device, dtype=dtype)
        assert base.bn2.momentum is None and base.bn3.affine is False
        clients = [stack.enter_context(normsvc.Client(server.address)) for _ in range(world)]
        models = []
        for r in range(world):
            models.append(nt.convert(copy.deepcopy(base), clients[r], mode="sync", prefix=prefix, rank=r,
                                     world_size=world, run=run, timeout=_RANK_TIMEOUT))
            stack.callback(nt.close, models[r])
        records: list = [[] for _ in range(world)]

        def rank_step(r: int, step: int, errors: list) -> None:
            model = models[r]
            try:
                x, t = (a.to(device=device, dtype=dtype) for a in tw.batch(r, step))
                x.requires_grad_(True)
                model.zero_grad(set_to_none=True)
                y = model(x)
                loss = (y * t).sum() / total
                with torch.autograd.set_multithreading_enabled(False):  # this thread, not the GPU's engine thread
                    loss.backward()
                records[r].append({"y": y.detach().clone(), "x_grad": x.grad.detach().clone(),
                                   "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}})
            except BaseException as exc:  # noqa: BLE001 - re-raised by the test
                errors.append((r, exc))
            finally:
                try:
                    nt.close(model)  # this thread's reduction stream; the next step's thread opens another
                except BaseException as exc:  # noqa: BLE001 - re-raised by the test
                    errors.append((r, exc))

        def both_ranks(step: int) -> None:
            errors: list = []
            threads = [threading.Thread(target=rank_step, args=(r, step, errors), name=f"rank{r}-step{step}",
                                        daemon=True) for r in range(world)]
            for th in threads:
                th.start()
            deadline = time.monotonic() + _STEP_JOIN
            for th in threads:
                th.join(max(deadline - time.monotonic(), 0.1))
            hung = [th.name for th in threads if th.is_alive()]
            if errors:
                r, exc = errors[0]
                exc.add_note(f"in rank {r} at step {step} on {device} ({dtype}); all errors: "
                             + "; ".join(f"rank {q}: {type(e).__name__}: {e}" for q, e in errors)
                             + (f"; still running: {hung}" if hung else ""))
                raise exc
            assert not hung, f"{hung} did not finish step {step} within {_STEP_JOIN:g} s (on {device}, {dtype})"

        trace_path = tmp_path / "sync_step.json"
        for step in range(steps):
            if step != profile_step:
                both_ranks(step)
                continue
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=activities) as prof:
                both_ranks(step)
                if device == "cuda":
                    torch.cuda.synchronize()  # every copy done before the profiler stops
            prof.export_chrome_trace(str(trace_path))
        assert all(len(rec) == steps for rec in records)

        # the reference: ONE plain model on the concatenated batch, same device and dtype
        ref = copy.deepcopy(base)
        for step in range(steps):
            xs, ts = zip(*(tw.batch(r, step) for r in range(world)))
            x = torch.cat(xs).to(device=device, dtype=dtype).requires_grad_(True)
            ref.zero_grad(set_to_none=True)
            y = ref(x)
            ((y * torch.cat(ts).to(device=device, dtype=dtype)).sum() / total).backward()
            for r, (y_r, g_r) in enumerate(zip(y.detach().split(tw.BATCH), x.grad.split(tw.BATCH))):
                got = records[r][step]
                assert got["y"].device.type == device and got["x_grad"].device.type == device, \
                    f"rank {r} step {step}: output on {got['y'].device}, input gradient on {got['x_grad'].device}"
                assert got["y"].dtype == dtype and got["x_grad"].dtype == dtype
                check(got["y"], y_r, f"rank {r} step {step} output")
                check(got["x_grad"], g_r, f"rank {r} step {step} input gradient")
            for pname, p in ref.named_parameters():
                grads = [records[r][step]["grads"][pname] for r in range(world)]
                assert all(g.device.type == device and g.dtype == p.dtype for g in grads), \
                    f"step {step} gradient of {pname}: {[(g.device, g.dtype) for g in grads]}"
                if pname not in noise_only:
                    check(grads[0] + grads[1], p.grad, f"step {step} gradient of {pname} summed over the ranks")
        for path in ("bn1", "bn2", "bn3"):
            expected = getattr(ref, path)
            for r in range(world):
                bn = getattr(models[r], path)
                for key in ("running_mean", "running_var"):
                    got = getattr(bn, key)
                    assert got.device.type == device and got.dtype == dtype, f"rank {r} {path}.{key}: {got}"
                    check(got, getattr(expected, key), f"rank {r} {path}.{key} after {steps} steps")
                assert int(bn.num_batches_tracked) == int(expected.num_batches_tracked) == steps
            stats = clients[0].layer(prefix + path).stats()
            assert stats.num_batches == steps and stats.last_step == steps - 1, (path, stats)
            assert stats.run == run

    # only per-channel statistics cross to the host: a copy is at most a few (2 or 3) float64 rows of the widest
    # BatchNorm, far below any 4-D activation (the smallest, rank 1's input of bn1, is 3 x 6 x 6 x 6 values)
    widest = max(m.num_features for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    bound = 4 * widest * 8
    smallest_activation = min(tw.BATCH) * base.bn1.num_features * 6 * 6 * base.bn1.weight.element_size()
    assert 4 * bound <= smallest_activation, (bound, smallest_activation)
    sizes, unsized, summary = _memcpy_summary(trace_path, bound)
    if device != "cuda":
        assert sizes == [] and unsized == 0 and summary.startswith("0 GPU copies"), summary
        return
    assert unsized == 0, f"cannot check the sizes of the host copies: {summary}"
    assert sizes, ("the profiler saw no device-to-host copies, so the check that only per-channel statistics "
                   f"reach the host could not run (CUPTI tracing unavailable?): {summary}")
    assert max(sizes) <= bound, f"a device-to-host copy larger than per-channel statistics: {summary}"
    # forward and backward of 3 BatchNorms, 2 ranks: one copy each
    assert len(sizes) >= 2 * 2 * 3, f"expected one device-to-host copy per BatchNorm, pass and rank: {summary}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("device", _DEVICES)
def test_sync_mode_one_process_per_rank_on_device(device, tmp_path):
    """Sync mode with one process per rank on ``device`` (float64), the backward where autograd runs it
    (on CUDA: autograd's thread for the device): every step's outputs, input gradients and summed parameter
    gradients, and the final buffers, equal ONE plain model's on the concatenated batch."""
    import torch.multiprocessing as mp

    steps = 3
    with running_server() as server:
        mp.spawn(tw.device_sync_worker, args=(server.address, str(tmp_path), steps, device), nprocs=tw.WORLD,
                 join=True)
    ranks = [torch.load(tmp_path / f"{device}-sync{r}.pt") for r in range(tw.WORLD)]
    ref = tw.make_net().to(device=device, dtype=torch.float64)

    def check(actual, expected, what):
        torch.testing.assert_close(actual.double(), expected.detach().double().cpu(), rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{what}: {m}")

    for step in range(steps):
        xs, ts = zip(*(tw.batch(r, step) for r in range(tw.WORLD)))
        x = torch.cat(xs).to(device=device, dtype=torch.float64).requires_grad_(True)
        ref.zero_grad(set_to_none=True)
        y = ref(x)
        ((y * torch.cat(ts).to(device=device, dtype=torch.float64)).sum() / sum(tw.BATCH)).backward()
        for r, (y_r, g_r) in enumerate(zip(y.split(tw.BATCH), x.grad.split(tw.BATCH))):
            check(ranks[r]["steps"][step]["y"], y_r, f"rank {r} step {step} output")
            check(ranks[r]["steps"][step]["x_grad"], g_r, f"rank {r} step {step} input gradient")
        for name, p in ref.named_parameters():
            check(sum(ranks[r]["steps"][step]["grads"][name] for r in range(tw.WORLD)), p.grad,
                  f"step {step} gradient of {name} summed over the ranks")
    for key, value in ref.state_dict().items():
        for r in range(tw.WORLD):
            check(ranks[r]["state"][key], value, f"rank {r} {key} after {steps} steps")


# --- shared mode: 2 processes, gloo, DDP; a server and a sqlite file ------------------------------


@pytest.mark.timeout(240)
def test_shared_mode_running_statistics_equal_one_batch_norm_on_the_concatenated_batch(tmp_path):
    steps = 20
    with running_server() as server:
        spawn(tw.shared_worker, server.address, str(tmp_path), steps)
        with normsvc.Client(server.address) as client:
            served = {info.name: info.stats for info in client.describe(prefix="shared/")}
    with normsvc.Store.open(f"sqlite:///{tmp_path / 'stats.db'}") as store:
        filed = {info.name: info.stats for info in store.describe(prefix="filed/")}
    ranks = [torch.load(tmp_path / f"shared{r}.pt") for r in range(tw.WORLD)]

    net = tw.Net()
    for key, prefix, stored in (("served", "shared/", served), ("filed", "filed/", filed)):
        for path in ("bn1", "bn2", "bn3"):
            original = getattr(net, path)
            ref = nn.BatchNorm1d(original.num_features, momentum=original.momentum, affine=False) \
                if isinstance(original, nn.BatchNorm1d) else \
                nn.BatchNorm2d(original.num_features, momentum=original.momentum, affine=False)
            inputs = [ranks[r]["inputs"][key][path] for r in range(tw.WORLD)]
            assert all(len(i) == steps for i in inputs)
            for step in range(steps):  # ONE torch BatchNorm on the concatenated batch of each step
                ref(torch.cat([inputs[r][step] for r in range(tw.WORLD)]))
            stats = stored[prefix + path]
            assert stats.num_batches == steps and stats.last_step == steps - 1
            close(torch.from_numpy(stats.mean), ref.running_mean, f"{key} {path} stored mean")
            close(torch.from_numpy(stats.variance), ref.running_var, f"{key} {path} stored variance")
            for r in range(tw.WORLD):  # eval fetched the shared statistics into every rank's buffers
                state = ranks[r][key]["state"]
                close(state[f"{path}.running_mean"], ref.running_mean, f"rank {r} {key} {path} mean")
                close(state[f"{path}.running_var"], ref.running_var, f"rank {r} {key} {path} var")
                assert state[f"{path}.num_batches_tracked"].item() == steps
        for r in range(tw.WORLD):
            close(ranks[r][key]["eval"], ranks[r][key]["plain_eval"], f"rank {r} {key} inference")


class CountingStore:
    """A Store that counts the requests for statistics (describe)."""

    def __init__(self, store):
        self.store, self.describes = store, 0

    def describe(self, *args, **kwargs):
        self.describes += 1
        return self.store.describe(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_shared_mode_in_process_and_eval_fetches_once_per_version():
    torch.manual_seed(2)
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                          nn.BatchNorm2d(3, momentum=None))
    with normsvc.Store.open("memory://") as store:
        counting = CountingStore(store)
        model = nt.convert(copy.deepcopy(plain), counting, mode="shared", prefix="m/")
        for _ in range(4):
            x = torch.randn(6, 2, 5, 5)
            close(model(x), plain(x), "training output: local batch statistics")
        before = counting.describes
        model.eval()
        plain.eval()
        x = torch.randn(3, 2, 5, 5)
        for _ in range(3):
            close(model(x), plain(x), "inference with the shared statistics")
        assert counting.describes == before + 1  # one request for both layers, not one per forward
        for _ in range(2):
            model(x)
        assert counting.describes == before + 1
        model.train()
        model(torch.randn(6, 2, 5, 5))
        model.eval()
        model(x)
        assert counting.describes == before + 2
        assert store.layer("m/1").stats().num_batches == 5
        nt.close(model)
        model(x)  # inference still works after close
        model.train()
        with pytest.raises(normsvc.FailedPrecondition, match="close"):
            model(x)


@pytest.mark.parametrize("device", _DEVICES)
def test_shared_mode_on_device(device, tmp_path):
    """Shared mode on ``device`` (float64, one rank, an in-process Store): training outputs, the stored
    running statistics and inference equal plain torch's; on CUDA a training step moves only per-channel
    statistics to the host (profiler trace)."""
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 1),
                          nn.BatchNorm2d(3, momentum=None)).to(device=device, dtype=torch.float64)
    tol = dict(rtol=1e-9, atol=1e-10)

    def check(actual, expected, what):
        torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), **tol, msg=lambda m: f"{what}: {m}")

    def batch():
        return (torch.randn(6, 2, 5, 5, dtype=torch.float64) * 2 + 1).to(device)

    trace_path = tmp_path / "shared_step.json"
    with normsvc.Store.open("memory://") as store:
        model = nt.convert(copy.deepcopy(plain), store, mode="shared", prefix=f"shared-{device}/")
        for step in range(4):
            x = batch()
            if step < 3:
                y = model(x)
            else:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
                with profile(activities=activities) as prof:
                    y = model(x)
                    nt.flush(model)  # the background thread's copies are in the trace too
                    if device == "cuda":
                        torch.cuda.synchronize()
                prof.export_chrome_trace(str(trace_path))
            assert y.device.type == device
            check(y, plain(x), f"step {step} training output")
        nt.flush(model)
        for i in (1, 4):
            stats = store.layer(f"shared-{device}/{i}").stats()
            check(torch.from_numpy(stats.mean), plain[i].running_mean, f"stored mean of layer {i}")
            check(torch.from_numpy(stats.variance), plain[i].running_var, f"stored variance of layer {i}")
            assert stats.num_batches == 4
        model.eval()
        plain.eval()
        x = batch()
        check(model(x), plain(x), "inference with the shared statistics")
        nt.close(model)
    bound = 4 * 4 * 8  # a few float64 rows of the widest BatchNorm (4 channels)
    assert 4 * bound <= 6 * 4 * 3 * 3 * 8  # far below the smallest activation (6 x 4 x 3 x 3 values)
    sizes, unsized, summary = _memcpy_summary(trace_path, bound)
    if device != "cuda":
        assert sizes == [] and unsized == 0, summary
        return
    assert unsized == 0 and sizes, f"the profiler's device-to-host copies could not be read: {summary}"
    assert max(sizes) <= bound, f"a device-to-host copy larger than per-channel statistics: {summary}"


def test_shared_mode_background_errors_reach_the_next_forward_and_flush():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with normsvc.Store.open("memory://") as store:
        model = nt.convert(model, store, mode="shared", prefix="e/")
        model(torch.randn(5, 3))
        nt.flush(model)
        store.layer("e/1").freeze()  # the next step's contribution is refused, in the background
        model(torch.randn(5, 3))  # returns at once: the error comes later
        deadline = time.monotonic() + 10
        with pytest.raises(normsvc.FrozenLayer):
            while time.monotonic() < deadline:
                model(torch.randn(5, 3))
                time.sleep(0.01)
        with pytest.raises(normsvc.FrozenLayer):
            nt.flush(model)
        with pytest.raises(normsvc.FrozenLayer):
            model(torch.randn(5, 3))
        with pytest.raises(normsvc.FrozenLayer):
            nt.close(model)


def test_shared_mode_layer_called_twice_per_step_merges_and_steps_follow_the_model():
    """Two calls of one layer in a forward are one batch of that step; calls outside the model's
    forward start a new step at the layer's second call."""
    bn = nn.BatchNorm1d(2)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, a, b):
            return self.bn(a), self.bn(b)

    with normsvc.Store.open("memory://") as store:
        model = nt.convert(Twice(), store, mode="shared", prefix="t/")
        a, b = torch.randn(4, 2), torch.randn(6, 2) + 3
        model(a, b)
        nt.flush(model)
        stats = store.layer("t/bn").stats()
        both = torch.cat([a, b]).double()
        assert stats.num_batches == 1 and stats.count == 10
        np.testing.assert_allclose(stats.mean, 0.1 * both.mean(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(stats.variance, 0.9 + 0.1 * both.var(0).numpy(), rtol=1e-6)
        model.bn(a)
        model.bn(b)  # outside the model's forward: a second call is a second step
        nt.flush(model)
        assert store.layer("t/bn").stats().num_batches == 3


# --- convert: layers, configs, checkpoints ----------------------------------------------------------


def test_convert_keeps_everything_and_state_dict_round_trips_strictly():
    torch.manual_seed(3)
    plain = tw.Net()
    plain.bn1.momentum = 0.3
    plain(torch.randn(4, 3, 6, 6))  # non-initial buffers, num_batches_tracked 1
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with normsvc.Store.open("memory://") as store:
        converted = nt.convert(copy.deepcopy(plain), store, prefix="net/")
        for path in ("bn1", "bn2", "bn3"):
            old, new = getattr(plain, path), getattr(converted, path)
            assert isinstance(new, nt.BatchNorm) and new.layer == f"net/{path}"
            assert (new.momentum, new.eps, new.affine, new.track_running_stats) == \
                   (old.momentum, old.eps, old.affine, old.track_running_stats)
            config = store.layer(f"net/{path}").config()
            assert (config.convention, config.axis, config.momentum, config.epsilon, config.num_features) == \
                   ("torch", 1, old.momentum, old.eps, (old.num_features,))
            # a fresh layer takes the module's (non-initial) buffers, num_batches_tracked included
            stats = store.layer(f"net/{path}").stats()
            close(torch.from_numpy(stats.mean), old.running_mean, f"{path} seeded mean")
            assert stats.num_batches == 1
        state = converted.state_dict()
        assert list(state) == list(before)
        for key in before:
            assert torch.equal(state[key], before[key]), key
        converted(torch.randn(4, 3, 6, 6))
        fresh = tw.Net()
        fresh.load_state_dict(converted.state_dict(), strict=True)  # converted -> plain
        assert fresh.bn2.num_batches_tracked.item() == 2
        again = nt.convert(tw.Net(), normsvc.Store.open("memory://"), prefix="net/")
        again.load_state_dict(fresh.state_dict(), strict=True)  # plain -> converted
        for key, value in fresh.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), key
        ema = copy.deepcopy(converted)  # an EMA copy talks to the same service
        assert ema.bn1.binding is converted.bn1.binding and ema.bn1 is not converted.bn1
        # a layer that holds statistics wins: a new model converted onto it takes them
        other = tw.Net()
        other.bn1.momentum = 0.3
        reused = nt.convert(other, store, prefix="net/")
        assert torch.equal(reused.bn1.running_mean, converted.bn1.running_mean)
        assert reused.bn1.num_batches_tracked.item() == 2


def test_convert_a_single_batch_norm_and_sync_batch_norm():
    with normsvc.Store.open("memory://") as store:
        one = nt.convert(nn.BatchNorm2d(3), store, prefix="solo")
        assert isinstance(one, nt.BatchNorm) and one.layer == "solo"
        with pytest.raises(ValueError, match="expected 4D input"):
            one(torch.randn(2, 3))
        sync = nt.convert(nn.Sequential(nn.SyncBatchNorm(3)), store, prefix="s/")
        assert sync[0](torch.randn(4, 3, 2)).shape == (4, 3, 2)  # SyncBatchNorm takes any rank, CPU too
        untracked = nt.convert(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), store, prefix="u/")
        x = torch.randn(6, 3)
        close(untracked(x), nn.functional.batch_norm(x, None, None, training=True), "no running statistics")
        untracked.eval()
        close(untracked(x), nn.functional.batch_norm(x, None, None, training=True), "eval, no statistics")
        assert "u/0" not in store.list_layers()  # nothing to keep: no layer


def test_a_batch_norm_at_two_paths_stays_one_module():
    bn = nn.BatchNorm1d(3)
    model = nn.ModuleDict({"a": nn.Sequential(bn), "b": nn.Sequential(bn)})
    with normsvc.Store.open("memory://") as store:
        nt.convert(model, store, prefix="twice/")
        assert model["a"][0] is model["b"][0] and isinstance(model["a"][0], nt.BatchNorm)
        assert model["a"][0].layer == "twice/a.0" and store.list_layers("twice/") == ["twice/a.0"]


def test_bad_arguments_say_what_was_wrong():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    with normsvc.Store.open("memory://") as store:
        with pytest.raises(normsvc.InvalidArgument, match="mode='async': expected 'sync' or 'shared'"):
            nt.convert(net, store, mode="async")
        with pytest.raises(normsvc.InvalidType, match="target must be a normsvc.Client or a normsvc.Store"):
            nt.convert(net, "127.0.0.1:50051")
        with pytest.raises(normsvc.InvalidType, match="torch.nn.Module"):
            nt.convert("net", store)
        with pytest.raises(normsvc.InvalidArgument, match="world_size is missing"):
            nt.convert(net, store, rank=0)
        with pytest.raises(normsvc.InvalidArgument, match=r"rank=2, world_size=2: expected 0 <= rank"):
            nt.convert(net, store, rank=2, world_size=2)
        with pytest.raises(normsvc.InvalidArgument, match="needs a normsvc.Client"):
            nt.convert(net, store, rank=0, world_size=2)
        with pytest.raises(normsvc.InvalidArgument, match="memory:// Store is private"):
            nt.convert(net, store, mode="shared", rank=0, world_size=2)
        with pytest.raises(normsvc.InvalidArgument, match="timeout=-1"):
            nt.convert(net, store, timeout=-1)
        with pytest.raises(normsvc.InvalidArgument, match="max_pending=0"):
            nt.convert(net, store, mode="shared", max_pending=0)
        with pytest.raises(normsvc.InvalidArgument, match="holds no BatchNorm"):
            nt.convert(nn.Linear(2, 2), store)
        with pytest.raises(normsvc.InvalidArgument, match="expected a prefix"):
            nt.convert(nn.BatchNorm1d(2), store)
        with pytest.raises(normsvc.InvalidArgument, match="has not seen a batch yet"):
            nt.convert(nn.Sequential(nn.LazyBatchNorm1d()), store)
        store.create_layer("clash/1", axis=1, convention="torch", momentum=0.2, num_features=3)
        with pytest.raises(normsvc.ConfigConflict, match="momentum is 0.2, not 0.1"):
            nt.convert(net, store, prefix="clash/")
        converted = nt.convert(net, store, prefix="ok/")
        with pytest.raises(normsvc.InvalidArgument, match="already backed by normsvc"):
            nt.convert(converted, store, prefix="again/")
        with pytest.raises(normsvc.InvalidArgument, match="holds no BatchNorm converted"):
            nt.flush(nn.Linear(2, 2))
        with pytest.raises(TypeError, match="state_dict"):
            torch.save(converted, os.devnull)
        with pytest.raises(normsvc.InvalidArgument, match="no statistics for"):
            nt.load_running_stats(nn.Sequential(nn.BatchNorm1d(3)), store, prefix="nowhere/")
        with pytest.raises(normsvc.InvalidArgument, match="no file"):
            nt.load_running_stats(net, "/nonexistent/stats.safetensors")
        with pytest.raises(normsvc.InvalidArgument, match="dtype"):
            nt.state_dict(store, dtype=torch.int32)
    import asyncio

    from normsvc.client import AsyncClient

    async def with_async_client():  # an AsyncClient belongs to an event loop: made inside one
        async with AsyncClient("127.0.0.1:1") as aclient:
            with pytest.raises(normsvc.InvalidType, match="AsyncClient"):
                nt.convert(net, aclient)

    asyncio.run(with_async_client())


def test_load_running_stats_and_state_dict_from_client_store_and_file(tmp_path):
    torch.manual_seed(4)
    with running_server() as server, normsvc.Client(server.address) as client:
        trained = nt.convert(tw.Net(), client, mode="shared", prefix="zoo/net/")
        for step in range(3):
            trained(tw.batch(0, step)[0])
        nt.flush(trained)
        expected = {k: v for k, v in trained.state_dict().items() if "running" in k or "num_batches" in k}
        assert expected["bn1.num_batches_tracked"].item() == 3

        def check(model, what):
            for key, value in expected.items():
                got = model.state_dict()[key]
                assert got.dtype == value.dtype, f"{what} {key}"
                close(got, value, f"{what} {key}")

        plain = tw.Net()
        assert nt.load_running_stats(plain, client, prefix="zoo/net/") == ["bn1", "bn2", "bn3"]
        check(plain, "from a Client")

        stripped = tmp_path / "net.safetensors"
        client.export(stripped, naming="torch", prefix="zoo/net/", strip_prefix=True, dtype="float32")
        plain = tw.Net()
        nt.load_running_stats(plain, stripped)
        check(plain, "from a file without the prefix")
        full = tmp_path / "all.safetensors"
        client.export(full, naming="torch")
        plain = tw.Net()
        nt.load_running_stats(plain, str(full), prefix="zoo/net/")
        check(plain, "from a file with the store's names")

        with normsvc.Store.open(f"sqlite:///{tmp_path / 's.db'}") as store:
            store.import_(full, naming="torch")
            plain = tw.Net()
            nt.load_running_stats(plain, store, prefix="zoo/net/")
            check(plain, "from a Store")

        for source, prefix in ((client, "zoo/net/"), (stripped, None), (full, "zoo/net/")):
            plain = tw.Net()
            state = plain.state_dict()
            update = nt.state_dict(source, prefix=prefix)
            assert set(update) == set(expected)
            assert update["bn1.running_mean"].dtype == torch.float32
            state.update(update)
            plain.load_state_dict(state, strict=True)
            check(plain, f"state_dict of {source}")
        # the file export itself is a state_dict: float32 buffers under the module paths
        from safetensors.torch import load_file

        plain = tw.Net()
        plain.load_state_dict({**plain.state_dict(), **load_file(stripped)}, strict=True)
        check(plain, "safetensors.torch.load_file")

        wrong = r"no statistics for \['zoo/net/0'\]; statistics of no module: \['zoo/net/bn1', "
        with pytest.raises(normsvc.InvalidArgument, match=wrong):
            nt.load_running_stats(nn.Sequential(nn.BatchNorm2d(6)), str(full), prefix="zoo/net/")
        assert nt.load_running_stats(nn.Sequential(nn.BatchNorm2d(6)), str(full), prefix="zoo/net/",
                                     strict=False) == []
        nt.close(trained)


# --- packaging and README ----------------------------------------------------------------------------


def test_import_normsvc_does_not_import_torch():
    code = "import sys, normsvc; normsvc.Store; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _readme_blocks() -> list[str]:
    text = README.read_text()
    assert "\n## PyTorch\n" in text, "README.md has no '## PyTorch' section"
    body = text.split("\n## PyTorch\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def _torchrun(script: Path, env: dict, nproc: int = 2) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", str(script)], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout + done.stderr
    # the ranks share one pipe and print unbuffered: a line and another rank's may interleave
    return sorted(re.findall(r"rank \d+: \d+ updates", done.stdout))


@pytest.mark.timeout(300)
def test_readme_examples_run_under_torchrun(tmp_path):
    blocks = _readme_blocks()
    assert len(blocks) == 3, "expected the sync, shared and state_dict examples"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("NORMSVC_RUN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        env.pop(name, None)
    with running_server() as server:
        env["NORMSVC_TARGET"] = server.address
        for i, name in enumerate(("train_sync.py", "train_shared.py")):
            (tmp_path / name).write_text(blocks[i])
        assert _torchrun(tmp_path / "train_sync.py", env) == ["rank 0: 5 updates", "rank 1: 5 updates"]
        assert _torchrun(tmp_path / "train_shared.py", env) == ["rank 0: 20 updates", "rank 1: 20 updates"]
        done = subprocess.run([sys.executable, "-c", blocks[2]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["20", "20"]
        with normsvc.Client(server.address) as client:
            assert client.layer("example/sync/1").stats().num_batches == 5
            assert client.layer("example/shared/1").stats().num_batches == 20
