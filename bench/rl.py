"""RL benchmark: an actor's overhead per environment step with the shared normalizers, amortised.

Run with ``python bench/rl.py [--rounds N] [--seconds S] [--target HOST:PORT]``.

Each case is one actor's step loop over a vectorized environment of E
environments with D-dimensional observations, doing what VecNormalize does
per step: update the observation statistics, normalize the observations
(float32, clipped), and update, normalize and reset the discounted returns.

* ``normsvc``: :class:`normsvc.rl.SharedRunningMeanStd` and
  :class:`~normsvc.rl.SharedReturnNormalizer` (``push_with``: one
  UpdateStats for both) against a real server, buffering with the defaults
  (a push every 4096 observations or 1 s): the time includes the pushes,
  amortised over the steps between them;
* ``SB3, local``: Stable-Baselines3's ``RunningMeanStd`` and VecNormalize's
  formulas in-process, shared with nobody (what an actor pays without
  normsvc; SB3's own class when installed, else a copy of its update);
* ``push_every=1``: normsvc with a round trip per step (a strictly global
  normalizer), the case buffering exists for.

The figure is microseconds per environment step (one observation): the
time of a vectorized step divided by E.  The target is < 5 us with
buffering.  Without ``--target`` a server (``normsvc serve``, memory store)
runs in a subprocess on the same machine, so its CPU competes with the
actor's as on a shared node.  Cases are interleaved round by round, medians.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid

import numpy as np

import normsvc
from normsvc.rl import DEFAULT_PUSH_EVERY, DEFAULT_PUSH_INTERVAL, SharedReturnNormalizer, SharedRunningMeanStd

CASES = [(1, 17), (8, 17), (64, 17), (8, 376)]  # (environments, observation size): MuJoCo's Hopper .. Humanoid
POOL = 32  # distinct batches cycled through, so the loop does not reuse one array


def _sb3_rms():
    try:
        from stable_baselines3.common.running_mean_std import RunningMeanStd

        return RunningMeanStd, "stable_baselines3"
    except ImportError:  # the same update as SB3's (common/running_mean_std.py)

        class RunningMeanStd:
            def __init__(self, epsilon=1e-4, shape=()):
                self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), epsilon

            def update(self, arr):
                batch_mean, batch_var, batch_count = np.mean(arr, axis=0), np.var(arr, axis=0), arr.shape[0]
                delta = batch_mean - self.mean
                tot = self.count + batch_count
                new_mean = self.mean + delta * batch_count / tot
                m_2 = (self.var * self.count + batch_var * batch_count
                       + np.square(delta) * self.count * batch_count / tot)
                self.mean, self.var, self.count = new_mean, m_2 / tot, tot

        return RunningMeanStd, "a copy of SB3's RunningMeanStd"


class _Data:
    def __init__(self, envs: int, dim: int, seed: int):
        rng = np.random.default_rng(seed)
        self.obs = [(rng.standard_normal((envs, dim)) * 3 + 5).astype(np.float32) for _ in range(POOL)]
        self.rewards = [rng.standard_normal(envs).astype(np.float32) for _ in range(POOL)]
        self.dones = [rng.random(envs) < 0.01 for _ in range(POOL)]


def _normsvc_loop(target, envs: int, dim: int, push_every: int, data: _Data):
    prefix = f"bench-rl/{uuid.uuid4().hex[:8]}"
    obs_rms = SharedRunningMeanStd(target, f"{prefix}/obs", (dim,), push_every=push_every)
    ret = SharedReturnNormalizer(target, f"{prefix}/ret", envs, push_with=obs_rms)

    def step(i):
        obs = data.obs[i % POOL]
        obs_rms.update(obs)
        obs_rms.normalize(obs)
        ret.step(data.rewards[i % POOL], data.dones[i % POOL])

    return step, obs_rms


def _sb3_loop(rms_class, envs: int, dim: int, data: _Data):
    obs_rms, ret_rms = rms_class(shape=(dim,)), rms_class(shape=())
    state = {"returns": np.zeros(envs)}

    def step(i):  # VecNormalize.step_wait, as written there
        obs, rewards, dones = data.obs[i % POOL], data.rewards[i % POOL], data.dones[i % POOL]
        obs_rms.update(obs)
        np.clip((obs - obs_rms.mean) / np.sqrt(obs_rms.var + 1e-8), -10.0, 10.0).astype(np.float32)
        state["returns"] = state["returns"] * 0.99 + rewards
        ret_rms.update(state["returns"])
        np.clip(rewards / np.sqrt(ret_rms.var + 1e-8), -10.0, 10.0).astype(np.float32)
        state["returns"][dones] = 0

    return step


def _us_per_step(step, envs: int, seconds: float) -> float:
    """Microseconds per environment step of ``step`` (a vectorized step of ``envs``), over ~``seconds``."""
    for i in range(20):
        step(i)
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(50):
            step(n)
            n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n / envs * 1e6


@contextlib.contextmanager
def _server(target: str | None):
    if target:
        yield target
        return
    proc = subprocess.Popen([sys.executable, "-m", "normsvc", "serve", "--port", "0", "--store", "memory://"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    box = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(120)
    line = box[0].strip() if box else ""
    try:
        if not line.startswith("normsvc serving on "):
            raise SystemExit(f"the server did not start: {line!r}")
        yield line.rsplit(" ", 1)[1]
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0, help="per case per round")
    p.add_argument("--target", help="a running normsvc server (default: start one in a subprocess)")
    args = p.parse_args(argv)
    rms_class, sb3_name = _sb3_rms()

    with _server(args.target) as address, normsvc.Client(address) as client:
        cases, pushes = {}, {}
        for envs, dim in CASES:
            data = _Data(envs, dim, seed=envs * 1000 + dim)
            step, rms = _normsvc_loop(client, envs, dim, DEFAULT_PUSH_EVERY, data)
            cases[(envs, dim, "normsvc")] = step
            pushes[(envs, dim)] = rms
            cases[(envs, dim, "sb3")] = _sb3_loop(rms_class, envs, dim, data)
        strict_step, _ = _normsvc_loop(client, 1, 17, 1, _Data(1, 17, seed=1))
        cases[(1, 17, "push_every=1")] = strict_step

        times = {key: [] for key in cases}
        started = {key: (rms.pushes, time.perf_counter()) for key, rms in pushes.items()}
        spent = {key: 0.0 for key in pushes}
        for _ in range(args.rounds):
            for key, step in cases.items():
                seconds = args.seconds / 4 if key[2] == "push_every=1" else args.seconds
                t0 = time.perf_counter()
                times[key].append(_us_per_step(step, key[0], seconds))
                if key[2] == "normsvc":
                    spent[key[:2]] += time.perf_counter() - t0
        push_rate = {key: (rms.pushes - started[key][0]) / max(spent[key], 1e-9) for key, rms in pushes.items()}

    med = {key: statistics.median(t) for key, t in times.items()}
    print(f"# normsvc RL benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}; "
          f"baseline: {sb3_name}")
    print(f"# server: {args.target or 'normsvc serve (memory://) in a subprocess, same machine'}; "
          f"push every {DEFAULT_PUSH_EVERY} observations or {DEFAULT_PUSH_INTERVAL:g} s; "
          f"{args.rounds} interleaved rounds of ~{args.seconds}s, medians")
    print()
    print("| envs x obs size | normsvc, buffered: us/env step | SB3 local: us/env step | normsvc / SB3 | "
          "pushes/s | target |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for envs, dim in CASES:
        ours, theirs = times[(envs, dim, "normsvc")], times[(envs, dim, "sb3")]
        a, b = med[(envs, dim, "normsvc")], med[(envs, dim, "sb3")]
        print(f"| {envs} x {dim} | {a:.2f} ({min(ours):.2f} to {max(ours):.2f}) | "
              f"{b:.2f} ({min(theirs):.2f} to {max(theirs):.2f}) | {a / b:.2f} | {push_rate[(envs, dim)]:.1f} | < 5 |")
    strict = times[(1, 17, "push_every=1")]
    print(f"| 1 x 17, push_every=1 (a round trip per step) | {med[(1, 17, 'push_every=1')]:.1f} "
          f"({min(strict):.1f} to {max(strict):.1f}) | {med[(1, 17, 'sb3')]:.2f} | "
          f"{med[(1, 17, 'push_every=1')] / med[(1, 17, 'sb3')]:.0f} |  |  |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
