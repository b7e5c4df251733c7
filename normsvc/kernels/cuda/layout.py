"""Moving data between the caller's layout and the plan's flat, C-contiguous view order.

The kernels only ever see 1-D C-contiguous arrays in view order (see
normsvc.plan).  A contiguous input already is one (a free reshape); a strided
or transposed one is gathered into a fresh array first, and y is scattered
back into the caller's shape and array type the same way.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from numba import cuda

from .device import DeviceInput, device_array_of
from .launcher import Launcher, grid
from .tuning import SIM, TPB


def _strides(arr) -> tuple:
    """Element strides of a device array; refuses negative strides."""
    item = arr.dtype.itemsize
    st = tuple(int(s) // item for s in arr.strides)
    if any(s < 0 for s in st):
        raise ValueError(
            f"x has negative strides {tuple(arr.strides)}: expected a device array with non-negative strides "
            "(make a contiguous copy first)"
        )
    return st


def _flat_base(arr, strides: tuple):
    """A 1-D view over the memory a strided device array spans (from its first element)."""
    extent = 1 + sum((s - 1) * st for s, st in zip(arr.shape, strides))
    item = arr.dtype.itemsize
    if SIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        base = np.lib.stride_tricks.as_strided(arr._ary, (extent,), (item,))
        return FakeCUDAArray(base)
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray((extent,), (item,), arr.dtype, gpu_data=arr.gpu_data)


def _expanded_strides(shape: tuple, strides: tuple, expanded: tuple) -> list:
    """Strides of ``expanded`` (``shape`` with one axis split in two) for an array with ``strides``."""
    out, i = [], 0
    j = 0
    while j < len(expanded):
        if i < len(shape) and expanded[j] == shape[i]:
            out.append(strides[i])
            i += 1
            j += 1
        elif expanded[j] == 1:
            out.append(0)
            j += 1
        else:
            out.append(strides[i] * expanded[j + 1])
            out.append(strides[i])
            i += 1
            j += 2
    return out


def _c_strides(shape) -> list:
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= s
    return st[::-1]


@cuda.jit
def _gather(src, dst, shape, sstr, dstr, n):
    """dst[offset_d(i)] = src[offset_s(i)] over the multi-index i of ``shape`` (strides in elements)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    nd = len(shape)
    while i < n:
        rem = i
        so = 0
        do = 0
        for k in range(nd - 1, -1, -1):
            q = rem // shape[k]
            idx = rem - q * shape[k]
            rem = q
            so += idx * sstr[k]
            do += idx * dstr[k]
        dst[do] = src[so]
        i += step


_gather_launch = Launcher(_gather)


def _copy(src_flat, dst_flat, shape, sstr, dstr) -> None:
    n = math.prod(shape)
    if n == 0:
        return
    shape, sstr, dstr = tuple(int(s) for s in shape), tuple(int(s) for s in sstr), tuple(int(s) for s in dstr)
    blocks = min(-(-n // TPB), 4096)
    key = (src_flat.dtype.char, len(shape))
    _gather_launch(key, grid(blocks), grid(TPB), src_flat, dst_flat, shape, sstr, dstr, n)


def to_view(xin: DeviceInput, plan):
    """The input as a flat, C-contiguous device array in view order (a copy only if needed)."""
    if xin.kind == "host":
        return cuda.to_device(plan.to_view(xin.obj).reshape(-1).view(xin.storage))
    arr = xin.arr
    if plan.perm is None and arr.is_c_contiguous():
        return arr.reshape(xin.size)
    strides = _strides(arr)
    exp = plan.expanded
    est = _expanded_strides(xin.shape, strides, exp)
    perm = plan.perm if plan.perm is not None else tuple(range(len(exp)))
    shape = [exp[p] for p in perm]
    dst = cuda.device_array(xin.size, xin.storage)
    _copy(_flat_base(arr, strides), dst, shape, [est[p] for p in perm], _c_strides(shape))
    return dst


def new_output(xin: DeviceInput):
    """(y as the caller gets it, flat C-contiguous device array of y in the input's shape)."""
    if xin.kind == "torch":
        y = xin.obj.new_empty(xin.shape)
        return y, device_array_of(y.view(-1))[0]
    if xin.kind == "cupy":
        cp = sys.modules["cupy"]
        with xin.obj.device:
            y = cp.empty(xin.size, dtype=xin.dtype)
        return y.reshape(xin.shape), device_array_of(y)[0]
    y = cuda.device_array(xin.size, xin.storage)
    return y, y


def from_view(xin: DeviceInput, plan, yv):
    """Turn the view-ordered flat result ``yv`` into the caller's y."""
    if xin.kind == "host":
        return plan.from_view(yv.copy_to_host().view(xin.dtype).reshape(plan.view))
    y, flat = new_output(xin)
    perm = plan.perm
    shape = [plan.expanded[p] for p in perm]
    dst = _c_strides(plan.expanded)
    _copy(yv, flat, shape, _c_strides(shape), [dst[p] for p in perm])
    return shaped(xin, y)


def shaped(xin: DeviceInput, y):
    """y written straight into the caller's (flat) output, in the input's shape."""
    if xin.kind == "numba":
        return y.reshape(xin.shape)
    return y
