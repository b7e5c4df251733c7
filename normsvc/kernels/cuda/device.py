"""Whether a GPU is usable, and the inputs that reach the kernels: CUDA arrays, or host arrays bound for one."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda

from ... import dtypes
from ...errors import InvalidType

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


#: The array-interface type string of bfloat16 (torch's, and ml_dtypes' ``dtype.str``).
_BF16_TYPESTR = "<V2"


class _Interface:
    """``obj``'s array interface, read once (torch builds it anew at every read); a bfloat16 array's
    presented as its uint16 bits (numba has no bfloat16 arrays): zero-copy either way."""

    __slots__ = ("__cuda_array_interface__", "owner", "bf16")

    def __init__(self, owner):
        self.owner = owner  # keeps the memory alive as long as the view
        iface = owner.__cuda_array_interface__
        self.bf16 = iface.get("typestr") == _BF16_TYPESTR
        self.__cuda_array_interface__ = dict(iface, typestr="<u2") if self.bf16 else iface


def device_array_of(obj):
    """(a numba device array over ``obj``'s memory, zero-copy; whether it holds bfloat16 bits)."""
    iface = _Interface(obj)
    # The producer's stream is not waited on: launches go to the legacy
    # default stream, which orders with torch's and CuPy's default streams.
    return cuda.as_cuda_array(iface, sync=False), iface.bf16


def storage(dtype: np.dtype) -> np.dtype:
    """The dtype the kernels see for data of ``dtype``: bfloat16 as uint16 bits, the rest as is."""
    return np.dtype(np.uint16) if dtype.name == "bfloat16" else dtype


class DeviceInput:
    """A validated CUDA (or host-to-CUDA) input: what ops needs to plan, and how to answer.

    ``kind`` is "numba", "torch", "cupy" (y comes back as that type) or "host"
    (a numpy array normalized on the GPU because device="cuda"; y comes back
    as numpy).  ``arr`` is the numba device array (None for host inputs), of
    dtype ``storage`` (uint16 bits for bfloat16 data, else ``dtype``).
    """

    __slots__ = ("obj", "arr", "kind", "shape", "ndim", "dtype", "storage", "size")

    def __init__(self, obj, arr, kind, shape, dtype):
        self.obj, self.arr, self.kind = obj, arr, kind
        self.shape = tuple(int(s) for s in shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(dtype)
        self.storage = storage(self.dtype)
        self.size = math.prod(self.shape)

    @property
    def bf16(self) -> bool:
        return self.storage != self.dtype


def wrap(obj) -> DeviceInput:
    """Wrap a CUDA array (numba device array or anything with __cuda_array_interface__), zero-copy."""
    require("a CUDA array input")
    if is_device_ndarray(obj):
        return DeviceInput(obj, obj, "numba", obj.shape, obj.dtype)
    mod = type(obj).__module__.split(".")[0]
    kind = mod if mod in ("torch", "cupy") else "numba"
    arr, bf16 = device_array_of(obj)
    dtype = dtypes.bfloat16() if bf16 else arr.dtype
    if kind == "numba" and bf16:
        raise InvalidType(f"x is a bfloat16 CUDA array of type {type(obj).__name__}: expected a torch or CuPy "
                          "array (y comes back as the input's type, which numba cannot make for bfloat16)",
                          field="x")
    return DeviceInput(obj, arr, kind, arr.shape, dtype)


def host(x: np.ndarray) -> DeviceInput:
    """A host array to normalize on the GPU (device='cuda')."""
    require()
    return DeviceInput(x, None, "host", x.shape, x.dtype)


def to_host(obj) -> np.ndarray:
    """A small CUDA array (gamma, beta, statistics) copied to the host."""
    if not is_device_ndarray(obj):
        obj = cuda.as_cuda_array(obj, sync=False)
    return obj.copy_to_host()
