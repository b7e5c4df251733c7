"""normsvc.AsyncClient (normsvc/client/aio.py) against a real in-process server: the Client's
behaviour, as coroutines."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from client_util import FAST_RETRY, assert_same, ok_calls

import normsvc
from normsvc import Moments
from normsvc.client import AsyncClient, LayerStats, RemoteLayer, Retry
from normsvc.errors import (
    ConfigConflict,
    DeadlineExceeded,
    FrozenLayer,
    InvalidArgument,
    LayerNotFound,
    Unauthenticated,
    Unavailable,
)
from normsvc.store import Store
from normsvc.config import LayerConfig

pytestmark = pytest.mark.timeout(120)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_the_store_api_as_coroutines(server, rng, tmp_path):
    x = rng.standard_normal((16, 4)).astype(np.float32)
    m = normsvc.moments(x, axes=[0])

    async def remote():
        async with AsyncClient(server.address) as client:
            bn = await client.create_layer("a/bn", convention="torch")
            assert isinstance(bn, RemoteLayer) and bn.name == "a/bn"
            cum = await (await client.layer("a/bn")).config(), await client.create_layer("a/cum", convention="cumulative")
            out = [cum[0], await bn.update(m), await client.update_many({"a/bn": m, "a/cum": m}),
                   await bn.normalize(x, training=True), await bn.normalize(x, training=False),
                   await bn.freeze(), await bn.unfreeze(), await bn.reset(), await bn.stats(),
                   await client.list_layers("a/"), await client.list_layers("a/", after="a/bn"),
                   await client.export(tmp_path / "remote.safetensors", naming="torch"),
                   await client.import_(tmp_path / "remote.safetensors", naming="torch")]
            await client.delete_layer("a/cum")
            out.append(await client.list_layers())
            return out

    def local():
        with Store.open("memory://") as store:
            bn = store.create_layer("a/bn", convention="torch")
            store.create_layer("a/cum", convention="cumulative")
            out = [bn.config(), bn.update(m), store.update_many({"a/bn": m, "a/cum": m}),
                   bn.normalize(x, training=True), bn.normalize(x, training=False),
                   bn.freeze(), bn.unfreeze(), bn.reset(), bn.stats(),
                   store.list_layers("a/"), store.list_layers("a/", after="a/bn"),
                   store.export(tmp_path / "local.safetensors", naming="torch"),
                   store.import_(tmp_path / "local.safetensors", naming="torch")]
            store.delete_layer("a/cum")
            out.append(store.list_layers())
            return out

    got, expected = run(remote()), local()
    assert isinstance(got[0], LayerConfig)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert_same(e, g, f"step {i}")


def test_errors_are_the_store_exceptions(server):
    async def main():
        async with AsyncClient(server.address) as client:
            bn = await client.create_layer("bn", num_features=2)
            with pytest.raises(LayerNotFound):
                await client.layer("missing")
            with pytest.raises(ConfigConflict):
                await client.create_layer("bn", num_features=3)
            with pytest.raises(InvalidArgument):
                await bn.update(Moments.from_samples(np.ones((2, 3))))
            await bn.freeze()
            with pytest.raises(FrozenLayer):
                await bn.update(Moments.from_samples(np.ones((2, 2))))
            with pytest.raises(DeadlineExceeded):
                await client.allreduce({"bn": Moments.from_samples(np.ones((2, 2)))}, step=0, rank=0,
                                       world_size=2, timeout=0.3)

    run(main())


def test_large_tensor_streams(server, rng):
    x = rng.standard_normal((300, 257)).astype(np.float32)

    async def main():
        async with AsyncClient(server.address, max_message_bytes=120_000) as client:
            layer = await client.create_layer("ln", kind="layer")
            return await layer.normalize(x, training=True, update=False)

    y = run(main())
    np.testing.assert_allclose(y, normsvc.layer_norm(x)[0], rtol=1e-5, atol=1e-5)
    assert ok_calls(server, "NormalizeStream") == 1


def test_allreduce_4_ranks_with_gather(server, rng):
    data = [rng.standard_normal((5 + r, 3)) for r in range(4)]

    async def main():
        async with AsyncClient(server.address) as client:
            await client.create_layer("sync", convention="torch")
            return await asyncio.gather(*[
                client.allreduce({"sync": normsvc.moments(d, axes=[0])}, step=0, rank=r, world_size=4)
                for r, d in enumerate(data)
            ])

    everything = Moments.from_samples(np.concatenate(data))
    for result in run(main()):
        np.testing.assert_allclose(result.moments["sync"].mean, everything.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(result.moments["sync"].variance, everything.variance, rtol=1e-12)
        assert result.stats["sync"].version == 1


def test_watch_sees_every_version(server):
    n = 30

    async def main():
        async with AsyncClient(server.address) as client:
            layer = await client.create_layer("w", num_features=2)
            watch = await client.watch("w", skip_initial=True)
            m = Moments.from_samples(np.ones((2, 2)))
            for _ in range(n):
                await layer.update(m)
            seen = []
            async with watch:
                async for item in watch:
                    assert isinstance(item, LayerStats)
                    seen.append(item.stats.version)
                    if item.stats.version == n:
                        break
            await client.delete_layer("w")
            return seen

    assert run(main()) == list(range(1, n + 1))


def test_unavailable_retried_with_one_request_id(flaky):
    service = flaky(failures=2)

    async def main():
        async with AsyncClient(f"127.0.0.1:{service.port}", retry=FAST_RETRY) as client:
            return await client.update_many({"a": Moments.from_samples(np.ones((2, 1)))})

    assert run(main())["a"].version == 1
    assert len(service.request_ids) == 3 and len(set(service.request_ids)) == 1


def test_unreachable_and_unauthenticated(start_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"tokens": [{"token": "t", "role": "read"}]}')
    server = start_server(tokens=str(tokens))

    async def main():
        async with AsyncClient("127.0.0.1:1", retry=Retry(attempts=2, initial_backoff=0.01)) as client:
            with pytest.raises(Unavailable, match="gave up after 2 attempts"):
                await client.list_layers()
        async with AsyncClient(server.address) as client:
            with pytest.raises(Unauthenticated) as info:
                await client.list_layers()
            assert info.value.code == "UNAUTHENTICATED"
        async with AsyncClient(server.address, token="t") as client:
            assert await client.list_layers() == []

    run(main())
