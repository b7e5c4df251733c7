"""Golden files for batch renormalization and virtual batches, from tf_keras.

Keras 3 has neither ``renorm`` nor ``virtual_batch_size``; tf_keras (the
TF-Keras 2 package, on tensorflow-cpu) has both, as
``tf.keras.layers.BatchNormalization(renorm=True, renorm_clipping={...},
renorm_momentum=..., virtual_batch_size=...)``.  This script runs sequences
of training steps through that layer and writes, per case,
``tests/golden/tf_keras/<case>.npz``: the inputs ``x`` (steps, batch, ...), the
training outputs ``y`` per step, every moving variable after each step
(``moving_mean``, ``moving_variance``; with renorm also ``moving_stddev``,
``renorm_mean``, ``renorm_stddev``), the clipping in force at each step
(``rmin``/``rmax``/``dmax``, one value per step) and the inference output
``y_infer`` of the last input after the last step.  ``tests/golden/tf_keras/index.json``
lists the cases with their layer arguments.  ``tests/test_golden_tf_keras.py``
checks normsvc against them.

The renorm cases follow the paper's schedule: clipping tight at the start
(rmax 1 and dmax 0 is plain batch norm) and relaxing step by step, the
clipping values being tf.Variables the layer reads at every call.

How to run (its own virtual environment; see ``make golden``)::

    python3 -m venv .venv-golden
    .venv-golden/bin/pip install 'tensorflow-cpu>=2.21,<2.22' 'tf_keras>=2.21,<2.22' numpy
    .venv-golden/bin/python scripts/make_golden_tf_keras.py

The layers run in float32, tf_keras' default (its renorm path fails in
float64: it compares the float64 renorm_stddev with a float32 sqrt(epsilon)),
so the files hold tf_keras' results to float32 precision; the inputs come from fixed-seed numpy generators and the zip
timestamps are fixed, so a rerun with the same versions rewrites the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

TF_KERAS_VERSION = "2.21"
GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden" / "tf_keras"

if not tf_keras.__version__.startswith(TF_KERAS_VERSION):
    sys.exit(f"make_golden_tf_keras.py: needs tf_keras {TF_KERAS_VERSION}, found {tf_keras.__version__}")


def save_npz(path: Path, arrays: dict) -> None:
    """np.savez_compressed, but byte-reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[key], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def schedule(steps: int, start: float, end: float) -> np.ndarray:
    """Values moving linearly from ``start`` to ``end`` over ``steps`` (the paper relaxes r and d)."""
    return np.linspace(start, end, steps)


def run_case(name: str, *, shape, steps: int, seed: int, axis=-1, momentum=0.9, epsilon=1e-3,
             renorm=False, renorm_momentum=0.8, clipping=None, virtual_batch_size=None) -> dict:
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    # per-channel offsets and scales that drift over the steps, so the batch statistics
    # move away from the renorm averages and the corrections r and d matter
    loc = rng.uniform(-2.0, 2.0, size=channels)
    sd = rng.uniform(0.3, 3.0, size=channels)
    bshape = [1] * len(shape)
    bshape[axis] = channels
    xs = []
    for t in range(steps):
        drift = 1.0 + 0.15 * t
        xs.append(rng.standard_normal(shape) * (sd * drift).reshape(bshape) + (loc * drift).reshape(bshape))
    xs = np.stack(xs).astype(np.float32)

    clip_vars = {}
    kwargs = {}
    if renorm:
        for key, (a, b) in (clipping or {}).items():
            clip_vars[key] = (tf.Variable(a, dtype=tf.float32, trainable=False), schedule(steps, a, b))
        kwargs = dict(renorm=True, renorm_momentum=renorm_momentum,
                      renorm_clipping={k: v for k, (v, _) in clip_vars.items()})
    if virtual_batch_size is not None:
        kwargs["virtual_batch_size"] = virtual_batch_size
    layer = tf_keras.layers.BatchNormalization(axis=axis, momentum=momentum, epsilon=epsilon, dtype="float32",
                                               **kwargs)
    layer.build(shape)
    gamma = rng.normal(1.0, 0.4, size=channels).astype(np.float32)
    beta = rng.normal(0.0, 0.5, size=channels).astype(np.float32)
    # with virtual batches the variables have the rank of the reshaped input: (1, 1, ..., C)
    layer.gamma.assign(gamma.reshape(layer.gamma.shape))
    layer.beta.assign(beta.reshape(layer.beta.shape))

    names = ["moving_mean", "moving_variance"]
    if renorm:
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    out = {"x": xs, "gamma": gamma, "beta": beta, "y": []} | {n: [] for n in names}
    out |= {key: values for key, (_, values) in clip_vars.items()}
    for t in range(steps):
        for key, (var, values) in clip_vars.items():
            var.assign(np.float32(values[t]))
        y = layer(tf.constant(xs[t]), training=True)
        out["y"].append(y.numpy())
        for n in names:
            out[n].append(getattr(layer, n).numpy().reshape(-1))
    out["y_infer"] = layer(tf.constant(xs[-1]), training=False).numpy()
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
    save_npz(GOLDEN_DIR / f"{name}.npz", arrays)
    args = dict(axis=axis, momentum=momentum, epsilon=epsilon, renorm=renorm, virtual_batch_size=virtual_batch_size)
    if renorm:
        args |= dict(renorm_momentum=renorm_momentum, clipping_keys=sorted(clip_vars))
    return {"name": name, "file": f"{name}.npz", "steps": steps, "shape": list(shape), "args": args}


def main() -> int:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    cases = [
        # clipping tight at first (r in [1, 1], d in [0, 0]: plain batch norm), relaxing to the paper's 3 and 5
        run_case("renorm_clip_relax", shape=(16, 5), steps=12, seed=11, renorm=True,
                 clipping={"rmin": (1.0, 1 / 3), "rmax": (1.0, 3.0), "dmax": (0.0, 5.0)}),
        # channels-last images, clipping active the whole time (only rmax and dmax, as most setups)
        run_case("renorm_nhwc_rmax_dmax", shape=(6, 3, 3, 4), steps=8, seed=12, renorm=True,
                 clipping={"rmax": (1.2, 1.5), "dmax": (0.1, 0.4)}),
        # fixed clipping, active throughout (what a layer config holds)
        run_case("renorm_fixed_clip", shape=(8, 2, 3), steps=8, seed=17, renorm=True,
                 clipping={"rmin": (0.8, 0.8), "rmax": (1.25, 1.25), "dmax": (0.25, 0.25)}),
        # no clipping at all
        run_case("renorm_unclipped", shape=(10, 3), steps=6, seed=13, renorm=True, renorm_momentum=0.5),
        # virtual batches: 12 samples as 3 ghost batches of 4 (interleaved: sample i is in ghost batch i % 3)
        run_case("virtual_nhwc", shape=(12, 2, 2, 3), steps=6, seed=14, virtual_batch_size=4),
        run_case("virtual_channels_first", shape=(8, 3, 5), steps=5, seed=15, axis=1, virtual_batch_size=2),
        # both
        run_case("renorm_virtual", shape=(12, 4), steps=8, seed=16, renorm=True, virtual_batch_size=3,
                 clipping={"rmax": (1.0, 2.0), "dmax": (0.0, 1.0)}),
    ]
    index = {"generator": "scripts/make_golden_tf_keras.py", "tf_keras": tf_keras.__version__,
             "tensorflow": tf.__version__, "cases": cases}
    (GOLDEN_DIR / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"wrote {len(cases)} cases to {GOLDEN_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
