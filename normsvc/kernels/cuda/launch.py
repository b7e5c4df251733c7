"""Choosing a launch plan for a view, and the two drivers: normalize and moments."""

from __future__ import annotations

import sys
import threading

import numpy as np
from numba import cuda

from . import columns, fused, rows
from .device import DeviceInput
from .layout import from_view, new_output, shaped, to_view
from .pools import results, scratch, tables
from .tuning import MAX_TEAM, MIN_RUN, PER, TPB

# FORCE_PATH is a switch on the package (tests and bench/cuda.py set it
# there), so path() reads it from the package at each call.
_package = sys.modules[__package__]
_F64 = np.dtype(np.float64)
_KERNELS: dict = {}
_lock = threading.Lock()


def path(view: tuple) -> str:
    """"fused", "rows" or "columns": the plan for ``view`` (or the package's FORCE_PATH where it applies)."""
    A, B, C, D, E = view
    F = D * E
    force = _package.FORCE_PATH
    if force is not None and (force != "columns" or F <= TPB):
        if force != "fused" or B * F <= PER * MAX_TEAM:
            return force
    if B * F <= PER * MAX_TEAM and (B == 1 or F >= MIN_RUN):
        return "fused"
    if F >= MIN_RUN or B == 1:
        return "rows"
    return "columns"


def _compute_dtype(dtype) -> np.dtype:
    """float32 for float16/bfloat16/float32 data, float64 for float64."""
    return _F64 if np.dtype(dtype) == _F64 else np.dtype(np.float32)


def _kernels(xin: DeviceInput):
    """(compute type, every plan's launchers for it) for ``xin``'s data, built on first use (each
    compiles on its first launch); bfloat16 data get kernels of their own (see group.codec)."""
    ct = _compute_dtype(xin.dtype)
    key = (ct, xin.bf16)
    k = _KERNELS.get(key)
    if k is None:
        with _lock:
            k = _KERNELS.get(key)
            if k is None:
                k = _KERNELS[key] = {**fused.build(ct.type, xin.bf16), **rows.build(ct.type, xin.bf16),
                                     **columns.build(ct.type, xin.bf16)}
    return ct, k


def _moments_pass(K, key, x1, out, view, eps: float, rms: int) -> str:
    """Launch the moments pass of the rows or columns plan (the fused plan's groups go by rows); returns it."""
    if path(view) == "columns":
        columns.moments(K, key, x1, scratch, out, view, eps, rms)
        return "columns"
    rows.moments(K, key, x1, scratch, out, view, eps, rms)
    return "rows"


def _apply_pass(K, key, x1, gh, out, y1, view, plan_path: str) -> None:
    if plan_path == "columns":
        columns.apply(K, key, x1, gh, out, y1, view)
    else:
        rows.apply(K, key, x1, gh, out, y1, view)


def _host_params(mu: np.ndarray, var: np.ndarray, eps: float, rms: bool, ct) -> np.ndarray:
    """The float64 buffer finish() would write, from host statistics (inference mode)."""
    mu = np.asarray(mu, np.float64).ravel()
    var = np.asarray(var, np.float64).ravel()
    AC = mu.size
    buf = np.zeros(5 * AC)
    with np.errstate(divide="ignore", invalid="ignore"):
        if rms:
            mc = np.zeros(AC)
            p = 1.0 / np.sqrt(var + mu * mu + eps)
        else:
            mc = mu
            p = 1.0 / np.sqrt(var + eps)
    hi = mc.astype(ct).astype(np.float64)
    prm = buf[2 * AC :].reshape(AC, 3)
    prm[:, 0] = hi
    prm[:, 1] = mc - hi
    prm[:, 2] = p
    return buf


def normalize(xin: DeviceInput, plan, g: np.ndarray, h: np.ndarray, *, eps: float, rms: bool = False,
              stats=None):
    """Normalize on the GPU over ``plan``; returns (y, (mean, m2) or None).

    g, h: float64 (C, D) affine tables.  ``stats`` = (mean, var) float64
    (A, C) tables for inference mode, else the moments are computed and
    returned as host float64 (A, C) arrays.  y is the caller's array type
    (numpy for host inputs).
    """
    view = plan.view
    A, B, C, D, E = view
    AC = A * C
    ct, K = _kernels(xin)
    key = xin.storage.char
    x1 = to_view(xin, plan)
    gh = tables(g, h, ct)
    # y is written straight into the caller's array where the view is its own layout
    direct = xin.kind != "host" and plan.perm is None
    if direct:
        y, y1 = new_output(xin)
    else:
        y, y1 = None, cuda.device_array(xin.size, xin.storage)
    rms_i = 1 if rms else 0
    if stats is None:
        pair = results.take(5 * AC)
        out = pair[0]
        if path(view) == "fused":
            fused.launch(K, key, x1, gh, out, y1, view, float(eps), rms_i)
        else:
            used = _moments_pass(K, key, x1, out, view, float(eps), rms_i)
            _apply_pass(K, key, x1, gh, out, y1, view, used)
    else:
        out = cuda.to_device(_host_params(stats[0], stats[1], eps, rms, ct))
        _apply_pass(K, key, x1, gh, out, y1, view, path(view))
    y = shaped(xin, y) if direct else from_view(xin, plan, y1)
    if stats is not None:
        return y, None
    return y, results.moments(5 * AC, pair, A, C)


def moments(xin: DeviceInput, plan):
    """Per-(a, c) mean and m2 (host float64, shape (A, C)) over the plan's view."""
    view = plan.view
    A, B, C, D, E = view
    _, K = _kernels(xin)
    x1 = to_view(xin, plan)
    pair = results.take(5 * A * C)
    _moments_pass(K, xin.storage.char, x1, pair[0], view, 0.0, 0)
    return results.moments(5 * A * C, pair, A, C)
