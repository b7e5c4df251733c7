"""Whether a GPU is usable, and the inputs that reach the kernels: CUDA arrays, or host arrays bound for one."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

_AVAILABLE = None


def available() -> bool:
    """Whether numba.cuda sees a usable GPU (or the simulator is on)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            _AVAILABLE = bool(cuda.is_available())
        except Exception:
            _AVAILABLE = False
    return _AVAILABLE


def require(what: str = "device='cuda'") -> None:
    """Raise RuntimeError naming the problem when no usable GPU is present."""
    if available():
        return
    reason = ""
    try:
        err = cuda.cuda_error()
        reason = " (" + " ".join(str(err).split()) + ")" if err else ""
    except Exception:
        pass
    raise RuntimeError(
        f"{what} needs a usable CUDA GPU, but numba.cuda found none{reason}: "
        "check the NVIDIA driver and that the numba-cuda package is installed, "
        "or use device='cpu'"
    )


def is_device_ndarray(obj) -> bool:
    return bool(getattr(obj, "__cuda_ndarray__", False))


class DeviceInput:
    """A validated CUDA (or host-to-CUDA) input: what ops needs to plan, and how to answer.

    ``kind`` is "numba", "torch", "cupy" (y comes back as that type) or "host"
    (a numpy array normalized on the GPU because device="cuda"; y comes back
    as numpy).  ``arr`` is the numba device array (None for host inputs).
    """

    __slots__ = ("obj", "arr", "kind", "shape", "ndim", "dtype", "size")

    def __init__(self, obj, arr, kind, shape, dtype):
        self.obj, self.arr, self.kind = obj, arr, kind
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)
        self.size = math.prod(self.shape)


def wrap(obj) -> DeviceInput:
    """Wrap a CUDA array (numba device array or anything with __cuda_array_interface__), zero-copy."""
    require("a CUDA array input")
    if is_device_ndarray(obj):
        arr, kind = obj, "numba"
    else:
        mod = type(obj).__module__.split(".")[0]
        kind = mod if mod in ("torch", "cupy") else "numba"
        # The producer's stream is not waited on: launches go to the legacy
        # default stream, which orders with torch's and CuPy's default streams.
        arr = cuda.as_cuda_array(obj, sync=False)
    return DeviceInput(obj, arr, kind, arr.shape, arr.dtype)


def host(x: np.ndarray) -> DeviceInput:
    """A host array to normalize on the GPU (device='cuda')."""
    require()
    return DeviceInput(x, None, "host", x.shape, x.dtype)


def to_host(obj) -> np.ndarray:
    """A small CUDA array (gamma, beta, statistics) copied to the host."""
    if not is_device_ndarray(obj):
        obj = cuda.as_cuda_array(obj, sync=False)
    return obj.copy_to_host()
