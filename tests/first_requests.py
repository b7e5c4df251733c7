"""The first requests a server sees, which must find their compiled code in numba's cache
(tests/test_precompile.py in a process, tests/test_deploy.py in a fresh container)."""

import numpy as np

import normsvc


def make_first_requests(client) -> None:
    """UpdateStats and Normalize (training and inference) in float16, float32 and float64, then step
    contributions of two ranks: one layer per entry, and three layers packed."""
    layer = client.create_layer("bn", num_features=16)
    x = np.random.default_rng(0).standard_normal((64, 8, 8, 16)).astype(np.float32)
    for dtype in (np.float16, np.float32, np.float64):
        layer.update(normsvc.moments(x.astype(dtype), axes=[0, 1, 2]))
        layer.normalize(x.astype(dtype), training=True)
        layer.normalize(x[:1, :2].astype(dtype), training=False)
    names = [f"bn/{i}" for i in range(3)]
    for name in names:
        client.create_layer(name, num_features=16)
    for rank in range(2):
        m = normsvc.moments(x[rank::2].astype(np.float64), axes=[0, 1, 2])
        layer.update(m, step=0, rank=rank, world_size=2, run="r")
        client.update_many(dict.fromkeys(names, m), step=0, rank=rank, world_size=2, run="r")
