"""normsvc.rl: shared observation and return normalizers, against numpy and Stable-Baselines3.

Real parts only: a real server on loopback, real actor processes, SB3's own
RunningMeanStd and VecNormalize as the reference.  Tolerances: the service's
statistics against numpy float64 over all samples, 1e-12 relative; this
module's SB3 numbers (prior included) against SB3's, 1e-10 relative (the
merges run in another order); normalized float32 values within one float32
ulp of VecNormalize's (they come out equal on these streams).
"""

from __future__ import annotations

import asyncio
import doctest
import importlib
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from normsvc import Client, Store
from normsvc.errors import (ConfigConflict, FrozenLayer, InvalidArgument, InvalidType, LayerNotFound,
                            Unavailable)
from normsvc.rl import RmsState, SharedReturnNormalizer, SharedRunningMeanStd
from normsvc.testing import running_server

ROOT = Path(__file__).resolve().parents[1]
EXACT = dict(rtol=1e-12, atol=0)
SB3 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2 ** -23, atol=1e-7)  # one float32 ulp


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


@pytest.fixture
def client(server):
    with Client(server.address) as c:
        yield c


@pytest.fixture
def store():
    with Store.open("memory://") as s:
        yield s


@pytest.fixture
def name(request) -> str:
    """A layer name of this test's own (the server is shared by the module's tests)."""
    return "t/" + re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:80]


def _sb3():
    return pytest.importorskip("stable_baselines3")


def _numpy_sb3(x: np.ndarray, epsilon: float = 1e-4):
    """SB3's numbers for samples ``x``, from numpy: prior (epsilon, 0, 1) merged with their exact moments."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    mean, var = x.mean(axis=0), x.var(axis=0)
    total = epsilon + n
    return mean * n / total, (epsilon + var * n + mean * mean * epsilon * n / total) / total, total


# --- import hygiene and doctests ---------------------------------------------------


def test_import_normsvc_does_not_import_rl_and_rl_imports_no_framework():
    code = ("import sys, normsvc\n"
            "assert 'normsvc.rl' not in sys.modules, 'import normsvc imported normsvc.rl'\n"
            "import normsvc.rl\n"
            "bad = [m for m in ('torch', 'stable_baselines3', 'gymnasium', 'grpc') if m in sys.modules]\n"
            "assert not bad, bad\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_doctests():
    result = doctest.testmod(importlib.import_module("normsvc.rl"))
    assert result.attempted > 5 and result.failed == 0


# --- 8 actor processes -------------------------------------------------------------

FLEET, STEPS, ENVS, EVERY, GAMMA = 8, 103, 4, 37, 0.9


def _fleet_data(rank: int):
    """Actor ``rank``'s stream: observations with an offset and spread of its own, rewards, dones."""
    rng = np.random.default_rng(1000 + rank)
    obs = rng.normal([10.0 * rank, -5.0 * rank, 1e3], [1.0 + rank, 0.1, 3.0], size=(STEPS, ENVS, 3))
    rewards = rng.normal(rank, 1.0, size=(STEPS, ENVS)).astype(np.float32)
    dones = rng.random((STEPS, ENVS)) < 0.05
    return obs, rewards, dones


def _fleet_returns(rewards, dones) -> np.ndarray:
    """The discounted returns VecNormalize feeds its ret_rms, step by step."""
    returns, out = np.zeros(ENVS), []
    for r, d in zip(rewards, dones):
        returns = returns * GAMMA + r
        out.append(returns)
        returns = np.where(d, 0.0, returns)
    return np.concatenate(out)


def _fleet_actor(address: str, prefix: str, rank: int):
    obs, rewards, dones = _fleet_data(rank)
    with Client(address) as c:
        o = SharedRunningMeanStd(c, f"{prefix}/obs", (3,), push_every=EVERY, push_interval=None)
        r = SharedReturnNormalizer(c, f"{prefix}/ret", ENVS, gamma=GAMMA, push_with=o)
        for t in range(STEPS):
            o.update(obs[t])
            y = o.normalize(obs[t])
            z = r.step(rewards[t], dones[t])
            assert y.dtype == z.dtype == np.float32 and np.abs(y).max() <= 10.0
        before = o.pushes
        o.flush()
        return before, o.pushes, o.count


@pytest.mark.timeout(120)
def test_eight_actor_processes_give_the_exact_statistics_of_all_observations(server, client):
    prefix = "fleet"
    ctx = mp.get_context("forkserver")  # fresh processes (no gRPC state of ours), forked from a preloaded one
    ctx.set_forkserver_preload(["numpy", "normsvc.rl", "normsvc.client", "test_rl"])
    with ProcessPoolExecutor(FLEET, mp_context=ctx) as pool:
        results = list(pool.map(_fleet_actor, [server.address] * FLEET, [prefix] * FLEET, range(FLEET)))
    data = [_fleet_data(rank) for rank in range(FLEET)]
    all_obs = np.concatenate([obs.reshape(-1, 3) for obs, _, _ in data])
    all_returns = np.concatenate([_fleet_returns(rewards, dones) for _, rewards, dones in data])

    obs_stats = client.layer(f"{prefix}/obs").stats()
    np.testing.assert_allclose(obs_stats.mean, all_obs.mean(axis=0), **EXACT)
    np.testing.assert_allclose(obs_stats.variance, all_obs.var(axis=0), **EXACT)
    assert obs_stats.count == len(all_obs) == FLEET * STEPS * ENVS
    ret_stats = client.layer(f"{prefix}/ret").stats()
    np.testing.assert_allclose(ret_stats.mean, [all_returns.mean()], **EXACT)
    np.testing.assert_allclose(ret_stats.variance, [all_returns.var()], **EXACT)
    assert ret_stats.count == len(all_returns)

    # buffering: a push every ceil(37 / 4) = 10 updates, then the flush: one request for both layers each
    per_actor = STEPS // 10 + 1
    assert [(before, after) for before, after, _ in results] == [(STEPS // 10, per_actor)] * FLEET
    assert obs_stats.version == ret_stats.version == FLEET * per_actor
    # each actor's view: at least its own samples, plus whatever the answers brought of the others'
    assert all(STEPS * ENVS < count <= len(all_obs) + 1e-4 for _, _, count in results)

    # a learner reads one version, in SB3's numbers
    learner = SharedRunningMeanStd(client, f"{prefix}/obs", (3,), create=False)
    state = learner.pull()
    assert isinstance(state, RmsState) and state.version == obs_stats.version
    mean, var, count = _numpy_sb3(all_obs)
    np.testing.assert_allclose(state.mean, mean, **SB3)
    np.testing.assert_allclose(state.var, var, **SB3)
    assert state.count == pytest.approx(count, rel=1e-15)
    rms = _sb3().common.running_mean_std.RunningMeanStd(shape=(3,))
    rms.update(all_obs)
    np.testing.assert_allclose(state.mean, rms.mean, **SB3)
    np.testing.assert_allclose(state.var, rms.var, **SB3)


# --- against Stable-Baselines3 -------------------------------------------------------


def _tiny_env_class():
    gym = pytest.importorskip("gymnasium")
    spaces = gym.spaces

    class Tiny(gym.Env):
        """Deterministic: observations far from 0 in one axis, episodes of 7 + k steps, rewards in -1.5..2.5."""

        def __init__(self, k: int, dtype=np.float64):
            self.k, self.t, self.dtype = k, 0, dtype
            self.observation_space = spaces.Box(-np.inf, np.inf, (3,), dtype)
            self.action_space = spaces.Discrete(2)

        def _obs(self):
            t = self.t
            return np.array([100.0 + self.k + np.sin(t), 5 * np.cos(0.3 * t + self.k), (t * 7 + self.k) % 11],
                            self.dtype)

        def reset(self, *, seed=None, options=None):
            self.t = 0
            return self._obs(), {}

        def step(self, action):
            self.t += 1
            return self._obs(), float((self.t * 3 + self.k) % 5) - 1.5, self.t % (7 + self.k) == 0, False, {}

    return Tiny


@pytest.mark.parametrize("push_every", [1, 5, 4096])
def test_normalized_observations_and_rewards_equal_vecnormalize(client, name, push_every):
    _sb3()
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    Tiny, n = _tiny_env_class(), 4
    make = lambda: DummyVecEnv([lambda k=k: Tiny(k) for k in range(n)])
    reference, raw = VecNormalize(make(), gamma=0.9, clip_obs=1.2, clip_reward=0.5), make()
    obs_rms = SharedRunningMeanStd(client, f"{name}/obs", (3,), push_every=push_every, push_interval=None)
    ret = SharedReturnNormalizer(client, f"{name}/ret", n, gamma=0.9, clip_reward=0.5, push_with=obs_rms)

    want = reference.reset()
    obs = raw.reset()
    obs_rms.update(obs)  # VecNormalize.reset updates obs_rms too
    ret.reset()
    np.testing.assert_allclose(obs_rms.normalize(obs, clip=1.2), want, **F32)
    clipped = np.zeros(2, dtype=int)
    for _ in range(120):
        want_obs, want_rewards, want_dones, _ = reference.step(np.zeros(n, dtype=int))
        obs, rewards, dones, _ = raw.step(np.zeros(n, dtype=int))
        np.testing.assert_array_equal(dones, want_dones)
        obs_rms.update(obs)
        got_obs = obs_rms.normalize(obs, clip=1.2)
        got_rewards = ret.step(rewards, dones)
        assert got_obs.dtype == want_obs.dtype == np.float32
        assert got_rewards.dtype == want_rewards.dtype == np.float32
        np.testing.assert_allclose(got_obs, want_obs, **F32)
        np.testing.assert_allclose(got_rewards, want_rewards, **F32)
        np.testing.assert_allclose(obs_rms.mean, reference.obs_rms.mean, **SB3)
        np.testing.assert_allclose(obs_rms.var, reference.obs_rms.var, **SB3)
        np.testing.assert_allclose(ret.ret_rms.var, reference.ret_rms.var, **SB3)
        assert obs_rms.count == pytest.approx(reference.obs_rms.count, rel=1e-15)
        np.testing.assert_array_equal(ret.returns, reference.returns)
        clipped += [(np.abs(got_obs) == np.float32(1.2)).sum(), (np.abs(got_rewards) == np.float32(0.5)).sum()]
    assert (clipped > 0).all(), clipped  # the stream reaches both clips
    np.testing.assert_allclose(obs_rms.unnormalize(obs_rms.normalize(obs, clip=None, dtype=None)), obs, rtol=1e-12)
    np.testing.assert_allclose(obs_rms.unnormalize(got_obs), reference.unnormalize_obs(got_obs), **SB3)
    np.testing.assert_allclose(ret.unnormalize(got_rewards), reference.unnormalize_reward(got_rewards), **SB3)
    obs_rms.flush()
    assert obs_rms.pending == 0 and ret.ret_rms.pending == 0


def test_running_mean_std_matches_sb3_after_every_update(store, rng):
    """Batches of any size, a 2-D observation shape, a Store in-process: SB3's numbers after each update."""
    RunningMeanStd = _sb3().common.running_mean_std.RunningMeanStd
    shape = (2, 3)
    shared = SharedRunningMeanStd(store, "grid/obs", shape, push_every=7, push_interval=None)
    reference, seen = RunningMeanStd(shape=shape), []
    np.testing.assert_array_equal(shared.mean, reference.mean)
    np.testing.assert_array_equal(shared.var, reference.var)
    assert shared.count == reference.count == 1e-4
    for i in range(40):
        batch = rng.normal(50.0 + i, 1.0 + (i % 3), size=(int(rng.integers(1, 6)), *shape))
        shared.update(batch)
        reference.update(batch)
        seen.append(batch)
        np.testing.assert_allclose(shared.mean, reference.mean, **SB3)
        np.testing.assert_allclose(shared.var, reference.var, **SB3)
        assert shared.count == pytest.approx(reference.count, rel=1e-15)
        x = rng.normal(50.0, 10.0, size=(3, *shape))
        want = np.clip((x - reference.mean) / np.sqrt(reference.var + 1e-8), -10, 10).astype(np.float32)
        np.testing.assert_allclose(shared.normalize(x), want, **F32)
    stats = store.layer("grid/obs").stats()
    everything = np.concatenate(seen)
    assert stats.mean.shape == shape and stats.count + shared.pending == len(everything)
    shared.flush()
    stats = store.layer("grid/obs").stats()
    np.testing.assert_allclose(stats.mean, everything.mean(axis=0), **EXACT)
    np.testing.assert_allclose(stats.variance, everything.var(axis=0), **EXACT)


def test_float32_observations_accumulate_in_float64(store, rng):
    """SB3 averages a float32 batch in float32; the shared statistics stay numpy float64 exact."""
    RunningMeanStd = _sb3().common.running_mean_std.RunningMeanStd
    shared = SharedRunningMeanStd(store, "f32/obs", (4,), push_every=64)
    reference, seen = RunningMeanStd(shape=(4,)), []
    for _ in range(50):
        batch = rng.normal(1e3, 1.0, size=(16, 4)).astype(np.float32)
        shared.update(batch)
        reference.update(batch)
        seen.append(batch)
    shared.flush()
    x = np.concatenate(seen).astype(np.float64)
    stats = store.layer("f32/obs").stats()
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), **EXACT)
    np.testing.assert_allclose(stats.variance, x.var(axis=0), **EXACT)
    np.testing.assert_allclose(shared.var, reference.var, rtol=1e-3)  # SB3's float32 batch variances


# --- buffering ---------------------------------------------------------------------


class _Counting:
    """A target that counts the UpdateStats requests it forwards."""

    def __init__(self, target):
        self._target, self.requests = target, []

    def update_many(self, updates, **kwargs):
        self.requests.append(sorted(updates))
        return self._target.update_many(updates, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._target, attr)


def test_pushes_every_k_samples_and_the_answer_brings_the_global_statistics(client, name):
    counting = _Counting(client)
    actor = SharedRunningMeanStd(counting, name, (), push_every=10, push_interval=None)
    other = SharedRunningMeanStd(client, name, (), push_every=1, push_interval=None)
    assert actor.version == 0 and actor.pushes == 0
    for i in range(95):
        actor.update(np.array([float(i)]))
    assert (actor.pushes, len(counting.requests), actor.pending) == (9, 9, 5.0)
    stats = client.layer(name).stats()
    assert (stats.version, stats.count) == (9, 90.0)
    assert actor.version == 9 and actor.count == pytest.approx(95 + 1e-4, rel=1e-15)  # pending included

    other.update(np.array([1000.0, 2000.0]))  # another actor's push: version 10
    assert actor.version == 9 and actor.count == pytest.approx(95 + 1e-4, rel=1e-15)  # not seen yet
    actor.flush()  # its answer holds the other's samples too
    assert (actor.version, actor.pushes, actor.pending) == (11, 10, 0.0)
    mean, var, count = _numpy_sb3(np.r_[np.arange(95.0), 1000.0, 2000.0])
    assert actor.count == pytest.approx(count, rel=1e-15)
    np.testing.assert_allclose(actor.mean, mean, **SB3)
    np.testing.assert_allclose(actor.var, var, **SB3)
    actor.flush()  # nothing pending: no request
    assert len(counting.requests) == 10


def test_an_actor_normalizes_with_the_last_global_statistics_and_its_own_pending_samples(store):
    a = SharedRunningMeanStd(store, "view/obs", (), push_every=4, push_interval=None)
    b = SharedRunningMeanStd(store, "view/obs", (), push_every=4, push_interval=None)
    a.update(np.array([1.0, 2.0, 3.0, 4.0]))  # pushed
    b.update(np.array([10.0]))  # pending
    assert b.count == pytest.approx(1 + 1e-4) and b.version == 0
    np.testing.assert_allclose(b.mean, _numpy_sb3([10.0])[0], **SB3)
    assert b.pull().version == 1  # the global statistics, still with its own pending sample
    assert b.count == pytest.approx(5 + 1e-4)
    np.testing.assert_allclose(b.mean, _numpy_sb3([1.0, 2.0, 3.0, 4.0, 10.0])[0], **SB3)
    np.testing.assert_allclose(b.var, _numpy_sb3([1.0, 2.0, 3.0, 4.0, 10.0])[1], **SB3)
    assert a.count == pytest.approx(4 + 1e-4)  # a has not seen b's pending sample
    assert store.layer("view/obs").stats().count == 4


def test_push_interval_pushes_on_the_next_update(store):
    rms = SharedRunningMeanStd(store, "timed/obs", (2,), push_every=10**6, push_interval=0.05)
    rms.update(np.ones((3, 2)))
    assert rms.pushes == 0
    time.sleep(0.06)
    rms.update(np.ones((1, 2)))
    assert rms.pushes == 1 and store.layer("timed/obs").stats().count == 4


def test_observations_and_returns_go_in_one_request(client, name):
    counting = _Counting(client)
    obs_rms = SharedRunningMeanStd(counting, f"{name}/obs", (2,), push_every=6, push_interval=None)
    ret = SharedReturnNormalizer(None, f"{name}/ret", 3, push_with=obs_rms)
    for _ in range(8):
        obs_rms.update(np.ones((3, 2)))
        ret.step(np.ones(3), np.zeros(3, dtype=bool))
    # a push every 2 updates of the observations (6 samples): one request, the returns ride along
    both = [f"{name}/obs", f"{name}/ret"]
    assert counting.requests == [sorted(both)] * 4 and obs_rms.pushes == 4
    obs_rms.flush()  # the returns of the last step
    assert counting.requests[4:] == [[f"{name}/ret"]] and obs_rms.pushes == 5
    assert [client.layer(n).stats().version for n in both] == [4, 5]
    assert [client.layer(n).stats().count for n in both] == [24, 24]


def test_an_address_opens_and_closes_its_own_client(server, name):
    with SharedRunningMeanStd(server.address, f"{name}/obs", (2,), push_every=100) as obs_rms:
        ret = SharedReturnNormalizer(server.address, f"{name}/ret", 2, push_with=obs_rms)
        obs_rms.update(np.ones((2, 2)))
        ret.update(np.ones(2))
    with Client(server.address) as c:
        assert c.layer(f"{name}/obs").stats().count == 2 and c.layer(f"{name}/ret").stats().count == 2


# --- failures: nothing lost, nothing applied twice ---------------------------------------


class _LostAnswer:
    """A target whose first UpdateStats is applied but its answer lost (Unavailable)."""

    def __init__(self, target):
        self._target, self.request_ids = target, []

    def update_many(self, updates, *, request_id=None):
        self.request_ids.append(request_id)
        answer = self._target.update_many(updates, request_id=request_id)
        if len(self.request_ids) == 1:
            raise Unavailable("the answer was lost")
        return answer

    def __getattr__(self, attr):
        return getattr(self._target, attr)


def test_a_push_whose_answer_was_lost_is_sent_again_with_its_request_id(store):
    target = _LostAnswer(store)
    rms = SharedRunningMeanStd(target, "lost/obs", (), push_every=4, push_interval=None)
    with pytest.raises(Unavailable):
        rms.update(np.arange(4.0))
    assert rms.pending == 4 and rms.count == pytest.approx(4 + 1e-4)  # counted once, in the view
    rms.update(np.array([10.0]))
    rms.flush()  # the lost request again (a retry: applied once), then the new sample
    assert target.request_ids[0] == target.request_ids[1] != target.request_ids[2]
    stats = store.layer("lost/obs").stats()
    assert stats.count == 5 and stats.mean[0] == pytest.approx(np.mean([0, 1, 2, 3, 10]))
    assert rms.pending == 0 and rms.count == pytest.approx(5 + 1e-4)


def test_a_refused_push_is_applied_once_the_layer_takes_updates_again(store):
    rms = SharedRunningMeanStd(store, "frozen/obs", (), push_every=2, push_interval=None)
    store.layer("frozen/obs").freeze()
    with pytest.raises(FrozenLayer):
        rms.update(np.array([1.0, 2.0]))
    assert rms.pending == 2
    store.layer("frozen/obs").unfreeze()
    rms.flush()
    assert store.layer("frozen/obs").stats().count == 2 and rms.pending == 0
    store.layer("frozen/obs").freeze()
    with pytest.raises(FrozenLayer):
        rms.update(np.array([3.0, 4.0]))
    rms.discard_pending()
    assert rms.pending == 0 and rms.count == pytest.approx(2 + 1e-4)
    rms.flush()  # nothing to send
    assert store.layer("frozen/obs").stats().count == 2


# --- state import and export ------------------------------------------------------------


def test_sb3_state_round_trip(store, rng):
    RunningMeanStd = _sb3().common.running_mean_std.RunningMeanStd
    data = rng.normal([3.0, -200.0, 0.0], [1.0, 5.0, 1e-3], size=(37, 3))
    reference = RunningMeanStd(shape=(3,))
    for chunk in np.array_split(data, 5):
        reference.update(chunk)
    shared = SharedRunningMeanStd(store, "sb3/obs", (3,), push_every=1000)
    shared.update(rng.normal(size=(5, 3)))  # pending samples: pushed, then replaced by the loaded state
    before = store.layer("sb3/obs").stats().version
    state = shared.from_sb3(reference)
    stats = store.layer("sb3/obs").stats()
    assert stats.version == before + 2  # the pending push, then the load
    assert stats.count == 37  # the data's samples, without SB3's prior
    np.testing.assert_allclose(stats.mean, data.mean(axis=0), **SB3)
    np.testing.assert_allclose(stats.variance, data.var(axis=0), **SB3)
    np.testing.assert_allclose(state.mean, reference.mean, **SB3)
    np.testing.assert_allclose(shared.var, reference.var, **SB3)
    assert shared.count == reference.count and shared.pending == 0

    more = rng.normal(size=(9, 3))
    shared.update(more)
    reference.update(more)
    np.testing.assert_allclose(shared.mean, reference.mean, **SB3)
    np.testing.assert_allclose(shared.var, reference.var, **SB3)

    copy = shared.to_sb3(RunningMeanStd(shape=(3,)))
    np.testing.assert_allclose(copy.mean, reference.mean, **SB3)
    np.testing.assert_allclose(copy.var, reference.var, **SB3)
    assert copy.count == pytest.approx(reference.count, rel=1e-15)
    copy.update(more)  # an ordinary SB3 object: writable arrays of its own
    assert not np.shares_memory(copy.mean, shared.mean)
    plain = shared.to_sb3()
    assert isinstance(plain, RmsState) and plain.count == shared.count


def test_a_fresh_sb3_state_empties_the_layer(store):
    RunningMeanStd = _sb3().common.running_mean_std.RunningMeanStd
    shared = SharedRunningMeanStd(store, "fresh/obs", (2,), push_every=1)
    shared.update(np.ones((3, 2)))
    shared.from_sb3(RunningMeanStd(shape=(2,)))
    assert store.layer("fresh/obs").stats().count == 0
    np.testing.assert_array_equal(shared.mean, [0.0, 0.0])
    np.testing.assert_array_equal(shared.var, [1.0, 1.0])
    assert shared.count == 1e-4


def test_vecnormalize_state_round_trip_through_a_server(client, name):
    _sb3()
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    Tiny, n = _tiny_env_class(), 3
    make = lambda: DummyVecEnv([lambda k=k: Tiny(k) for k in range(n)])
    trained = VecNormalize(make(), gamma=0.95)
    trained.reset()
    for _ in range(30):
        obs, rewards, _, _ = trained.step(np.zeros(n, dtype=int))
    obs_rms = SharedRunningMeanStd(client, f"{name}/obs", (3,))
    ret = SharedReturnNormalizer(client, f"{name}/ret", n, gamma=0.95, push_with=obs_rms)
    obs_rms.from_sb3(trained.obs_rms)
    ret.from_sb3(trained.ret_rms)
    assert client.layer(f"{name}/obs").stats().count == 31 * n  # reset and 30 steps of n environments

    evaluation = VecNormalize(make(), training=False, gamma=0.95)  # e.g. another process, or a fresh start
    obs_rms.to_sb3(evaluation.obs_rms)
    ret.to_sb3(evaluation.ret_rms)
    raw = trained.get_original_obs()
    np.testing.assert_allclose(evaluation.normalize_obs(raw), trained.normalize_obs(raw), **F32)
    np.testing.assert_allclose(evaluation.normalize_reward(rewards), trained.normalize_reward(rewards), **F32)
    np.testing.assert_allclose(obs_rms.normalize(raw), trained.normalize_obs(raw), **F32)
    np.testing.assert_allclose(ret.normalize(rewards), trained.normalize_reward(rewards), **F32)


@pytest.mark.parametrize("mean, var, count, error, match", [
    (np.zeros(2), np.ones(2), 5e-5, InvalidArgument, "count=5e-05 is below epsilon"),
    (np.zeros(3), np.ones(2), 10.0, InvalidArgument, r"mean has shape \(3,\): expected \(2,\)"),
    (np.zeros(2), -np.ones(2), 10.0, InvalidArgument, "var has negative values"),
    (np.array([np.nan, 0.0]), np.ones(2), 10.0, InvalidArgument, "mean holds NaN"),
    (np.zeros(2), np.ones(2), np.inf, InvalidArgument, "count=inf"),
    (["a", "b"], np.ones(2), 10.0, InvalidType, "expected an array of numbers"),
])
def test_load_state_refuses_bad_state_and_changes_nothing(store, mean, var, count, error, match):
    shared = SharedRunningMeanStd(store, "bad-state/obs", (2,), push_every=1)
    shared.update(np.ones((2, 2)))
    with pytest.raises(error, match=match):
        shared.load_state(mean, var, count)
    assert store.layer("bad-state/obs").stats().count == 2
    with pytest.raises(InvalidType, match="expected an object with mean, var and count"):
        shared.from_sb3(object())


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(shape=(0,)), InvalidArgument, r"shape=\(0,\): expected a tuple of positive ints"),
    (dict(shape="ab"), InvalidArgument, "shape='ab'"),
    (dict(shape=(2.5,)), InvalidArgument, r"shape=\(2.5,\)"),
    (dict(epsilon=0.0), InvalidArgument, "epsilon=0.0: expected a finite number > 0"),
    (dict(epsilon=float("nan")), InvalidArgument, "epsilon=nan"),
    (dict(push_every=0), InvalidArgument, "push_every=0: expected a positive int"),
    (dict(push_every=True), InvalidArgument, "push_every=True"),
    (dict(push_interval=0), InvalidArgument, "push_interval=0.0: expected a finite number > 0"),
    (dict(push_interval="1"), InvalidArgument, "push_interval='1': expected a number"),
    (dict(create="yes"), InvalidArgument, "create='yes': expected True or False"),
    (dict(name=3), InvalidArgument, "name=3: expected a layer name"),
    (dict(name="a/../b"), InvalidArgument, "a/../b"),
    (dict(target=42), InvalidType, "target is a int .*expected a normsvc.Store, a normsvc.Client or a server"),
])
def test_bad_constructor_arguments(store, kwargs, error, match):
    args = dict(target=store, name="ctor/obs", shape=(2,)) | kwargs
    with pytest.raises(error, match=match):
        SharedRunningMeanStd(args.pop("target"), args.pop("name"), args.pop("shape"), **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_envs=0), "num_envs=0: expected a positive int"),
    (dict(gamma=1.5), "gamma=1.5: expected a finite number >= 0 and <= 1"),
    (dict(clip_reward=0), "clip_reward=0.0: expected a finite number > 0"),
    (dict(epsilon=-1), "epsilon=-1.0"),
])
def test_bad_return_normalizer_arguments(store, kwargs, match):
    args = dict(num_envs=2) | kwargs
    with pytest.raises(InvalidArgument, match=match):
        SharedReturnNormalizer(store, "ctor/ret", args.pop("num_envs"), **args)


def test_bad_batches_are_refused_and_change_nothing(store):
    rms = SharedRunningMeanStd(store, "batch/obs", (3,), push_every=100)
    rms.update(np.ones((2, 3)))
    before = rms.snapshot()
    for batch, error, match in [
        (np.ones((2, 4)), InvalidArgument, r"batch of shape \(2, 4\): expected \(N, 3\), N samples of shape \(3,\)"),
        (np.ones(3), InvalidArgument, r"batch of shape \(3,\): expected \(N, 3\)"),
        (np.float64(1.0), InvalidArgument, r"batch of shape \(\): expected \(N, 3\)"),
        (np.array([[1.0, np.nan, 0.0]]), InvalidArgument, "NaN or infinite values"),
        (np.array([[1.0, 0.0, np.inf]]), InvalidArgument, "NaN or infinite values"),
        (np.array([[1e300, 0.0, 0.0]]), InvalidArgument, "too large to square"),
        (np.array([["a", "b", "c"]]), InvalidType, "has dtype <U1: expected real numbers"),
    ]:
        with pytest.raises(error, match=match):
            rms.update(batch)
        after = rms.snapshot()
        assert after.count == before.count and rms.pending == 2
        np.testing.assert_array_equal(after.mean, before.mean)
        np.testing.assert_array_equal(after.var, before.var)
    rms.update(np.empty((0, 3)))  # nothing to add
    assert rms.pending == 2
    for call, error, match in [
        (lambda: rms.normalize(np.ones(4)), InvalidArgument, r"obs of shape \(4,\): expected shape \(3,\)"),
        (lambda: rms.normalize(np.ones(3), clip=0), InvalidArgument, "clip=0.0: expected a finite number > 0"),
        (lambda: rms.normalize(np.ones(3), epsilon=-1.0), InvalidArgument, "epsilon=-1.0"),
        (lambda: rms.normalize(np.ones(3), dtype=np.int32), InvalidType, "dtype=int32: expected a floating"),
        (lambda: rms.unnormalize(np.ones((2, 2))), InvalidArgument, r"obs of shape \(2, 2\)"),
        (lambda: rms.to_sb3(RmsState(np.zeros(2), np.ones(2), 1.0)), InvalidArgument, r"rms.mean has shape \(2,\)"),
    ]:
        with pytest.raises(error, match=match):
            call()
    np.testing.assert_array_equal(rms.normalize(np.ones(3), clip=None, dtype=None), rms.normalize(np.ones((1, 3)),
                                                                                                  dtype=None)[0])
    with pytest.raises(ValueError):
        rms.mean[0] = 5.0  # read-only: the statistics are not the caller's to change


def test_bad_rewards_and_dones(store):
    ret = SharedReturnNormalizer(store, "bad/ret", 3)
    for call, match in [
        (lambda: ret.update(np.ones(2)), r"rewards of shape \(2,\): expected \(3,\), one per environment"),
        (lambda: ret.update(np.array([1.0, np.nan, 0.0])), "rewards hold NaN or infinite values"),
        (lambda: ret.step(np.ones(3), np.zeros(2, dtype=bool)), r"dones of shape \(2,\) and dtype bool"),
        (lambda: ret.reset(np.array(["x", "y", "z"])), r"dones of shape \(3,\) and dtype <U1"),
    ]:
        with pytest.raises(InvalidArgument, match=match):
            call()
    np.testing.assert_array_equal(ret.returns, np.zeros(3))
    assert ret.ret_rms.pending == 0
    ret.step([1, 2, 3], [0, 1, 0])  # lists and int dones are fine
    np.testing.assert_array_equal(ret.returns, [1.0, 0.0, 3.0])


def test_bad_push_with_and_existing_layers(store, server):
    obs_rms = SharedRunningMeanStd(store, "with/obs", (2,))
    with pytest.raises(InvalidType, match="push_with is a str: expected a SharedRunningMeanStd"):
        SharedRunningMeanStd(store, "with/ret", (), push_with="with/obs")
    with pytest.raises(InvalidArgument, match="push_every and push_interval come from push_with's schedule"):
        SharedRunningMeanStd(store, "with/ret", (), push_with=obs_rms, push_every=3)
    with pytest.raises(InvalidArgument, match="target differs from push_with's"):
        SharedRunningMeanStd(server.address, "with/ret", (), push_with=obs_rms)
    with pytest.raises(InvalidArgument, match="'with/obs' is already pushed on this schedule"):
        SharedRunningMeanStd(None, "with/obs", (2,), push_with=obs_rms)

    with pytest.raises(LayerNotFound):
        SharedRunningMeanStd(store, "absent/obs", (2,), create=False)
    store.create_layer("keras/bn", num_features=2)
    with pytest.raises(InvalidArgument, match="layer 'keras/bn' is a keras batch layer .*expected a cumulative"):
        SharedRunningMeanStd(store, "keras/bn", (2,), create=False)
    with pytest.raises(ConfigConflict):
        SharedRunningMeanStd(store, "keras/bn", (2,))
    with pytest.raises(InvalidArgument, match=r"statistics of shape \(2,\): expected .* shape \(3,\)"):
        SharedRunningMeanStd(store, "with/obs", (3,), create=False)


def test_an_async_client_is_refused(server):
    from normsvc import AsyncClient

    async def main():
        async with AsyncClient(server.address) as c:
            with pytest.raises(InvalidType, match="the target returned an awaitable"):
                SharedRunningMeanStd(c, "async/obs", (2,))

    asyncio.run(main())


# --- the README and the example -----------------------------------------------------------


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    body = text.split("## Reinforcement learning", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)[0]


@pytest.mark.timeout(120)
def test_readme_example_runs_against_a_server(server, tmp_path):
    done = subprocess.run([sys.executable, "-c", _readme_block()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=100, env={**os.environ, "NORMSVC_TARGET": server.address})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["0.0 8008.0001", "8008.0001 [5. 5. 5. 5.]"]


@pytest.mark.timeout(120)
def test_example_with_actor_processes_exits_0(server):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "rl_actors.py"), "--target", server.address,
                           "--actors", "2", "--envs", "4", "--steps", "60", "--push-every", "50"],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 actors x 4 envs x 60 steps: 488 observations" in done.stdout
    assert "learner snapshot: version" in done.stdout
