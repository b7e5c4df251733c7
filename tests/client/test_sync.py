"""normsvc.Client (normsvc/client/sync.py) against real servers on loopback: in-process and
``normsvc serve`` subprocesses.

The central check is that a Client is a drop-in for a Store: one scenario of
calls runs against ``Store.open("memory://")`` and against a Client, and the
transcripts (return values, exception classes and messages) must agree.
"""

from __future__ import annotations

import threading
import uuid
from concurrent import futures

import numpy as np
import pytest
from client_util import assert_same, ok_calls

import normsvc
from normsvc import Moments
from normsvc.client import Client, LayerStats, RemoteLayer
from normsvc.errors import ConfigConflict, DeadlineExceeded, FrozenLayer, InvalidArgument, LayerNotFound, StoreError
from normsvc.store import Store

pytestmark = pytest.mark.timeout(300)

# --- Store and Client agree ----------------------------------------------------------


def scenario(s, prefix: str, tmp_path) -> list:
    """A tour of the Store API; returns a transcript of results and errors."""
    rng = np.random.default_rng(7)
    out = []

    def attempt(fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except StoreError as exc:
            return ("raises", type(exc).__name__, str(exc), exc.layer)
        return result

    bn = s.create_layer(f"{prefix}/bn", convention="torch")
    ln = s.create_layer(f"{prefix}/ln", kind="layer", axis=-1)
    gn = s.create_layer(f"{prefix}/gn", kind="group", groups=2, axis=-1)
    cum = s.create_layer(f"{prefix}/cum", convention="cumulative", num_features=4)
    rms = s.create_layer(f"{prefix}/rms", kind="rms", momentum=0.5)
    out += [bn.name, bn.config(), ln.config(), gn.config(), cum.config(), rms.config(), bn.stats(), cum.stats()]
    out.append(s.create_layer(f"{prefix}/bn", convention="torch").name)  # idempotent

    x = rng.standard_normal((16, 4)).astype(np.float32) * 3 + 1
    m = normsvc.moments(x, axes=[0])
    out.append(bn.update(m))
    out.append(s.update_many({f"{prefix}/bn": m, f"{prefix}/cum": m}))
    out.append(bn.normalize(x, training=True))
    out.append(bn.normalize(x, training=False, gamma=np.full(4, 2.0), beta=np.ones(4)))
    out.append(bn.normalize(x.astype(np.float16), training=True, update=False))
    out.append(ln.normalize(x, training=True, gamma=np.full(4, 0.5)))
    out.append(ln.normalize(x, training=False))
    out.append(rms.normalize(x.astype(np.float64), training=True))
    out.append(rms.normalize(x, training=False))
    img = rng.standard_normal((2, 3, 3, 4))
    out.append(gn.normalize(img, training=True))
    out.append(gn.normalize(img, training=False))
    out += [bn.stats(), ln.stats(), gn.stats(), rms.stats(), cum.stats()]

    out.append(bn.update(m, request_id="same-id"))
    out.append(bn.update(m, request_id="same-id"))  # applied once
    out.append(bn.freeze())
    out.append(attempt(bn.update, m))
    out.append(bn.normalize(x, training=True))  # frozen: running statistics, no update
    out.append(bn.freeze())  # no-op
    out.append(bn.unfreeze())
    out.append(bn.reset())

    out.append(attempt(s.layer, f"{prefix}/missing"))
    out.append(attempt(s.create_layer, f"{prefix}/bn", convention="keras"))
    out.append(attempt(s.create_layer, f"{prefix}/x", kind="nope"))
    out.append(attempt(s.create_layer, f"{prefix}//bad"))
    out.append(attempt(bn.update, normsvc.moments(rng.standard_normal((4, 3)), axes=[0])))
    out.append(attempt(bn.update, "not moments"))
    out.append(attempt(s.update_many, {f"{prefix}/bn": m, f"{prefix}/missing": m}))
    out.append(bn.stats())  # the failed update_many changed nothing
    out.append(attempt(bn.normalize, x, training="yes"))
    out.append(attempt(bn.normalize, np.arange(8, dtype=np.int32).reshape(2, 4), training=True))
    out.append(attempt(ln.normalize, x, training=True, gamma=np.ones(3)))
    fresh = s.create_layer(f"{prefix}/fresh", convention="cumulative")
    out.append(attempt(fresh.normalize, x, training=False))
    out.append(attempt(s.delete_layer, f"{prefix}/missing"))

    out.append(s.list_layers(prefix))
    out.append(s.list_layers(prefix, after=f"{prefix}/cum", limit=2))
    out.append(s.list_layers(f"{prefix}/b"))
    out.append([(i.name, i.config, i.stats.version, i.stats.num_batches) for i in s.describe(prefix=f"{prefix}/b")])
    out.append([(i.name, i.config) for i in s.describe(f"{prefix}/gn")])
    out.append(attempt(s.describe, [f"{prefix}/missing"]))
    path = tmp_path / f"{type(s).__name__}.safetensors"
    out.append(s.export(path, naming="torch"))
    out.append(s.export(path, layers=[f"{prefix}/bn", f"{prefix}/gn"], dtype="float32"))
    out.append(s.import_(path, layers=[f"{prefix}/gn"]))
    out.append(attempt(s.export, path, naming="caffe"))
    out.append(attempt(s.import_, tmp_path / "nothing.safetensors"))
    out.append(s.delete_layer(f"{prefix}/ln"))
    out.append(attempt(ln.stats))
    out.append(s.list_layers(prefix))
    return out


def test_client_is_a_drop_in_for_store(target, tmp_path):
    prefix = f"t{uuid.uuid4().hex[:8]}"
    with Store.open("memory://") as store:
        expected = scenario(store, prefix, tmp_path)
    with Client(target) as client:
        got = scenario(client, prefix, tmp_path)
    assert len(got) == len(expected)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert_same(e, g, f"step {i}")


def test_handles_and_error_classes(server):
    with Client(server.address) as client:
        bn = client.create_layer("bn", num_features=3)
        assert isinstance(bn, RemoteLayer) and repr(bn) == "RemoteLayer('bn')"
        assert isinstance(client.layer("bn"), RemoteLayer)
        with pytest.raises(LayerNotFound) as info:
            client.layer("nope")
        assert info.value.layer == "nope" and info.value.code == "NOT_FOUND"
        assert isinstance(info.value, LookupError)
        with pytest.raises(ConfigConflict):
            client.create_layer("bn", num_features=4)
        bn.freeze()
        with pytest.raises(FrozenLayer) as info:
            bn.update(Moments.from_samples(np.ones((4, 3))))
        assert "frozen" in str(info.value)
        with pytest.raises(InvalidArgument) as info:
            client.update_many({"bn": Moments.from_samples(np.array([[np.nan, 1.0, 2.0]]))})
        assert isinstance(info.value, ValueError) and info.value.field


def test_server_validation_reaches_the_caller_with_its_field(server):
    with Client(server.address) as client:
        client.create_layer("bn", num_features=2)
        with pytest.raises(InvalidArgument) as info:
            client.layer("bn").update(Moments(np.float64(-1.0), np.zeros(2), np.zeros(2)))
        assert info.value.field and "count" in str(info.value)


# --- the scenarios the issue names ---------------------------------------------------


def test_32_concurrent_clients_x_200_updates_count_exactly(server):
    clients, updates = 32, 200
    with Client(server.address) as admin:
        admin.create_layer("shared", convention="cumulative", num_features=2)

    def worker(rank):
        with Client(server.address) as client:
            layer = client.layer("shared")
            m = Moments(np.float64(2.0), np.full(2, float(rank)), np.zeros(2))
            for _ in range(updates):
                layer.update(m)

    with futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker, r) for r in range(clients)]:
            f.result()
    with Client(server.address) as client:
        stats = client.layer("shared").stats()
    assert stats.num_batches == clients * updates
    assert stats.version == clients * updates
    assert stats.count == 2.0 * clients * updates
    ranks = np.arange(clients, dtype=np.float64)
    np.testing.assert_allclose(stats.mean, np.full(2, ranks.mean()), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, np.full(2, ranks.var()), rtol=1e-9)


def test_64_mib_tensor_goes_through_normalize_stream(server, rng):
    with Client(server.address) as client:
        bn = client.create_layer("big", convention="torch")
        x = rng.standard_normal((1 << 16, 256), dtype=np.float32)
        assert x.nbytes == 64 << 20
        y = bn.normalize(x, training=True)
        stats = bn.stats()
    assert ok_calls(server, "NormalizeStream") == 1 and ok_calls(server, "Normalize") == 0
    expected, m = normsvc.batch_norm(x, axis=-1, epsilon=1e-5)
    assert y.dtype == np.float32 and y.shape == x.shape and y.flags.writeable
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert stats.version == 1 and stats.count == x.shape[0]
    np.testing.assert_allclose(stats.mean, 0.1 * m.mean, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("max_message_bytes", [64 << 20, 100_000])  # unary Normalize, NormalizeStream
def test_normalize_return_moments_mirrors_the_store(server, rng, max_message_bytes):
    with Client(server.address, max_message_bytes=max_message_bytes) as client:
        ln = client.create_layer("ln_moments", kind="layer", axis=-1)
        x = rng.standard_normal((50, 300))
        y, m = ln.normalize(x, training=True, return_moments=True)
        want_y, want = normsvc.layer_norm(x, axis=-1, epsilon=1e-3)
        np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
        assert isinstance(m, Moments)
        np.testing.assert_allclose(m.mean, want.mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(m.m2, want.m2, rtol=1e-9)
        np.testing.assert_array_equal(m.count, want.count)
        y_inf, none = ln.normalize(x, training=False, return_moments=True)
        assert none is None and y_inf.shape == x.shape
        assert isinstance(ln.normalize(x, training=False), np.ndarray)
        local = Store.open("memory://").create_layer("ln_moments", kind="layer", axis=-1)
        y_local, m_local = local.normalize(x, training=True, return_moments=True)
    np.testing.assert_array_equal(y, y_local)
    np.testing.assert_allclose(m.variance, m_local.variance, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_stream_chunks_reassemble_exactly(server, rng, dtype):
    """A small message limit forces NormalizeStream; odd sizes cross chunk boundaries."""
    with Client(server.address) as plain, Client(server.address, max_message_bytes=100_000) as small:
        plain.create_layer("ln", kind="layer", axis=[1, 2])
        x = (rng.standard_normal((7, 33, 101)) * 4).astype(dtype)  # several chunks of an odd size
        unary = plain.layer("ln").normalize(x, training=True, update=False)
        streamed = small.layer("ln").normalize(x, training=True, update=False)
        gamma = rng.standard_normal((33, 101))
        with_gamma = small.layer("ln").normalize(x, training=True, update=False, gamma=gamma)
    assert ok_calls(server, "NormalizeStream") == 2
    np.testing.assert_array_equal(streamed, unary)
    np.testing.assert_allclose(with_gamma, unary.astype(np.float64) * gamma, rtol=2e-3, atol=2e-3)


def test_allreduce_from_4_threads_equals_the_concatenated_data(server, rng):
    world = 4
    data = [rng.standard_normal((8 + 3 * r, 5)) * (r + 1) + r for r in range(world)]
    images = [rng.standard_normal((2 + r, 3, 4, 4)) - r for r in range(world)]  # channels-first
    with Client(server.address) as client:
        client.create_layer("sync/bn", convention="torch")
        client.create_layer("sync/conv", axis=1)

    def rank(r):
        with Client(server.address) as client:
            local = {"sync/bn": normsvc.moments(data[r], axes=[0]),
                     "sync/conv": normsvc.moments(images[r], axes=[0, 2, 3])}
            return [client.allreduce(local, step=step, rank=r, world_size=world, group="job")
                    for step in range(2)]

    with futures.ThreadPoolExecutor(world) as pool:
        results = [step for steps in pool.map(rank, range(world)) for step in steps]
    expected = {"sync/bn": Moments.from_samples(np.concatenate(data)),
                "sync/conv": normsvc.moments(np.concatenate(images), axes=[0, 2, 3])}
    for result in results:
        for name, want in expected.items():
            got = result.moments[name]
            assert float(got.count) == float(want.count)
            np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(got.variance, want.variance, rtol=1e-11)
            np.testing.assert_array_equal(got.mean, results[0].moments[name].mean)  # same bits on every rank
    with Client(server.address) as client:
        stats = client.layer("sync/bn").stats()
    assert stats.version == 2 and stats.num_batches == 2  # one update per step, not one per rank
    assert sorted({r.stats["sync/bn"].version for r in results}) == [1, 2]
    np.testing.assert_allclose(stats.mean, 0.19 * expected["sync/bn"].mean, rtol=1e-9)


def test_allreduce_missing_rank_is_a_deadline(server):
    with Client(server.address) as client:
        client.create_layer("lonely", num_features=2)
        m = Moments.from_samples(np.ones((3, 2)))
        with pytest.raises(DeadlineExceeded) as info:
            client.allreduce({"lonely": m}, step=0, rank=0, world_size=2, timeout=0.5)
        assert isinstance(info.value, TimeoutError)
        assert client.layer("lonely").stats().version == 0


def test_watch_sees_every_version(server):
    n = 60
    with Client(server.address) as client:
        layer = client.create_layer("watched", num_features=3)
        seen, started = [], threading.Event()

        def follow():
            with client.watch("watched", timeout=60) as watch:
                for item in watch:
                    assert isinstance(item, LayerStats) and item.layer == "watched"
                    seen.append(item.stats.version)
                    started.set()
                    if item.stats.version == n:
                        return

        thread = threading.Thread(target=follow)
        thread.start()
        assert started.wait(30)
        m = Moments.from_samples(np.arange(6.0).reshape(2, 3))
        for i in range(n):
            if i % 10 == 9:
                layer.reset()
            else:
                layer.update(m)
        thread.join(60)
    assert not thread.is_alive()
    assert seen == list(range(n + 1))


def test_watch_cancel_and_deleted_layer(server):
    with Client(server.address) as client:
        client.create_layer("w", num_features=1)
        watch = client.watch(["w"], skip_initial=False)
        assert next(watch).stats.version == 0
        watch.cancel()
        assert list(watch) == []
        watch = client.watch("w", skip_initial=True)
        client.layer("w").update(Moments.from_samples(np.ones((2, 1))))
        assert next(watch).stats.version == 1
        client.delete_layer("w")
        with pytest.raises(LayerNotFound):
            next(watch)


def test_in_process_store_code_runs_unchanged_against_a_subprocess(process_address):
    """What the README promises: swap Store.open(...) for Client(...) and nothing else changes."""
    def train(store):
        bn = store.create_layer(f"swap-{id(store)}/bn", convention="torch", momentum=None)
        for step in range(3):
            x = np.full((4, 2), float(step))
            bn.update(normsvc.moments(x, axes=[0]))
        return bn.stats().mean

    with Store.open("memory://") as store:
        local = train(store)
    with Client(process_address) as client:
        remote = train(client)
    np.testing.assert_allclose(remote, local)
    np.testing.assert_allclose(local, [1.0, 1.0])
