"""Several actor processes share one observation normalizer and one return normalizer.

Each actor steps its own vectorized toy environment (``--envs`` copies, an
offset and a spread of its own, so the actors' data differ), normalizes
observations and rewards as Stable-Baselines3's VecNormalize would, and
pushes its moments to a normsvc server every ``--push-every`` samples in one
request for both layers.  At the end the script prints the service's
statistics next to numpy's over every observation and return the actors
saw, and a learner's snapshot, and exits 1 if they differ by more than
1e-12 (relative).

    python examples/rl_actors.py                       # starts a server in this process
    python examples/rl_actors.py --target 127.0.0.1:50051 --actors 8 --steps 2000

Without ``--target`` the server is ``normsvc.testing.running_server()``: the
real gRPC service on a free loopback port, over a fresh memory store.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import sys
import uuid
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import normsvc
from normsvc.rl import SharedReturnNormalizer, SharedRunningMeanStd

OBS_DIM = 3
GAMMA = 0.99


class ToyVecEnv:
    """``envs`` copies of a random walk around an offset of this actor's; episodes of random length."""

    def __init__(self, rank: int, envs: int):
        self.rng = np.random.default_rng(rank)
        self.offset = np.array([10.0 * rank, -3.0 * rank, 100.0])
        self.spread = np.array([1.0 + rank, 0.5, 20.0])
        self.state = np.zeros((envs, OBS_DIM))

    def reset(self) -> np.ndarray:
        self.state[:] = 0.0
        return self.offset + self.spread * self.state

    def step(self):
        self.state += self.rng.standard_normal(self.state.shape) * 0.3
        rewards = (1.0 - np.abs(self.state[:, 0])).astype(np.float32)
        dones = self.rng.random(len(self.state)) < 0.02
        self.state[dones] = 0.0  # auto-reset, as SB3's vectorized envs do
        return self.offset + self.spread * self.state, rewards, dones


def actor(rank: int, target: str, prefix: str, envs: int, steps: int, push_every: int):
    """One actor process: returns every observation and discounted return it saw, and its push count."""
    with normsvc.Client(target) as client:
        obs_rms = SharedRunningMeanStd(client, f"{prefix}/obs", (OBS_DIM,), push_every=push_every)
        ret = SharedReturnNormalizer(client, f"{prefix}/ret", envs, gamma=GAMMA, push_with=obs_rms)
        env = ToyVecEnv(rank, envs)
        obs = env.reset()
        obs_rms.update(obs)  # VecNormalize.reset: the first observations count too
        seen, returns = [obs], []
        discounted = np.zeros(envs)  # numpy's own bookkeeping of the returns, for the check at the end
        policy_input = obs_rms.normalize(obs)
        for _ in range(steps):
            # ... a policy would act on policy_input here ...
            obs, rewards, dones = env.step()
            obs_rms.update(obs)
            policy_input = obs_rms.normalize(obs)         # float32, clipped to [-10, 10]
            scaled_rewards = ret.step(rewards, dones)     # what VecNormalize hands the learner
            seen.append(obs)
            discounted = discounted * GAMMA + rewards
            returns.append(discounted)
            discounted = np.where(dones, 0.0, discounted)
        obs_rms.close()                                   # pushes what is pending (both layers)
        assert np.isfinite(policy_input).all() and np.isfinite(scaled_rewards).all()
        return np.concatenate(seen), np.concatenate(returns), obs_rms.pushes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", help="a running server (default: start one in this process)")
    p.add_argument("--actors", type=int, default=4)
    p.add_argument("--envs", type=int, default=8, help="environments per actor")
    p.add_argument("--steps", type=int, default=500, help="vectorized steps per actor")
    p.add_argument("--push-every", type=int, default=256, help="samples between pushes")
    args = p.parse_args(argv)
    prefix = f"rl-example-{uuid.uuid4().hex[:8]}"

    with contextlib.ExitStack() as stack:
        if args.target is None:
            from normsvc.testing import running_server

            target = stack.enter_context(running_server()).address
        else:
            target = args.target
        ctx = mp.get_context("spawn")  # a fresh interpreter per actor: no gRPC state across fork
        with ProcessPoolExecutor(args.actors, mp_context=ctx) as pool:
            results = list(pool.map(actor, range(args.actors), [target] * args.actors, [prefix] * args.actors,
                                    [args.envs] * args.actors, [args.steps] * args.actors,
                                    [args.push_every] * args.actors))
        with normsvc.Client(target) as client:
            learner = SharedRunningMeanStd(client, f"{prefix}/obs", (OBS_DIM,), create=False)
            snapshot = learner.pull()
            obs_stats = client.layer(f"{prefix}/obs").stats()
            ret_stats = client.layer(f"{prefix}/ret").stats()

    all_obs = np.concatenate([r[0] for r in results])
    all_ret = np.concatenate([r[1] for r in results]).reshape(-1)
    pushes = [r[2] for r in results]
    rows = [(f"obs mean[{j}]", obs_stats.mean[j], all_obs[:, j].mean()) for j in range(OBS_DIM)]
    rows += [(f"obs var[{j}]", obs_stats.variance[j], all_obs[:, j].var()) for j in range(OBS_DIM)]
    rows += [("return mean", ret_stats.mean[0], all_ret.mean()), ("return var", ret_stats.variance[0], all_ret.var())]
    rows += [("obs count", obs_stats.count, float(len(all_obs))),
             ("return count", ret_stats.count, float(len(all_ret)))]

    print(f"{args.actors} actors x {args.envs} envs x {args.steps} steps: {len(all_obs)} observations, "
          f"pushes per actor {pushes} (one request for both layers each)")
    print(f"{'':14} {'service (exact)':>22} {'numpy, all samples':>22} {'relative diff':>14}")
    worst = 0.0
    for label, got, want in rows:
        diff = abs(got - want) / max(abs(want), 1e-300)
        worst = max(worst, diff)
        print(f"{label:14} {got:22.15g} {want:22.15g} {diff:14.2e}")
    print(f"learner snapshot: version {snapshot.version}, count {snapshot.count:.4f} (SB3's: samples + 1e-4), "
          f"mean {np.array2string(snapshot.mean, precision=4)}")
    if worst > 1e-12:
        print(f"FAILED: relative difference {worst:.2e} > 1e-12", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
