"""Statistics and moments a Client hands out are the caller's: writable, as a Store's are."""

from __future__ import annotations

import asyncio

import pytest
from ownership import assert_owned, handed_out

from normsvc import AsyncClient, Client, Moments

pytestmark = pytest.mark.timeout(120)


def test_every_result_is_the_callers_own(server, rng):
    with Client(server.address) as client:
        client.create_layer("net/bn")
        for label, value in handed_out(client, "net/bn", rng).items():
            assert_owned(value, label)


def test_describe_allreduce_and_watch_hand_out_owned_arrays(server, rng):
    moments = Moments.from_samples(rng.standard_normal((8, 3)))
    with Client(server.address) as client:
        client.create_layer("bn", num_features=3)
        result = client.allreduce({"bn": moments}, step=0, rank=0, world_size=1)
        values = {"allreduce moments": result.moments["bn"], "allreduce stats": result.stats["bn"],
                  "describe": client.describe(["bn"])[0].stats}
        with client.watch(["bn"]) as watch:
            values["watch"] = next(watch).stats
        for label, value in values.items():
            assert_owned(value, label)
        assert client.layer("bn").stats().version == 1


def test_async_client_hands_out_owned_arrays(server, rng):
    x = rng.standard_normal((8, 3))

    async def received():
        async with AsyncClient(server.address) as client:
            bn = await client.create_layer("bn", num_features=3)
            stats = await bn.update(Moments.from_samples(x))
            _, moments = await bn.normalize(x, training=True, return_moments=True)
            return [stats, moments, await bn.stats()]

    for value in asyncio.run(asyncio.wait_for(received(), 60)):
        assert_owned(value)
