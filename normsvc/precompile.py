"""Compile normsvc's numba code ahead of time into numba's on-disk cache (``normsvc precompile``).

Every jitted function here is ``cache=True``: what one process compiles, the
next loads from ``NUMBA_CACHE_DIR`` (default: ``__pycache__`` beside the
modules) instead of compiling again, which costs up to a second per function
and type signature.  The container image runs ``normsvc precompile`` at build
time, so a server's first requests do not pay for it.

It runs the paths a server takes, with the argument types they see there:
every norm in float16, float32 and float64, small inputs (serial kernels)
and large ones (parallel kernels), training and inference; and an update as
UpdateStats makes it (moments decoded from a message, so read-only arrays,
and moments from the ops) into a memory and a sqlite store, plain and as
step contributions of two ranks, one layer per entry and several packed.  CUDA kernels
are not compiled here: that needs the GPU they will run on.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from . import ops
from ._proto import normsvc_pb2 as pb
from .store import Store
from .wire.packed import pack_moments, unpack_moments
from .wire.tensors import decode_moments, encode_moments

__all__ = ["precompile"]


def precompile() -> float:
    """Run every jitted path once; returns the seconds it took."""
    start = time.perf_counter()
    big = np.random.default_rng(0).standard_normal((64, 8, 8, 16)).astype(np.float32)  # parallel kernels
    inputs = []
    for x in (big[:1, :2], big):  # serial, parallel
        for dtype in (np.float16, np.float32, np.float64):
            xd = x.astype(dtype)
            frozen = xd.copy()
            frozen.flags.writeable = False  # what the server decodes from a request
            inputs += [xd, frozen]
    for xd in inputs:
        for norm in (ops.layer_norm, ops.instance_norm, ops.rms_norm):
            norm(xd, axis=-1)
        ops.group_norm(xd, groups=4)
        _, m = ops.batch_norm(xd, axis=-1)
        ops.batch_norm(xd, mean=m.mean, variance=m.variance)  # inference mode
        ops.moments(xd, axes=list(range(xd.ndim - 1)))
    moments = ops.moments(big.astype(np.float64), axes=[0, 1, 2])
    decoded = decode_moments(encode_moments(moments), field="moments")
    with tempfile.TemporaryDirectory() as tmp:
        for url in ("memory://", f"sqlite:///{tmp}/precompile.db"):  # the update path of each backend
            with Store.open(url) as store:
                layer = store.create_layer("precompile", num_features=16)
                for m in (moments, decoded):
                    layer.update(m)
                # step contributions of two ranks: checked, kept, merged in rank order and applied
                for rank, m in enumerate((moments, decoded)):
                    layer.update(m, step=0, rank=rank, world_size=2, run="precompile")
                names = [f"precompile/{i}" for i in range(3)]
                for name in names:
                    store.create_layer(name, num_features=16)
                packed = unpack_moments(pack_moments(dict.fromkeys(names, moments), pb.PackedMoments()),
                                        field="packed")
                for rank in range(2):
                    store.update_many(packed, step=0, rank=rank, world_size=2, run="precompile")
                for xd in inputs:
                    for training in (True, False):
                        layer.normalize(xd, training=training, update=False)
    return time.perf_counter() - start
