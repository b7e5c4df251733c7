"""numba.cuda kernels over the canonical view (see normsvc.plan), and the device-array plumbing.

Imported lazily by :mod:`normsvc.ops` (``import normsvc`` never imports
numba.cuda).  The view ``x[A, B, C, D, E]`` has statistics per group
``(a, c)`` reduced over ``b, d, e`` (F = D*E), affine tables per ``(c, d)``.
Kernels know nothing of norms, layers or stores: only views.  Three launch
plans cover every norm and layout, one module each:

* **fused** (1 launch, :mod:`.fused`): a group of at most ``PER * MAX_TEAM``
  elements is owned by one team of threads, which loads it into registers,
  reduces it and normalizes it from the registers: x is read once and y
  written once.  Layer/RMS norm, and instance/group norm channels-first at
  moderate sizes, take this path.
* **rows** (2 launches, :mod:`.rows`): large groups whose elements come in
  runs of F >= 32 (channels-first batch/group norm, long rows).  Moments:
  grid (group, split), each block reduces a slice of runs and adds its sums
  into the group's float64 accumulator; the last block of a group (atomic
  counter) finishes it.  Apply: the same grid, one scale/shift per run of E
  elements.
* **columns** (2 launches, :mod:`.columns`): groups made of many short runs
  (F < 32, the channels-last norms).  Threads own columns of the
  [A, B, C*F] slab and walk rows, so every warp reads whole rows; partial
  sums meet as in rows.

Finishing a group (in whichever block finishes it, :mod:`.group`) writes the
moments (mean, m2) and the apply parameters (mean split into hi + lo parts,
and p = rsqrt(var + eps)) into one small float64 buffer, so the apply pass
needs no host round trip; the moments reach the host in one copy at the end.

Numerics: each group's sums are shifted by its first element, as on the CPU,
and accumulated in float64: each value is widened to float64 before the
shift, so the shifted values are exact (formed in float32, ``x - k0`` rounds
whenever x and k0 differ by more than a factor of two, and the mean of a
row of float32 noise around 0 was off by ~1e-7 of its spread, which the
elements near the mean then carry into y).  On an H100 float64 adds run at
half the float32 rate, far above what a memory-bound pass needs (4 float64
operations per 4 bytes read).  The apply pass computes
``((x - mean_hi) - mean_lo) * (p * gamma) + beta`` in the compute type: with
mean_hi the mean rounded to it, ``x - mean_hi`` is exact where it matters
(|mean| >> std), so float32 output keeps ~1e-7 relative accuracy there too.
Partial sums meet through float64 atomics, so the rows/columns paths are
reproducible to float64 round-off, not bit for bit (the fused path is).

Launches go to the legacy default stream, which orders them with work on
PyTorch's and CuPy's default streams (work on other streams: synchronize
first).  Device memory lives on numba's current device (device 0 unless
``numba.cuda.select_device`` says otherwise): inputs on another GPU are not
supported yet.  Each kernel compiles on first use per input dtype (about a
second each on an H100); ``NORMSVC_CUDA_FASTLAUNCH=0`` turns off the direct
launch path (see :class:`.launcher.Launcher`) if a numba-cuda upgrade breaks it.

The package's modules: :mod:`.tuning` (block sizes, thresholds),
:mod:`.device` (availability, inputs), :mod:`.layout` (copies into and out of
view order), :mod:`.group` (device functions shared by the plans), the three
plans, :mod:`.launcher` (launching), :mod:`.pools` (buffers kept between
calls) and :mod:`.launch` (plan choice, the normalize and moments drivers).
"""

from __future__ import annotations

import os

from .tuning import (  # noqa: F401  (the old module's constants, read by bench/cuda.py)
    BLOCK_ELEMS,
    FUSED_BLOCK,
    MAX_ROW_CHUNKS,
    MAX_TEAM,
    MIN_RUN,
    PER,
    SHUFFLE,
    SIM,
    TPB,
)

# Switches read at call time from this package (set them here, on the package).
#: Set NORMSVC_CUDA_FASTLAUNCH=0 to launch through the numba dispatcher every time.
FAST_LAUNCH = not SIM and os.environ.get("NORMSVC_CUDA_FASTLAUNCH", "1") != "0"
#: Tests set this to "fused", "rows" or "columns" to run one plan wherever it applies.
FORCE_PATH = None

from .device import DeviceInput, available, host, require, to_host, wrap  # noqa: E402
from .launch import moments, normalize  # noqa: E402
from .launch import path as _path  # noqa: E402,F401  (tests and bench/cuda.py)
from .launcher import Launcher as _Launcher  # noqa: E402,F401  (tests and bench/cuda.py)

__all__ = [
    "available",
    "require",
    "DeviceInput",
    "wrap",
    "host",
    "to_host",
    "normalize",
    "moments",
    "SIM",
]
