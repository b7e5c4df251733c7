"""One update per training step, over gRPC, with real worker processes and real servers.

Four worker processes (torch.multiprocessing, spawn) form a gloo process
group, agree on a run id (rank 0 draws it, broadcast_object_list), and push
their own shard of the data-parallel golden inputs (tests/golden_steps.py) as
step contributions to ``normsvc serve`` subprocesses over ``memory://`` and a
sqlite file, in an arrival order shuffled by random sleeps.  The references
are torch BatchNorm2d (momentum 0.1 and None), Keras BatchNormalization
(momentum 0.9) and exact cumulative statistics, each fed the concatenated
batch of every step: never normsvc itself.

Also here: kill -9 of the sqlite server between the ranks of a step, a rerun
after a restart (refused, never skipped), request ids bound to their content
through the client, and AllReduceMoments reruns.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import uuid

import numpy as np
import pytest

import normsvc
from golden_steps import load_steps
from normsvc.config import RUN_VARIABLES
from server_util import ServerProcess
from step_keys import BAD_KEYS

G = load_steps()
CASES = ["torch_m0.1", "torch_cma", "keras_m0.9", "cumulative"]
RTOL = 1e-6  # the tolerance against the golden records
WORLD = G.workers

pytestmark = pytest.mark.timeout(180)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def serve_process(store_url: str, port: int = 0) -> ServerProcess:
    return ServerProcess(["--port", str(port), "--store", store_url, "--log-level", "WARNING"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def golden_moments(case, t: int, rank: int) -> normsvc.Moments:
    """Rank ``rank``'s batch moments at step ``t``, computed with torch (biased variance, as pushed)."""
    import torch

    x = torch.from_numpy(np.array(case.x[t, rank]))  # a writable copy
    var, mean = torch.var_mean(x, dim=case.reduce_axes, unbiased=False)
    count = x.numel() // x.shape[case.feature_axis]
    return normsvc.Moments.from_variance(float(count), mean.numpy(), var.numpy())


def assert_golden(case, mean, variance, num_batches, t: int | None) -> None:
    """The reference's state after step ``t`` (None: before the first)."""
    mean, variance = np.asarray(mean), np.asarray(variance)
    if t is None:
        if case.init_mean is not None:
            np.testing.assert_array_equal(np.broadcast_to(mean, case.init_mean.shape), case.init_mean)
            np.testing.assert_array_equal(np.broadcast_to(variance, case.init_variance.shape), case.init_variance)
        assert num_batches == 0
        return
    np.testing.assert_allclose(mean, case.mean[t], rtol=RTOL, atol=0, err_msg=f"{case.name} mean, step {t}")
    np.testing.assert_allclose(variance, case.variance[t], rtol=RTOL, atol=0,
                               err_msg=f"{case.name} variance, step {t}")
    assert num_batches == case.num_batches[t]


def push_step(layers, case, t, run, rng, ranks=None, **kw):
    """Every rank (one client each) pushes its step-``t`` contribution, in a shuffled order."""
    out = None
    for w in (rng.permutation(WORLD) if ranks is None else ranks):
        out = layers[int(w)].update(golden_moments(case, t, int(w)), step=t, rank=int(w), world_size=WORLD,
                                    run=run, **kw)
    return out


@pytest.fixture
def no_launcher_run(monkeypatch):
    """No NORMSVC_RUN / launcher job id in the environment: the default run is ""."""
    for name in RUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------
# 4 worker processes x 20 steps, memory and sqlite servers at once
# --------------------------------------------------------------------------
def _worker(rank: int, world: int, init_file: str, targets: list, out_dir: str) -> None:
    """One data-parallel rank: agree on the run, then push every step's moments to every server."""
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        box = [uuid.uuid4().hex if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        run = box[0]
        clients = [normsvc.Client(target) for target in targets]
        layers = {(i, name): client.layer(f"dp/{name}") for i, client in enumerate(clients) for name in CASES}
        jobs = list(layers)
        shuffle = random.Random(7919 * rank + 1)
        seen = []
        for t in range(G.steps):
            moments = {name: golden_moments(G.cases[name], t, rank) for name in CASES}
            shuffle.shuffle(jobs)
            for server, name in jobs:
                time.sleep(shuffle.uniform(0.0, 0.004))  # arrival order shuffled on purpose
                s = layers[server, name].update(moments[name], step=t, rank=rank, world_size=world, run=run)
                seen.append([server, name, t, s.run, s.last_step, s.mean.tolist(), s.variance.tolist(),
                             s.num_batches, s.version])
            if t % 4 == 3:
                dist.barrier()  # stands for the gradient all-reduce: no rank runs more than 3 steps ahead
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"run": run, "seen": seen}, f)
        for client in clients:
            client.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_four_worker_processes_reproduce_torch_and_keras(tmp_path):
    import torch.multiprocessing as mp

    servers = {"memory": serve_process("memory://"),
               "sqlite": serve_process(f"sqlite:///{tmp_path / 'stats.db'}")}
    try:
        targets = [s.address for s in servers.values()]
        for target in targets:
            with normsvc.Client(target) as client:
                for name in CASES:
                    client.create_layer(f"dp/{name}", **G.cases[name].layer_kwargs)
        out = tmp_path / "out"
        out.mkdir()
        mp.spawn(_worker, args=(WORLD, str(tmp_path / "rendezvous"), targets, str(out)), nprocs=WORLD, join=True)

        reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
        run = reports[0]["run"]
        assert len(run) == 32 and all(rep["run"] == run for rep in reports)  # agreed through torch.distributed
        checked = 0
        for rep in reports:  # what every acknowledged push answered
            assert len(rep["seen"]) == G.steps * len(targets) * len(CASES)
            for server, name, t, s_run, last_step, mean, variance, num_batches, version in rep["seen"]:
                assert s_run == run
                assert last_step is None or last_step <= t  # no step completes before this rank sent it
                assert version == (0 if last_step is None else last_step + 1)
                assert_golden(G.cases[name], mean, variance, num_batches, last_step)
                checked += last_step is not None
        assert checked > 0
        for label, target in zip(servers, targets):
            with normsvc.Client(target) as client:
                for name in CASES:
                    stats = client.layer(f"dp/{name}").stats()
                    assert (stats.run, stats.last_step, stats.version) == (run, G.steps - 1, G.steps), label
                    assert_golden(G.cases[name], stats.mean, stats.variance, stats.num_batches, G.steps - 1)
                    assert stats.count == G.count_per_step * G.steps
    finally:
        for s in servers.values():
            s.kill()


# --------------------------------------------------------------------------
# crashes, restarts and reruns (sqlite server subprocess)
# --------------------------------------------------------------------------
def test_contributions_survive_kill_9_between_ranks(tmp_path, rng):
    url, port = f"sqlite:///{tmp_path / 'stats.db'}", free_port()
    case = G.cases["torch_m0.1"]
    server = serve_process(url, port)
    clients = []
    try:
        clients = [normsvc.Client(server.address) for _ in range(WORLD)]  # one per rank
        clients[0].create_layer("dp/bn", **case.layer_kwargs)
        layers = [client.layer("dp/bn") for client in clients]
        run = uuid.uuid4().hex
        kills = 0
        for t in range(G.steps):
            order = [int(w) for w in rng.permutation(WORLD)]
            if t in (0, 7, G.steps - 1):  # 2 of 4 ranks acknowledged, then kill -9 and restart on the same file
                push_step(layers, case, t, run, rng, ranks=order[:2])
                server.proc.send_signal(signal.SIGKILL)
                assert server.proc.wait(timeout=30) == -signal.SIGKILL
                server = serve_process(url, port)
                kills += 1
                stats = layers[order[2]].stats()
                assert (stats.run, stats.last_step) == (run, None if t == 0 else t - 1)
                order = order[2:]
            stats = push_step(layers, case, t, run, rng, ranks=order)
            assert (stats.run, stats.last_step, stats.version) == (run, t, t + 1)
            assert_golden(case, stats.mean, stats.variance, stats.num_batches, t)
        assert kills == 3
    finally:
        for client in clients:
            client.close()
        server.kill()


def test_a_rerun_after_a_restart_is_refused_never_skipped(tmp_path, rng, no_launcher_run):
    url = f"sqlite:///{tmp_path / 'stats.db'}"
    case = G.cases["torch_m0.1"]
    server = serve_process(url)
    try:
        with normsvc.Client(server.address) as client:
            client.create_layer("dp/bn", **case.layer_kwargs)
            layers = [client.layer("dp/bn")] * WORLD
            for t in range(G.steps):  # run left out: the default run, ""
                stats = push_step(layers, case, t, None, rng)
            assert (stats.run, stats.last_step) == ("", G.steps - 1)
        server.kill()  # the job is restarted: so is the server, on the same file
        server = serve_process(url)
        with normsvc.Client(server.address) as client:
            layer = client.layer("dp/bn")
            before = layer.stats()
            assert_golden(case, before.mean, before.variance, before.num_batches, G.steps - 1)
            for t in (0, 1, G.steps - 1):  # the rerun: the same steps of the same (default) run
                for w in range(WORLD):
                    for run in (None, ""):
                        with pytest.raises(normsvc.FailedPrecondition) as info:
                            layer.update(golden_moments(case, t, w), step=t, rank=w, world_size=WORLD, run=run)
                        assert info.value.reason == "STEP_APPLIED", info.value
                        assert f"step {t}" in str(info.value)
            assert layer.stats() == before  # nothing merged, nothing skipped silently
            # with a new run the rerun is applied: one more update from the state the first run left
            stats = push_step([layer] * WORLD, case, 0, "rerun-2", rng)
            assert (stats.run, stats.last_step, stats.num_batches, stats.version) == (
                "rerun-2", 0, G.steps + 1, before.version + 1)
            n = G.count_per_step
            np.testing.assert_allclose(stats.mean, 0.9 * case.mean[-1] + 0.1 * G.step_mean[0], rtol=RTOL)
            np.testing.assert_allclose(stats.variance,
                                       0.9 * case.variance[-1] + 0.1 * G.step_variance[0] * n / (n - 1), rtol=RTOL)
    finally:
        server.kill()


# --------------------------------------------------------------------------
# the rule for incomplete steps, over gRPC
# --------------------------------------------------------------------------
def test_a_step_missing_a_rank_is_closed_after_the_lag(start_server, tmp_path, rng):
    server = start_server(f"sqlite:///{tmp_path / 'stats.db'}", step_lag=3)
    case = G.cases["torch_m0.1"]
    run = uuid.uuid4().hex
    with normsvc.Client(server.address) as client:
        layers = [client.create_layer("dp/bn", **case.layer_kwargs)] * WORLD
        push_step(layers, case, 0, run, rng, ranks=[3, 0, 1])  # rank 2 never sends step 0
        for t in (1, 2):
            stats = push_step(layers, case, t, run, rng)
        assert (stats.last_step, stats.version) == (None, 0)  # complete, but waiting for step 0
        stats = push_step(layers, case, 3, run, rng, ranks=[2])  # 3 steps ahead: step 0 closes with 3 ranks
        assert (stats.last_step, stats.num_batches, stats.version) == (2, 3, 3)
        registry = server.metrics.registry
        assert registry.get_sample_value("normsvc_steps_closed_incomplete_total") == 1
        # independent reference: numpy over the 3 ranks' data, then the two complete steps
        x = np.concatenate([case.x[0, w] for w in (0, 1, 3)])
        n = x.size // x.shape[1]
        batches = [(n, x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3)))]
        batches += [(G.count_per_step, G.step_mean[t], G.step_variance[t]) for t in (1, 2)]
        mean, var = np.zeros(5), np.ones(5)
        for k, bm, bv in batches:
            mean, var = 0.9 * mean + 0.1 * bm, 0.9 * var + 0.1 * bv * k / (k - 1)
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-10)
        np.testing.assert_allclose(stats.variance, var, rtol=1e-10)
        with pytest.raises(normsvc.FailedPrecondition) as info:  # the late rank: refused, never merged
            layers[2].update(golden_moments(case, 0, 2), step=0, rank=2, world_size=WORLD, run=run)
        assert info.value.reason == "STEP_APPLIED"
        stats = push_step(layers, case, 3, run, rng, ranks=[1, 3, 0])
        assert (stats.last_step, stats.num_batches) == (3, 4)
        assert registry.get_sample_value("normsvc_steps_closed_incomplete_total") == 1


def test_normsvc_serve_takes_step_lag(rng):
    server = ServerProcess(["--port", "0", "--store", "memory://", "--log-level", "WARNING", "--step-lag", "2"])
    try:
        case = G.cases["torch_m0.1"]
        with normsvc.Client(server.address) as client:
            layers = [client.create_layer("dp/bn", **case.layer_kwargs)] * WORLD
            push_step(layers, case, 0, "r", rng, ranks=[0, 1, 2])
            assert push_step(layers, case, 2, "r", rng, ranks=[0]).last_step == 0
    finally:
        server.kill()


# --------------------------------------------------------------------------
# request ids through the client (in-process servers over memory and sqlite)
# --------------------------------------------------------------------------
def test_a_reused_request_id_with_other_data_is_refused(server, rng):
    case = G.cases["torch_m0.1"]
    with normsvc.Client(server.address) as client:
        layer = client.create_layer("bn", **case.layer_kwargs)
        layer.update(golden_moments(case, 0, 0), request_id="w0/0")
        before = layer.stats()
        with pytest.raises(normsvc.AlreadyExists) as info:
            layer.update(golden_moments(case, 0, 1), request_id="w0/0")
        assert info.value.reason == "REQUEST_ID_REUSED" and info.value.field == "request_id"
        assert layer.stats() == before
        assert layer.update(golden_moments(case, 0, 0), request_id="w0/0") == before  # a retry
        assert layer.stats() == before

        # step contributions: two workers sharing one id (f"step-{step}") -- the second is refused
        steps = client.create_layer("dp/bn", **case.layer_kwargs)
        run = uuid.uuid4().hex
        steps.update(golden_moments(case, 0, 0), step=0, rank=0, world_size=WORLD, run=run, request_id="step-0")
        pending = steps.stats()
        with pytest.raises(normsvc.AlreadyExists) as info:
            steps.update(golden_moments(case, 0, 1), step=0, rank=1, world_size=WORLD, run=run,
                         request_id="step-0")
        assert info.value.reason == "REQUEST_ID_REUSED"
        assert steps.stats() == pending
        # ids unique per worker, bound to their content: the step completes with the 4 ranks' data
        for w in (1, 2, 3):
            stats = steps.update(golden_moments(case, 0, w), step=0, rank=w, world_size=WORLD, run=run,
                                 request_id=f"{run}/{w}/0")
        assert stats.last_step == 0
        assert_golden(case, stats.mean, stats.variance, stats.num_batches, 0)
        with pytest.raises(normsvc.AlreadyExists):  # the same id with other data, after the step applied
            steps.update(golden_moments(case, 1, 3), step=1, rank=3, world_size=WORLD, run=run,
                         request_id=f"{run}/3/0")
        again = steps.update(golden_moments(case, 0, 3), step=0, rank=3, world_size=WORLD, run=run,
                             request_id=f"{run}/3/0")  # a retry of an acknowledged contribution
        assert again == stats == steps.stats()


def test_conflicting_contribution_and_ended_run_through_the_client(server, rng):
    case = G.cases["keras_m0.9"]
    with normsvc.Client(server.address) as client:
        layer = client.create_layer("dp/bn", **case.layer_kwargs)
        layer.update(golden_moments(case, 0, 0), step=0, rank=0, world_size=WORLD, run="a")
        before = layer.stats()
        with pytest.raises(normsvc.AlreadyExists) as info:
            layer.update(golden_moments(case, 0, 1), step=0, rank=0, world_size=WORLD, run="a")
        assert info.value.reason == "CONTRIBUTION_CONFLICT"
        layer.update(golden_moments(case, 0, 0), step=0, rank=0, world_size=WORLD, run="b")  # ends run a
        with pytest.raises(normsvc.FailedPrecondition) as info:
            layer.update(golden_moments(case, 0, 1), step=0, rank=1, world_size=WORLD, run="a")
        assert info.value.reason == "RUN_ENDED"
        with pytest.raises(normsvc.InvalidArgument) as info:
            layer.update(golden_moments(case, 0, 1), step=0, rank=1, world_size=2, run="b")
        assert info.value.field == "world_size"
        assert layer.stats().last_step is None and layer.stats().version == before.version
        stats = push_step([layer] * WORLD, case, 0, "b", rng, ranks=[3, 1, 2])
        assert (stats.run, stats.last_step) == ("b", 0)
        assert_golden(case, stats.mean, stats.variance, stats.num_batches, 0)


# --------------------------------------------------------------------------
# argument validation through the client: as the Store's
# --------------------------------------------------------------------------
# the wire cannot tell rank=0 or world_size=0 from "not set": the client checks them as the Store does
@pytest.mark.parametrize("key, field", BAD_KEYS, ids=lambda v: "-".join(v) if isinstance(v, dict) else v)
def test_bad_step_arguments_are_refused_by_the_client_as_by_the_store(memory_server, rng, key, field):
    case = G.cases["torch_m0.1"]
    with normsvc.Client(memory_server.address) as client:
        layer = client.create_layer("dp/bn", **case.layer_kwargs)
        layer.update(golden_moments(case, 0, 1), step=0, rank=1, world_size=2, run="")  # rank 1 pending
        before = layer.stats()
        try:
            with pytest.raises(normsvc.InvalidArgument) as info:
                layer.update(golden_moments(case, 0, 0), **key)
            assert info.value.field == field, info.value
        finally:
            assert layer.stats() == before
        stats = layer.update(golden_moments(case, 0, 3), step=0, rank=0, world_size=2, run="")
        assert (stats.last_step, stats.num_batches) == (0, 1)


# --------------------------------------------------------------------------
# AllReduceMoments: a rerun is refused for the running statistics
# --------------------------------------------------------------------------
def _allreduce_step(clients, case, t, run):
    """Each rank (a thread with its own client) joins step ``t``; returns [AllReduceResult or error]."""
    results = [None] * WORLD

    def rank_main(w):
        try:
            results[w] = clients[w].allreduce({"sync/bn": golden_moments(case, t, w)}, step=t, rank=w,
                                              world_size=WORLD, run=run, group="sync", timeout=30)
        except normsvc.NormsvcError as exc:
            results[w] = exc

    threads = [threading.Thread(target=rank_main, args=(w,)) for w in range(WORLD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_allreduce_rerun_is_refused_never_skipped(tmp_path):
    url = f"sqlite:///{tmp_path / 'stats.db'}"
    case = G.cases["torch_m0.1"]
    server = serve_process(url)
    clients = [normsvc.Client(server.address) for _ in range(WORLD)]
    try:
        clients[0].create_layer("sync/bn", **case.layer_kwargs)
        run = uuid.uuid4().hex
        for t in range(3):
            results = _allreduce_step(clients, case, t, run)
            assert all(isinstance(r, normsvc.client.AllReduceResult) for r in results), results
            for r in results:  # every rank gets the moments of the concatenated batch
                g = r.moments["sync/bn"]
                np.testing.assert_allclose(g.mean, G.step_mean[t], rtol=1e-12)
                np.testing.assert_allclose(g.variance, G.step_variance[t], rtol=1e-12)
                s = r.stats["sync/bn"]
                assert (s.run, s.last_step) == (run, t)
                assert_golden(case, s.mean, s.variance, s.num_batches, t)
        before = clients[0].layer("sync/bn").stats()
        # the same run and step again, on the running server: every rank is refused
        results = _allreduce_step(clients, case, 2, run)
        assert all(isinstance(r, (normsvc.AlreadyExists, normsvc.FailedPrecondition)) for r in results), results
        assert clients[0].layer("sync/bn").stats() == before
        # after a restart the rendezvous has forgotten the step; the layer has not
        for client in clients:
            client.close()
        server.kill()
        server = serve_process(url)
        clients = [normsvc.Client(server.address) for _ in range(WORLD)]
        for t in (2, 0):
            results = _allreduce_step(clients, case, t, run)
            assert all(isinstance(r, normsvc.FailedPrecondition) and r.reason == "STEP_APPLIED"
                       for r in results), results
        assert clients[0].layer("sync/bn").stats() == before
        # a new run is applied
        results = _allreduce_step(clients, case, 0, "rerun-2")
        assert all(isinstance(r, normsvc.client.AllReduceResult) for r in results), results
        s = results[0].stats["sync/bn"]
        assert (s.run, s.last_step, s.num_batches) == ("rerun-2", 0, 4)
    finally:
        for client in clients:
            client.close()
        server.kill()
