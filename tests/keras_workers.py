"""One data-parallel rank training Keras models with normsvc.keras, for tests/test_keras.py.

``python keras_workers.py ADDRESS RUN RANK WORLD_SIZE INIT_FILE OUT`` runs two
scenarios against the server at ADDRESS and writes what this rank saw to OUT
(an npz file):

``shared``
    A Sequential model (SharedBatchNormalization, then Dense) trained with
    ``train_on_batch`` for :data:`STEPS` steps on this rank's batches; after
    each step the moving statistics the layer holds and the service's
    ``last_step`` they came with; at the end, after every rank's last step
    was applied, the statistics :meth:`pull` gives.
``sync``
    A functional model (Dense, SharedBatchNormalization(mode="sync"), rank
    and world size from ``torch.distributed``, initialized with gloo over
    INIT_FILE) run forward and backward on this rank's batches with a loss
    ``sum(y * r)``: outputs, the input's gradient, every weight's gradient
    and the moving statistics, per step.
``renorm`` and ``renorm_sync`` (with a Keras that has batch renormalization)
    The same two with ``renorm=True`` and active clipping: in shared mode a
    Sequential of one SharedBatchNormalization called on this rank's shared
    batches (outputs, ``last_step`` and the five moving variables per step,
    then after every rank's last step what :meth:`pull` gives); in sync mode
    the functional model above, as the ``sync`` scenario records it, plus the
    renorm variables.

The batches and initial weights come from the functions below, which the test
imports to build its references (one plain Keras BatchNormalization fed the
concatenated batches).
"""

from __future__ import annotations

import os
import sys
import time

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported, here and in the test

import numpy as np

STEPS = 4
FEATURES = 5
HIDDEN = 4
MOMENTUM = 0.9
#: Batch sizes per rank: unequal, so the global moments weigh the ranks by their counts.
SHARED_BATCH = (8, 12)
SYNC_BATCH = (6, 10)
PREFIX = "w/"
SHARED_LAYER = PREFIX + "shared_model/bn"  # prefix + the Keras path of the Sequential's layer
SYNC_LAYER = PREFIX + "sbn"  # functional models' layer paths have no model name
RENORM_LAYER = PREFIX + "renorm_model/rbn"
RENORM_SYNC_LAYER = PREFIX + "rsbn"
#: Batch renormalization's options: clipping tight enough to be active (the ranks' batches differ).
RENORM = dict(renorm=True, renorm_momentum=0.8, renorm_clipping={"rmin": 0.9, "rmax": 1.1, "dmax": 0.2})
#: Keras' moving variables, renorm's included, in RunningStats' order (mean, variance, renorm).
MOVING = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")


def shared_batch(rank: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of ``rank`` at ``step``: each rank its own distribution, drifting with the step."""
    rng = np.random.default_rng([rank, step, 0])
    x = rng.normal(0.5 * rank + 0.25 * step, 1.0 + 0.5 * rank, size=(SHARED_BATCH[rank], 3, FEATURES))
    y = rng.normal(size=(SHARED_BATCH[rank], 3, 1))
    return x.astype(np.float32), y.astype(np.float32)


def sync_batch(rank: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, r) of ``rank`` at ``step``: the input and the loss weights (loss = sum(y * r))."""
    rng = np.random.default_rng([rank, step, 1])
    x = rng.normal(rank - 0.5, 1.0 + rank, size=(SYNC_BATCH[rank], FEATURES))
    r = rng.normal(size=(SYNC_BATCH[rank], HIDDEN))
    return x.astype(np.float32), r.astype(np.float32)


def sync_weights() -> dict:
    """The sync model's initial weights (gamma and beta away from 1 and 0, so they count)."""
    rng = np.random.default_rng(7)
    return {
        "kernel": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32),
        "bias": rng.normal(size=HIDDEN).astype(np.float32),
        "gamma": rng.uniform(0.5, 1.5, size=HIDDEN).astype(np.float32),
        "beta": rng.normal(size=HIDDEN).astype(np.float32),
    }


def sync_model(bn):
    """Input -> Dense -> ``bn``, with :func:`sync_weights`; the test builds it with a plain BatchNormalization."""
    import keras

    inputs = keras.Input((FEATURES,))
    dense = keras.layers.Dense(HIDDEN, name="dense")
    model = keras.Model(inputs, bn(dense(inputs)), name="sync_model")
    w = sync_weights()
    dense.set_weights([w["kernel"], w["bias"]])
    bn.gamma.assign(w["gamma"])
    bn.beta.assign(w["beta"])
    return model


def keras_has_renorm() -> bool:
    import inspect

    import keras

    return "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters


def forward_backward(model, x: np.ndarray, r: np.ndarray) -> dict:
    """One training forward and backward: y, dx and each weight's gradient (by its Keras path)."""
    import torch

    xt = torch.tensor(x, requires_grad=True)
    y = model(xt, training=True)
    (y * torch.tensor(r)).sum().backward()
    out = {"y": y.detach().numpy().copy(), "dx": xt.grad.numpy().copy()}
    for v in model.trainable_variables:
        out[v.path.rsplit("/", 1)[1]] = v.value.grad.numpy().copy()
        v.value.grad = None
    return out


def main(address: str, run: str, rank: int, world_size: int, init_file: str, out: str) -> None:
    import keras
    import torch.distributed as dist

    import normsvc
    from normsvc.keras import SharedBatchNormalization

    results = {}

    # --- shared: local batch statistics, one step contribution per train_on_batch -------------
    bn = SharedBatchNormalization(address, momentum=MOMENTUM, rank=rank, world_size=world_size, run=run,
                                  prefix=PREFIX, name="bn")
    model = keras.Sequential([keras.Input((3, FEATURES)), bn, keras.layers.Dense(1)], name="shared_model")
    model.compile(optimizer="sgd", loss="mse")
    seen = []
    for step in range(STEPS):
        model.train_on_batch(*shared_batch(rank, step))
        last = bn.last_stats.last_step
        seen.append((-1 if last is None else last, bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()))
    results["shared/step"] = np.array([bn.step])
    results["shared/last_step"] = np.array([s[0] for s in seen])
    results["shared/mean"] = np.stack([s[1] for s in seen])
    results["shared/variance"] = np.stack([s[2] for s in seen])
    with normsvc.Client(address) as client:
        deadline = time.monotonic() + 60
        while client.layer(bn.service_name).stats().last_step != STEPS - 1:
            if time.monotonic() > deadline:
                raise SystemExit(f"rank {rank}: the other ranks' steps never came")
            time.sleep(0.05)
    pulled = bn.pull()
    results["shared/pulled_last_step"] = np.array([pulled.last_step])
    results["shared/pulled_mean"] = bn.moving_mean.numpy().copy()
    results["shared/pulled_variance"] = bn.moving_variance.numpy().copy()

    # --- sync: global batch statistics, rank and world size from torch.distributed ------------
    renorm = keras_has_renorm()
    if renorm:
        # --- renorm: the same with batch renormalization, shared mode ---------------------------
        rbn = SharedBatchNormalization(address, momentum=MOMENTUM, rank=rank, world_size=world_size, run=run,
                                       prefix=PREFIX, name="rbn", **RENORM)
        model = keras.Sequential([keras.Input((3, FEATURES)), rbn], name="renorm_model")
        for step in range(STEPS):
            y = model(shared_batch(rank, step)[0], training=True)
            results.setdefault("renorm/y", []).append(keras.ops.convert_to_numpy(y).copy())
            last = rbn.last_stats.last_step
            results.setdefault("renorm/last_step", []).append(-1 if last is None else last)
            for leaf in MOVING:
                results.setdefault(f"renorm/{leaf}", []).append(getattr(rbn, leaf).numpy().copy())
        with normsvc.Client(address) as client:
            deadline = time.monotonic() + 60
            while client.layer(rbn.service_name).stats().last_step != STEPS - 1:
                if time.monotonic() > deadline:
                    raise SystemExit(f"rank {rank}: the other ranks' renorm steps never came")
                time.sleep(0.05)
        rbn.pull()
        for leaf in MOVING:
            results[f"renorm/pulled_{leaf}"] = getattr(rbn, leaf).numpy().copy()

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        with normsvc.Client(address) as client:
            scenarios = [("sync", "sbn", {})] + ([("renorm_sync", "rsbn", RENORM)] if renorm else [])
            for scenario, name, options in scenarios:
                sbn = SharedBatchNormalization(client, momentum=MOMENTUM, mode="sync", run=run, prefix=PREFIX,
                                               name=name, **options)
                model = sync_model(sbn)
                for step in range(STEPS):
                    for key, value in forward_backward(model, *sync_batch(rank, step)).items():
                        results.setdefault(f"{scenario}/{key}", []).append(value)
                    results.setdefault(f"{scenario}/mean", []).append(sbn.moving_mean.numpy().copy())
                    results.setdefault(f"{scenario}/variance", []).append(sbn.moving_variance.numpy().copy())
                    results.setdefault(f"{scenario}/last_step", []).append(sbn.last_stats.last_step)
                    for leaf in MOVING[2:] if options else ():
                        results.setdefault(f"{scenario}/{leaf}", []).append(getattr(sbn, leaf).numpy().copy())
    finally:
        dist.destroy_process_group()
    np.savez(out, **{k: np.asarray(v) for k, v in results.items()})


if __name__ == "__main__":
    address, run, rank, world_size, init_file, out = sys.argv[1:]
    main(address, run, int(rank), int(world_size), init_file, out)
