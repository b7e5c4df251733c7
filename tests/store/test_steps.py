"""Step contributions: one update of the running statistics per training step (normsvc/store/steps.py).

Every expectation here comes from outside normsvc: the data-parallel golden
files (torch BatchNorm2d with momentum 0.1 and None, Keras
BatchNormalization with momentum 0.9, exact cumulative statistics, each fed
the concatenation of the 4 workers' batches; see tests/golden_steps.py), or
plain float64 numpy over the concatenated data.  Each test runs on the
memory and the sqlite store (the ``store`` / ``store_url`` fixtures).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normsvc
from golden_steps import load_steps
from normsvc import AlreadyExists, FailedPrecondition, FrozenLayer, InvalidArgument, Moments, Store
from normsvc.store import steps as steps_mod
from normsvc.store.steps import Contribution, StepKey, Steps
from store_testing import np_moments
from step_keys import BAD_KEYS

G = load_steps()
RTOL = 1e-6  # the tolerance against the golden records
RUN = "job-7"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def rank_moments(case, t: int, w: int) -> Moments:
    """What rank ``w`` pushes at step ``t``: the moments of its own batch."""
    return normsvc.ops.moments(case.x[t, w], axes=list(case.reduce_axes))


def arrival_order(rng, steps: int, workers: int) -> list[tuple[int, int]]:
    """(step, rank) in a shuffled order: ranks shuffled per step, and the last rank of step t
    arriving only after 1 to workers-1 ranks of step t + 1."""
    order, carry = [], None
    for t in range(steps):
        perm = [(t, int(r)) for r in rng.permutation(workers)]
        head, last = perm[:-1], perm[-1]
        if carry is not None:
            j = int(rng.integers(1, len(head) + 1))
            head = head[:j] + [carry] + head[j:]
        order.extend(head)
        carry = last
    order.append(carry)
    return order


def completed_prefix(arrived: dict[int, set], workers: int) -> int | None:
    """The last step s such that every step <= s has all its ranks (None: not even step 0)."""
    last, t = None, 0
    while len(arrived.get(t, ())) == workers:
        last, t = t, t + 1
    return last


def assert_golden(case, stats, t: int | None) -> None:
    """``stats`` are the reference's state after step ``t`` (None: before any step)."""
    if t is None:
        if case.init_mean is None:  # cumulative: empty
            assert stats.count == 0 and stats.num_batches == 0
        else:
            np.testing.assert_array_equal(np.broadcast_to(stats.mean, case.init_mean.shape), case.init_mean)
            np.testing.assert_array_equal(np.broadcast_to(stats.variance, case.init_variance.shape),
                                          case.init_variance)
        return
    np.testing.assert_allclose(stats.mean, case.mean[t], rtol=RTOL, atol=0)
    np.testing.assert_allclose(stats.variance, case.variance[t], rtol=RTOL, atol=0)
    assert stats.num_batches == case.num_batches[t]
    assert stats.count == G.count_per_step * (t + 1)
    if case.count is not None:
        assert stats.count == case.count[t]


def np_batch(x) -> tuple[float, np.ndarray, np.ndarray]:
    """(count, mean, biased variance) per feature of channels-last data x[n, c], float64 numpy."""
    x = np.asarray(x, dtype=np.float64)
    return float(x.shape[0]), x.mean(axis=0), x.var(axis=0)


def np_running(convention: str, momentum, batches) -> tuple[np.ndarray, np.ndarray]:
    """The documented conventions in plain numpy, one update per (count, mean, biased var) batch."""
    c = batches[0][1].shape
    if convention == "cumulative":
        raise NotImplementedError
    mean, var = np.zeros(c), np.ones(c)
    for i, (n, bm, bv) in enumerate(batches, start=1):
        if convention == "keras":
            mean, var = mean * momentum + bm * (1 - momentum), var * momentum + bv * (1 - momentum)
        else:
            m = 1.0 / i if momentum is None else momentum
            mean, var = (1 - m) * mean + m * bm, (1 - m) * var + m * bv * n / (n - 1)
    return mean, var


def shards(rng, steps=3, world=4, c=3, n=None):
    """x[t][r]: rank r's channels-last batch at step t, each rank with its own distribution and size."""
    return [[rng.normal(2.0 * r - 1.0, 0.5 + r, size=(n or 5 + 2 * r, c)) for r in range(world)]
            for _ in range(steps)]


def state(stats) -> tuple:
    """What a RunningStats says about the statistics (no timestamps)."""
    return (stats.mean.tolist(), stats.variance.tolist(), stats.count, stats.num_batches, stats.version,
            stats.frozen, stats.run, stats.last_step)


# --------------------------------------------------------------------------
# golden: 4 ranks x 20 steps, shuffled and interleaved arrival
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(G.cases))
def test_shuffled_contributions_reproduce_the_golden_statistics_after_every_step(store, rng, name):
    case = G.cases[name]
    layer = store.create_layer("net/bn", **case.layer_kwargs)
    order = arrival_order(rng, G.steps, G.workers)
    assert sorted(order) == [(t, w) for t in range(G.steps) for w in range(G.workers)]
    arrived: dict[int, set] = {}
    for t, w in order:
        stats = layer.update(rank_moments(case, t, w), step=t, rank=w, world_size=G.workers, run=RUN)
        arrived.setdefault(t, set()).add(w)
        done = completed_prefix(arrived, G.workers)
        assert stats.run == RUN
        assert stats.last_step == done  # last_step tells which steps are applied
        assert stats.version == (0 if done is None else done + 1)  # one version per applied step
        assert_golden(case, stats, done)
    assert layer.stats().last_step == G.steps - 1
    assert_golden(case, layer.stats(), G.steps - 1)


@pytest.mark.parametrize("name", list(G.cases))
def test_update_many_pushes_a_models_layers_as_one_contribution_per_rank(store, rng, name):
    """Two layers in one update_many per rank and step: both follow the golden record."""
    case = G.cases[name]
    for layer in ("m/a", "m/b"):
        store.create_layer(layer, **case.layer_kwargs)
    for t in range(4):
        for w in rng.permutation(G.workers):
            m = rank_moments(case, t, int(w))
            out = store.update_many({"m/a": m, "m/b": m}, step=t, rank=int(w), world_size=G.workers, run=RUN)
        for layer in ("m/a", "m/b"):
            assert out[layer].last_step == t
            assert_golden(case, out[layer], t)


@pytest.mark.parametrize("name", ["torch_m0.1", "keras_m0.9", "cumulative"])
def test_the_bits_do_not_depend_on_the_arrival_order(store, rng, name):
    case = G.cases[name]
    orders = {
        "ranks in order": [(t, w) for t in range(G.steps) for w in range(G.workers)],
        "ranks reversed": [(t, w) for t in range(G.steps) for w in reversed(range(G.workers))],
        "shuffled, interleaved": arrival_order(rng, G.steps, G.workers),
    }
    seen = {}
    for label, order in orders.items():
        layer = store.create_layer(f"bn-{len(seen)}", **case.layer_kwargs)
        after = {}
        for t, w in order:
            stats = layer.update(rank_moments(case, t, w), step=t, rank=w, world_size=G.workers, run=RUN)
            if stats.last_step is not None and stats.last_step not in after:
                after[stats.last_step] = (stats.mean.tobytes(), stats.variance.tobytes(), stats.count,
                                          stats.num_batches)
        assert sorted(after) == list(range(G.steps))
        seen[label] = after
    first, *others = seen.values()
    for other in others:
        assert other == first  # bit for bit, after every step


# --------------------------------------------------------------------------
# retries, conflicts, applied steps, runs, reset
# --------------------------------------------------------------------------
def test_a_retried_contribution_changes_nothing(store, rng, assert_unchanged):
    layer = store.create_layer("bn", momentum=0.9)
    x = shards(rng, steps=1, world=2)[0]
    layer.update(np_moments(x[0], 0), step=0, rank=0, world_size=2, run=RUN)
    with assert_unchanged(store):
        again = layer.update(np_moments(x[0].copy(), 0), step=0, rank=0, world_size=2, run=RUN)
    assert again.last_step is None and again.version == 0
    stats = layer.update(np_moments(x[1], 0), step=0, rank=1, world_size=2, run=RUN)
    expected = np_running("keras", 0.9, [np_batch(np.concatenate(x))])
    np.testing.assert_allclose(stats.mean, expected[0], rtol=1e-12)
    np.testing.assert_allclose(stats.variance, expected[1], rtol=1e-12)
    assert (stats.version, stats.num_batches, stats.last_step) == (1, 1, 0)


def test_other_moments_for_the_same_rank_and_step_conflict_and_change_nothing(store, rng, assert_unchanged):
    layer = store.create_layer("bn", convention="torch")
    x = shards(rng, steps=1, world=2)[0]
    layer.update(np_moments(x[0], 0), step=0, rank=0, world_size=2, run=RUN)
    with assert_unchanged(store), pytest.raises(AlreadyExists) as info:
        layer.update(np_moments(x[0] + 1.0, 0), step=0, rank=0, world_size=2, run=RUN)
    assert info.value.reason == "CONTRIBUTION_CONFLICT"
    assert info.value.field == "rank" and info.value.layer == "bn"
    # the rejected moments were not kept: the step completes with the first ones
    stats = layer.update(np_moments(x[1], 0), step=0, rank=1, world_size=2, run=RUN)
    expected = np_running("torch", 0.1, [np_batch(np.concatenate(x))])
    np.testing.assert_allclose(stats.mean, expected[0], rtol=1e-12)
    np.testing.assert_allclose(stats.variance, expected[1], rtol=1e-12)


def test_a_contribution_to_an_applied_step_is_refused(store, rng, assert_unchanged):
    layer = store.create_layer("bn", momentum=0.9)
    x = shards(rng, steps=2, world=2)
    for t in range(2):
        for r in range(2):
            layer.update(np_moments(x[t][r], 0), step=t, rank=r, world_size=2, run=RUN)
    assert layer.stats().last_step == 1
    for t, r, m in ((1, 1, np_moments(x[1][1], 0)),  # a retry after its step was applied
                    (1, 0, np_moments(x[0][0], 0)),
                    (0, 0, np_moments(x[0][0], 0))):  # an older step
        with assert_unchanged(store), pytest.raises(FailedPrecondition) as info:
            layer.update(m, step=t, rank=r, world_size=2, run=RUN)
        assert info.value.reason == "STEP_APPLIED" and info.value.field == "step"
        assert f"step {t}" in str(info.value)


def test_a_contribution_of_an_ended_run_is_refused(store, rng, assert_unchanged):
    layer = store.create_layer("bn", momentum=0.9)
    x = shards(rng, steps=2, world=2)
    for r in range(2):
        layer.update(np_moments(x[0][r], 0), step=0, rank=r, world_size=2, run="a")
    layer.update(np_moments(x[1][0], 0), step=1, rank=0, world_size=2, run="a")  # left open
    stats = layer.update(np_moments(x[0][0], 0), step=0, rank=0, world_size=2, run="b")  # ends run a
    assert (stats.run, stats.last_step) == ("b", None)
    with assert_unchanged(store), pytest.raises(FailedPrecondition) as info:
        layer.update(np_moments(x[1][1], 0), step=1, rank=1, world_size=2, run="a")
    assert info.value.reason == "RUN_ENDED" and info.value.field == "run"


def test_a_new_run_starts_fresh_at_any_step(store, rng):
    """Run b reuses step 0; run a's open step 1 is dropped, never merged."""
    layer = store.create_layer("bn", convention="torch", momentum=0.1)
    x = shards(rng, steps=3, world=2)
    for r in range(2):
        layer.update(np_moments(x[0][r], 0), step=0, rank=r, world_size=2, run="a")
    layer.update(np_moments(x[1][0], 0), step=1, rank=0, world_size=2, run="a")
    for r in range(2):
        stats = layer.update(np_moments(x[2][r], 0), step=0, rank=r, world_size=2, run="b")
    assert (stats.run, stats.last_step, stats.num_batches, stats.version) == ("b", 0, 2, 2)
    mean, var = np_running("torch", 0.1, [np_batch(np.concatenate(x[0])), np_batch(np.concatenate(x[2]))])
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.variance, var, rtol=1e-12)


def test_reset_forgets_runs_and_request_ids(store, rng):
    layer = store.create_layer("bn", convention="torch", momentum=0.1)
    x = shards(rng, steps=2, world=2)

    def run_a():
        for t in range(2):
            for r in range(2):
                out = layer.update(np_moments(x[t][r], 0), step=t, rank=r, world_size=2, run="a",
                                   request_id=f"a/{r}/{t}")
        return out

    first = run_a()
    assert (first.last_step, first.version) == (1, 2)
    layer.update(np_moments(x[0][0], 0), step=0, rank=0, world_size=2, run="b")  # run a ends
    with pytest.raises(FailedPrecondition, match="ended"):
        layer.update(np_moments(x[0][0], 0), step=5, rank=0, world_size=2, run="a")
    reset = layer.reset()
    assert (reset.run, reset.last_step, reset.num_batches, reset.count) == ("", None, 0, 0)
    # the same run, steps and request ids again: applied, neither a retry nor an ended run
    second = run_a()
    assert (second.run, second.last_step, second.num_batches) == ("a", 1, 2)
    assert second.version == reset.version + 2
    mean, var = np_running("torch", 0.1, [np_batch(np.concatenate(x[t])) for t in range(2)])
    for stats in (first, second):
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
        np.testing.assert_allclose(stats.variance, var, rtol=1e-12)


def test_a_contribution_to_a_frozen_layer_is_refused_and_kept_nowhere(store, rng, assert_unchanged):
    store.create_layer("a", momentum=0.9)
    store.create_layer("b", momentum=0.9).freeze()
    x = shards(rng, steps=1, world=2)[0]
    m = [np_moments(x[r], 0) for r in range(2)]
    with assert_unchanged(store), pytest.raises(FrozenLayer):
        store.update_many({"a": m[0], "b": m[0]}, step=0, rank=0, world_size=2, run=RUN)
    store.layer("b").unfreeze()
    # rank 0's contribution to "a" was aborted with the call: rank 1 alone does not complete the step
    out = store.update_many({"a": m[1], "b": m[1]}, step=0, rank=1, world_size=2, run=RUN)
    assert out["a"].last_step is None and out["b"].last_step is None
    out = store.update_many({"a": m[0], "b": m[0]}, step=0, rank=0, world_size=2, run=RUN)
    assert out["a"].last_step == 0 and out["b"].last_step == 0


# --------------------------------------------------------------------------
# request ids: idempotency keys bound to their content
# --------------------------------------------------------------------------
def test_a_request_id_is_bound_to_its_content(store, rng, assert_unchanged):
    layer = store.create_layer("bn", momentum=0.9)
    store.create_layer("other", momentum=0.9)
    m1, m2 = np_moments(rng.normal(size=(8, 3)), 0), np_moments(rng.normal(size=(8, 3)), 0)
    first = layer.update(m1, request_id="w0/1")
    with assert_unchanged(store):
        again = layer.update(Moments(m1.count, m1.mean.copy(), m1.m2.copy()), request_id="w0/1")
    assert state(again) == state(first)
    with assert_unchanged(store), pytest.raises(AlreadyExists) as info:
        layer.update(m2, request_id="w0/1")
    assert info.value.reason == "REQUEST_ID_REUSED" and info.value.field == "request_id"
    # the same id naming another kind of call, or more layers, is another content too
    with assert_unchanged(store), pytest.raises(AlreadyExists):
        layer.update(m1, request_id="w0/1", step=0, rank=0, world_size=1, run=RUN)
    with assert_unchanged(store), pytest.raises(AlreadyExists):
        store.update_many({"bn": m1, "other": m1}, request_id="w0/1")
    assert layer.stats().num_batches == 1


def test_contribution_request_ids(store, rng, assert_unchanged):
    """f"{run}/{rank}/{step}": a retry is answered even after its step applied; other data is refused."""
    layer = store.create_layer("bn", convention="torch")
    x = shards(rng, steps=2, world=2)
    m = [[np_moments(x[t][r], 0) for r in range(2)] for t in range(2)]
    layer.update(m[0][0], step=0, rank=0, world_size=2, run=RUN, request_id=f"{RUN}/0/0")
    with assert_unchanged(store), pytest.raises(AlreadyExists) as info:
        layer.update(m[1][0], step=0, rank=0, world_size=2, run=RUN, request_id=f"{RUN}/0/0")
    assert info.value.reason == "REQUEST_ID_REUSED"
    with assert_unchanged(store), pytest.raises(AlreadyExists) as info:  # same moments, another step
        layer.update(m[0][0], step=1, rank=0, world_size=2, run=RUN, request_id=f"{RUN}/0/0")
    assert info.value.reason == "REQUEST_ID_REUSED"
    done = layer.update(m[0][1], step=0, rank=1, world_size=2, run=RUN, request_id=f"{RUN}/1/0")
    assert done.last_step == 0
    # the acknowledgement was lost and the rank retries: the same id and content is a retry, not STEP_APPLIED
    with assert_unchanged(store):
        again = layer.update(m[0][1], step=0, rank=1, world_size=2, run=RUN, request_id=f"{RUN}/1/0")
    assert state(again) == state(done)
    with assert_unchanged(store), pytest.raises(AlreadyExists):
        layer.update(m[1][1], step=0, rank=1, world_size=2, run=RUN, request_id=f"{RUN}/1/0")
    # one id per worker: rank 1 reusing rank 0's id with its own data is refused
    with assert_unchanged(store), pytest.raises(AlreadyExists):
        layer.update(m[1][1], step=1, rank=1, world_size=2, run=RUN, request_id=f"{RUN}/0/0")
    mean, var = np_running("torch", 0.1, [np_batch(np.concatenate(x[0]))])
    np.testing.assert_allclose(layer.stats().mean, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.stats().variance, var, rtol=1e-12)


# --------------------------------------------------------------------------
# the rule for incomplete steps
# --------------------------------------------------------------------------
def test_a_step_missing_a_rank_is_closed_after_the_lag(store_url, rng, assert_unchanged):
    world, lag = 4, 3
    with Store.open(store_url, step_lag=lag) as store:
        calls = []
        store.on_incomplete = lambda *args: calls.append(args)
        layer = store.create_layer("bn", convention="torch", momentum=0.1)
        x = shards(rng, steps=5, world=world)
        for r in (3, 0, 1):  # rank 2 never sends step 0
            stats = layer.update(np_moments(x[0][r], 0), step=0, rank=r, world_size=world, run=RUN)
        for t in (1, 2):  # complete, but they wait for step 0
            for r in rng.permutation(world):
                stats = layer.update(np_moments(x[t][r], 0), step=t, rank=int(r), world_size=world, run=RUN)
        assert (stats.last_step, stats.version, stats.num_batches) == (None, 0, 0)
        assert calls == []
        stats = layer.update(np_moments(x[3][1], 0), step=3, rank=1, world_size=world, run=RUN)  # 3 ahead
        assert calls == [("bn", RUN, 0, [0, 1, 3], world)]
        assert (stats.last_step, stats.version, stats.num_batches) == (2, 3, 3)
        expected = [np_batch(np.concatenate([x[0][r] for r in (0, 1, 3)])),
                    np_batch(np.concatenate(x[1])), np_batch(np.concatenate(x[2]))]
        mean, var = np_running("torch", 0.1, expected)
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
        np.testing.assert_allclose(stats.variance, var, rtol=1e-12)
        assert stats.count == sum(n for n, _, _ in expected)
        # the late rank is refused, never merged into the closed step
        with assert_unchanged(store), pytest.raises(FailedPrecondition) as info:
            layer.update(np_moments(x[0][2], 0), step=0, rank=2, world_size=world, run=RUN)
        assert info.value.reason == "STEP_APPLIED"
        # later steps apply in order, complete
        for r in (0, 2, 3):
            stats = layer.update(np_moments(x[3][r], 0), step=3, rank=r, world_size=world, run=RUN)
        assert stats.last_step == 3
        for r in range(world):
            stats = layer.update(np_moments(x[4][r], 0), step=4, rank=r, world_size=world, run=RUN)
        assert (stats.last_step, stats.num_batches) == (4, 5)
        mean, var = np_running("torch", 0.1, expected + [np_batch(np.concatenate(x[t])) for t in (3, 4)])
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
        np.testing.assert_allclose(stats.variance, var, rtol=1e-12)
        assert len(calls) == 1


def test_a_contribution_less_than_the_lag_ahead_closes_nothing(store_url, rng):
    with Store.open(store_url, step_lag=3) as store:
        calls = []
        store.on_incomplete = lambda *args: calls.append(args)
        layer = store.create_layer("bn", momentum=0.9)
        x = shards(rng, steps=3, world=2)
        layer.update(np_moments(x[0][0], 0), step=0, rank=0, world_size=2, run=RUN)
        for r in range(2):
            stats = layer.update(np_moments(x[2][r], 0), step=2, rank=r, world_size=2, run=RUN)
        assert stats.last_step is None and calls == []
        stats = layer.update(np_moments(x[0][1], 0), step=0, rank=1, world_size=2, run=RUN)
        assert (stats.last_step, stats.num_batches) == (2, 2)  # step 0 complete, then the waiting step 2
        assert calls == []


def test_the_default_lag(store, rng):
    assert store.step_lag == steps_mod.DEFAULT_LAG
    layer = store.create_layer("bn", momentum=0.9)
    x = rng.normal(size=(4, 2))
    layer.update(np_moments(x, 0), step=0, rank=0, world_size=2, run=RUN)
    lag = store.step_lag
    assert layer.update(np_moments(x, 0), step=lag - 1, rank=0, world_size=2, run=RUN).last_step is None
    assert layer.update(np_moments(x, 0), step=lag, rank=0, world_size=2, run=RUN).last_step == 0


# --------------------------------------------------------------------------
# per-sample kinds: the statistics of one process over the concatenated batch
# --------------------------------------------------------------------------
def _instance_units(x):  # x[N, C, H, W], channel axis 1
    return x.mean(axis=(2, 3)), x.var(axis=(2, 3)), x.shape[2] * x.shape[3]


def _group_units(x, groups=2):  # x[N, H, W, C], channel axis -1
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    return g.mean(axis=(1, 2, 4)), g.var(axis=(1, 2, 4)), h * w * (c // groups)


def _layer_units(x):  # x[N, K], normalized axis -1
    return x.mean(axis=-1), x.var(axis=-1), x.shape[-1]


def _np_per_sample_running(kind, convention, momentum, steps):
    """One process over the concatenated batch of each step, by the documented conventions (numpy)."""
    if convention == "cumulative":
        everything = np.concatenate([np.concatenate(s) for s in steps])
        axes = (0, 2, 3)
        return everything.mean(axis=axes), everything.var(axis=axes), everything.size / everything.shape[1]
    mean = var = None
    count = 0.0
    for i, ranks in enumerate(steps, start=1):
        x = np.concatenate(ranks)
        if kind == "rms":  # the whole batch is one unit: pooled statistics
            um, uv, k = x.mean(keepdims=True), x.var(keepdims=True), x.size
            bm, bv, n = um[0, 0], uv[0, 0], float(x.size)
        else:
            um, uv, k = {"instance": _instance_units, "group": _group_units, "layer": _layer_units}[kind](x)
            bm, bv = um.mean(axis=0), uv.mean(axis=0)  # mean of the unit means and of the unit variances
            n = float(k * um.shape[0])
        if mean is None:
            mean, var = np.zeros_like(bm), np.ones_like(bv)
        if convention == "keras":
            mean, var = mean * momentum + bm * (1 - momentum), var * momentum + bv * (1 - momentum)
        else:
            m = 1.0 / i if momentum is None else momentum
            mean, var = (1 - m) * mean + m * bm, (1 - m) * var + m * bv * k / (k - 1)
        count += n
    return mean, var, count


PER_SAMPLE = {
    # name: (layer kwargs, batch shape of rank r with n samples, the op that gives its moments)
    "instance-torch": (dict(kind="instance", axis=1, convention="torch", momentum=0.1),
                       lambda n: (n, 3, 4, 5), lambda x: normsvc.instance_norm(x, axis=1)[1]),
    "instance-cumulative": (dict(kind="instance", axis=1, convention="cumulative"),
                            lambda n: (n, 3, 4, 5), lambda x: normsvc.instance_norm(x, axis=1)[1]),
    "group-keras": (dict(kind="group", axis=-1, groups=2, momentum=0.9),
                    lambda n: (n, 3, 3, 4), lambda x: normsvc.group_norm(x, groups=2, axis=-1)[1]),
    "layer-keras": (dict(kind="layer", axis=-1, momentum=0.9),
                    lambda n: (n, 7), lambda x: normsvc.layer_norm(x, axis=-1)[1]),
    "layer-torch-cma": (dict(kind="layer", axis=-1, convention="torch", momentum=None),
                        lambda n: (n, 7), lambda x: normsvc.layer_norm(x, axis=-1)[1]),
    "rms-keras": (dict(kind="rms", axis=-1, momentum=0.8),
                  lambda n: (n, 6), lambda x: normsvc.rms_norm(x, axis=-1)[1]),
}


@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_per_sample_kinds_merge_to_one_process_over_the_concatenated_batch(store, rng, name):
    kwargs, shape, op = PER_SAMPLE[name]
    world, steps = 3, 4
    layer = store.create_layer("norm", **kwargs)
    data = [[rng.normal(1.5 * r - 1.0, 0.5 + r, size=shape(2 + r)) for r in range(world)] for _ in range(steps)]
    for t in range(steps):
        for r in rng.permutation(world):
            stats = layer.update(op(data[t][int(r)]), step=t, rank=int(r), world_size=world, run=RUN)
        assert stats.last_step == t
        mean, var, count = _np_per_sample_running(kwargs["kind"], kwargs["convention"] if "convention" in kwargs
                                                  else "keras", kwargs.get("momentum"), data[:t + 1])
        np.testing.assert_allclose(stats.mean, mean, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats.variance, var, rtol=1e-10)
        assert stats.count == pytest.approx(count)
        assert stats.num_batches == t + 1


# --------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key, field", BAD_KEYS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_KEYS)])
def test_bad_step_arguments_are_refused_naming_the_field(store, rng, assert_unchanged, key, field):
    layer = store.create_layer("bn", momentum=0.9)
    store.create_layer("bn2", momentum=0.9)
    m = np_moments(rng.normal(size=(4, 2)), 0)
    layer.update(m, step=0, rank=1, world_size=2, run=RUN)  # something pending
    with assert_unchanged(store):
        with pytest.raises(InvalidArgument) as info:
            layer.update(m, **key)
        assert info.value.field == field, info.value
        with pytest.raises(InvalidArgument) as info:
            store.update_many({"bn": m, "bn2": m}, **key)
        assert info.value.field == field, info.value
    # nothing pending was disturbed: rank 0 completes step 0
    assert layer.update(m, step=0, rank=0, world_size=2, run=RUN).last_step == 0


def test_a_world_size_mismatch_is_refused(store, rng, assert_unchanged):
    layer = store.create_layer("bn", momentum=0.9)
    m = np_moments(rng.normal(size=(4, 2)), 0)
    layer.update(m, step=0, rank=0, world_size=4, run=RUN)
    with assert_unchanged(store), pytest.raises(InvalidArgument) as info:
        layer.update(m, step=0, rank=1, world_size=2, run=RUN)
    assert info.value.field == "world_size" and "4" in str(info.value)
    for r in (1, 2):
        assert layer.update(m, step=0, rank=r, world_size=4, run=RUN).last_step is None
    assert layer.update(m, step=0, rank=3, world_size=4, run=RUN).last_step == 0


def test_moments_that_do_not_fit_the_layer_are_refused_before_they_are_kept(store, rng, assert_unchanged):
    layer = store.create_layer("bn", momentum=0.9, num_features=2)
    good = np_moments(rng.normal(size=(4, 2)), 0)
    with assert_unchanged(store), pytest.raises(InvalidArgument):
        layer.update(np_moments(rng.normal(size=(4, 3)), 0), step=0, rank=0, world_size=2, run=RUN)
    assert layer.update(good, step=0, rank=1, world_size=2, run=RUN).last_step is None
    assert layer.update(good, step=0, rank=0, world_size=2, run=RUN).last_step == 0


# --------------------------------------------------------------------------
# durability and the pieces of steps.py
# --------------------------------------------------------------------------
def test_pending_contributions_survive_reopening_the_sqlite_store(sqlite_url):
    case = G.cases["torch_m0.1"]
    with Store.open(sqlite_url) as store:
        layer = store.create_layer("bn", **case.layer_kwargs)
        for w in (3, 1):
            layer.update(rank_moments(case, 0, w), step=0, rank=w, world_size=G.workers, run=RUN)
    with Store.open(sqlite_url) as store:
        layer = store.layer("bn")
        assert layer.stats().last_step is None
        layer.update(rank_moments(case, 0, 0), step=0, rank=0, world_size=G.workers, run=RUN)
        stats = layer.update(rank_moments(case, 0, 2), step=0, rank=2, world_size=G.workers, run=RUN)
        assert stats.last_step == 0
        assert_golden(case, stats, 0)


def _contribution(step, rank, world_size, m):
    return Contribution(step, rank, world_size, m)


def test_merge_is_the_concatenated_batch(rng):
    xs = [rng.normal(r, 1 + r, size=(3 + r, 4)) for r in range(4)]
    parts = [_contribution(0, r, 4, np_moments(x, 0)) for r, x in enumerate(xs)]
    merged = steps_mod.merge(parts, 0)
    whole = np.concatenate(xs)
    assert float(merged.count) == len(whole)
    np.testing.assert_allclose(merged.mean, whole.mean(0), rtol=1e-13)
    np.testing.assert_allclose(merged.variance, whole.var(0), rtol=1e-12)
    # the compiled merge gives the bits of Moments.merge in rank order, empty parts included
    sequential = parts[0].moments
    for c in parts[1:]:
        sequential = sequential.merge(c.moments)
    assert np.array_equal(merged.mean, sequential.mean) and np.array_equal(merged.m2, sequential.m2)
    assert float(merged.count) == float(sequential.count)
    empty = _contribution(0, 0, 2, Moments(np.float64(0), np.zeros(4), np.zeros(4)))
    assert np.array_equal(steps_mod.merge([empty, parts[1]], 0).mean, parts[1].moments.mean)
    # per-sample moments concatenate along the sample axis
    ys = [rng.normal(size=(2 + r, 3, 5)) for r in range(3)]
    parts = [_contribution(0, r, 3, np_moments(y, 2)) for r, y in enumerate(ys)]
    merged = steps_mod.merge(parts, 1)
    whole = np.concatenate(ys)
    assert merged.mean.shape == (len(whole), 3)
    np.testing.assert_allclose(merged.mean, whole.mean(2), rtol=1e-13)
    np.testing.assert_allclose(merged.variance, whole.var(2), rtol=1e-12)


def test_admit_and_due():
    m = np_moments(np.arange(6.0).reshape(3, 2), 0)
    s = Steps()
    s = steps_mod.admit(s, StepKey("r", 0, 1, 2), m, "bn")
    assert s.run == "r" and [(c.step, c.rank) for c in s.pending] == [(0, 1)]
    assert steps_mod.admit(s, StepKey("r", 0, 1, 2), m, "bn") is None  # a retry
    s = steps_mod.admit(s, StepKey("r", 2, 0, 2), m, "bn")
    ready, after = steps_mod.due(s, 2, lag=8)
    assert ready == [] and after == s
    ready, after = steps_mod.due(s, 8, lag=8)  # 8 ahead of step 0: closed with rank 1 only
    assert [(t, [c.rank for c in parts], complete) for t, parts, complete in ready] == [(0, [1], False)]
    assert (after.last_step, after.incomplete, [c.step for c in after.pending]) == (0, 1, [2])
    s = steps_mod.admit(s, StepKey("r", 0, 0, 2), m, "bn")  # step 0 complete: due at once, in rank order
    ready, after = steps_mod.due(s, 0, lag=8)
    assert [(t, [c.rank for c in parts], complete) for t, parts, complete in ready] == [(0, [0, 1], True)]
    assert (after.last_step, after.incomplete) == (0, 0)


def _due_reference(pending: list, last, incomplete: int, arriving: int, lag: int):
    """The rule of steps.due, written plainly: apply the lowest open step while it is complete or
    ``lag`` steps behind ``arriving``."""
    ready = []
    while pending:
        step = min(c.step for c in pending)
        parts = sorted((c for c in pending if c.step == step), key=lambda c: c.rank)
        complete = len(parts) == parts[0].world_size
        if not complete and arriving - step < lag:
            break
        ready.append((step, [c.rank for c in parts], complete))
        pending = [c for c in pending if c.step != step]
        last, incomplete = step, incomplete + (not complete)
    return ready, last, incomplete, sorted((c.step, c.rank) for c in pending)


@settings(max_examples=300, deadline=None)
@given(world=st.integers(1, 4), present=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3)), max_size=14),
       ahead=st.integers(0, 12), lag=st.integers(1, 8))
def test_due_follows_its_rule(world, present, ahead, lag):
    """steps.due (with its fast exit for a lowest step still waiting) against a plain reading of
    the rule, on random sets of pending contributions."""
    m = Moments(np.float64(2), np.zeros(2), np.ones(2))
    s = Steps(run="r")
    for step, rank in sorted(set(present)):
        if rank < world:
            s = steps_mod.admit(s, StepKey("r", step, rank, world), m, "bn")
    arriving = (s.pending[-1].step if s.pending else 0) + ahead
    ready, after = steps_mod.due(s, arriving, lag)
    want = _due_reference(list(s.pending), s.last_step, s.incomplete, arriving, lag)
    got = ([(t, [c.rank for c in parts], complete) for t, parts, complete in ready], after.last_step,
           after.incomplete, [(c.step, c.rank) for c in after.pending])
    assert got == want


def test_pending_contributions_encode_and_decode_exactly(rng):
    batch = np_moments(rng.normal(size=(5, 3)), 0)
    per_sample = normsvc.instance_norm(rng.normal(size=(2, 3, 4)), axis=1)[1]
    counts = Moments(np.full((2, 3), 4.0), per_sample.mean, per_sample.m2)
    pending = (_contribution(3, 0, 2, batch), _contribution(3, 1, 2, per_sample), _contribution(4, 1, 2, counts))
    back = steps_mod.decode_pending(steps_mod.encode_pending(pending))
    assert len(back) == len(pending)
    for a, b in zip(pending, back):
        assert (a.step, a.rank, a.world_size) == (b.step, b.rank, b.world_size)
        for field in ("count", "mean", "m2"):
            x, y = np.asarray(getattr(a.moments, field)), np.asarray(getattr(b.moments, field))
            assert x.shape == y.shape and np.array_equal(x, y)
    assert steps_mod.decode_pending(steps_mod.encode_pending(())) == ()


def test_a_retry_is_told_from_a_conflict_by_the_values_themselves():
    a = np_moments(np.arange(6.0).reshape(3, 2), 0)
    s = steps_mod.admit(Steps(), StepKey("r", 0, 1, 2), a, "bn")
    same = Moments(a.count.copy(), a.mean.copy(), a.m2.copy())
    assert steps_mod.admit(s, StepKey("r", 0, 1, 2), same, "bn") is None
    for other in (Moments(a.count, np.nextafter(a.mean, np.inf), a.m2),  # one ulp apart
                  Moments(a.count + 1, a.mean, a.m2)):
        with pytest.raises(AlreadyExists, match="rank 1 already contributed other moments"):
            steps_mod.admit(s, StepKey("r", 0, 1, 2), other, "bn")


# --------------------------------------------------------------------------
# found while writing these tests, fixed
# --------------------------------------------------------------------------
def test_torch_layers_take_one_sample_per_rank(store, rng):
    layer = store.create_layer("bn", convention="torch", momentum=0.1)
    x = rng.normal(size=(2, 4, 3))  # 2 steps, 4 ranks with one sample each
    for t in range(2):
        for r in range(4):
            stats = layer.update(np_moments(x[t, r:r + 1], 0), step=t, rank=r, world_size=4, run=RUN)
    mean, var = np_running("torch", 0.1, [np_batch(x[t]) for t in range(2)])
    assert stats.last_step == 1
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(stats.variance, var, rtol=1e-12)


def test_a_contribution_of_another_shape_is_refused_when_it_arrives(store_url, rng):
    with Store.open(store_url, step_lag=2) as store:
        layer = store.create_layer("bn", momentum=0.9)  # shape learned from the first batch
        m = lambda c: np_moments(rng.normal(size=(4, c)), 0)
        layer.update(m(3), step=0, rank=0, world_size=3, run=RUN)
        with pytest.raises(InvalidArgument) as info:
            layer.update(m(4), step=0, rank=1, world_size=3, run=RUN)
        assert info.value.field == "moments.mean"
        for t in (1, 2):  # rank 2 never sends step 0: step 2 closes it, and the run goes on
            for r in range(3):
                stats = layer.update(m(3), step=t, rank=r, world_size=3, run=RUN)
        assert stats.last_step == 2 and stats.mean.shape == (3,)


def test_renorm_and_virtual_batch_layers_take_one_update_per_step(store, rng):
    """Two ranks push their moments per virtual batch to a renorm layer with virtual batches: each
    step applies once, with the averages over ALL ranks' virtual batches (tf.keras' rule for one
    batch made of them), checked against float64 numpy over the concatenated virtual batches."""
    v, b, c, m, rm, eps = 4, 8, 3, 0.9, 0.8, 1e-3
    layer = store.create_layer("bn", renorm=True, renorm_momentum=rm, momentum=m, virtual_batch_size=v,
                               num_features=c, epsilon=eps)
    mean, var, stddev = np.zeros(c), np.ones(c), np.ones(c)
    rmean, rstddev = np.zeros(c), np.ones(c)
    for step in range(3):
        xs = [rng.normal(rank + step, 1.0 + rank, size=(b, c)) for rank in range(2)]
        for rank in (1, 0):
            _, moments = normsvc.ops.batch_norm(xs[rank], virtual_batch_size=v)
            assert moments.mean.shape == (b // v, c)
            stats = layer.update(moments, step=step, rank=rank, world_size=2, run=RUN)
        # the reference: every rank's virtual batches (sample i of a rank in virtual batch i % (b / v))
        ghosts = [x[i::b // v] for x in xs for i in range(b // v)]
        bm = np.mean([g.mean(axis=0) for g in ghosts], axis=0)
        bv = np.mean([g.var(axis=0) for g in ghosts], axis=0)
        s = np.sqrt(bv + eps)
        mean, stddev = mean * m + bm * (1 - m), stddev * m + s * (1 - m)
        var = np.maximum(stddev**2 - eps, 0)
        rmean, rstddev = rmean * rm + bm * (1 - rm), rstddev * rm + s * (1 - rm)
        assert stats.version == step + 1 and stats.last_step == step
        for got, want in zip((stats.mean, stats.variance, *stats.renorm), (mean, var, stddev, rmean, rstddev)):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
