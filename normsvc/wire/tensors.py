"""numpy arrays and Moments <-> the ``normsvc.v1`` Tensor and Moments messages.

A Tensor is ``dtype`` + ``shape`` + ``data``: prod(shape) elements,
little-endian, C order.  Decoding validates all three and, by default, that
every element is finite, so a bad message fails here with a message naming
the field, before it reaches a kernel or the store.  Shared by the server and
the client; it imports nothing from either.

Examples
--------
>>> import numpy as np
>>> t = encode(np.array([[1.0, 2.0]], dtype=np.float32))
>>> t.shape, len(t.data)
([1, 2], 8)
>>> decode(t, field="x")
array([[1., 2.]], dtype=float32)
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .. import dtypes
from .._proto import normsvc_pb2 as pb
from ..errors import InvalidTensor, InvalidType, TensorTooLarge
from ..moments import Moments

__all__ = [
    "tensor_error",
    "BFLOAT16",
    "DTYPES",
    "DTYPE_CODES",
    "encode",
    "decode",
    "decode_header",
    "check_finite",
    "encode_moments",
    "decode_moments",
    "chunks",
    "Assembler",
]

#: numpy's bfloat16 (ml_dtypes': what torch.bfloat16 tensors are viewed as)
BFLOAT16 = dtypes.bfloat16()
#: proto DType -> little-endian numpy dtype
DTYPES = {
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_BFLOAT16: BFLOAT16,
}
#: little-endian numpy dtype -> proto DType
DTYPE_CODES = {dt: code for code, dt in DTYPES.items()}
_NAMES = ", ".join(pb.DType.Name(code) for code in DTYPES)


def tensor_error(field: str, description: str, cls=InvalidTensor):
    """The error for a Tensor or Moments message that does not describe a valid array.

    ``field`` is the path of the offending field (``updates[2].moments.mean``),
    ``description`` what was wrong and what was expected.
    """
    err = cls(f"{field}: {description}", field=field)
    err.description = description
    return err


def encode(array, out: pb.Tensor | None = None) -> pb.Tensor:
    """A Tensor message holding ``array`` (float16/32/64, bfloat16; other types are refused)."""
    a = np.asarray(array)
    code = DTYPE_CODES.get(a.dtype.newbyteorder("<")) if a.dtype.kind in "fV" else None
    if code is None:
        raise InvalidType(f"cannot encode dtype {a.dtype}: expected {dtypes.NAMES}", field="dtype")
    a = np.asarray(a, dtype=DTYPES[code], order="C")  # (ascontiguousarray would make scalars 1-D)
    t = pb.Tensor() if out is None else out
    t.dtype = code
    t.shape[:] = a.shape
    t.data = a.tobytes()
    return t


def decode_header(dtype: int, shape, *, field: str, max_elements: int | None = None):
    """Validate a dtype code and a shape; return ``(numpy dtype, shape tuple, nbytes)``."""
    np_dtype = DTYPES.get(dtype)
    if np_dtype is None:
        name = pb.DType.Name(dtype) if dtype in pb.DType.values() else str(dtype)
        raise tensor_error(f"{field}.dtype", f"is {name}: expected one of {_NAMES}")
    shape = tuple(shape)  # proto int64s: Python ints already
    if shape and min(shape) < 0:
        raise tensor_error(f"{field}.shape", f"is {list(shape)}: expected sizes >= 0")
    n = math.prod(shape)
    if max_elements is not None and n > max_elements:
        raise tensor_error(
            f"{field}.shape", f"{list(shape)} has {n} elements: expected at most {max_elements}",
            TensorTooLarge,
        )
    return np_dtype, shape, n * np_dtype.itemsize


def decode(t: pb.Tensor, *, field: str, max_elements: int | None = None,
           finite: bool = True, data=None) -> np.ndarray:
    """The read-only numpy array a Tensor message holds (no copy: a view of the message's bytes).

    Parameters
    ----------
    t : Tensor message
    field : str
        Path of ``t`` in its request, for error messages.
    max_elements : int, optional
        Larger tensors raise :class:`~normsvc.errors.TensorTooLarge`.
    finite : bool
        Whether NaN and Inf are errors.
    data : bytes-like, optional
        The bytes, when they did not travel in ``t.data`` (streams).
    """
    np_dtype, shape, nbytes = decode_header(t.dtype, t.shape, field=field, max_elements=max_elements)
    data = t.data if data is None else data
    if len(data) != nbytes:
        raise tensor_error(
            f"{field}.data",
            f"has {len(data)} bytes: expected {nbytes} ({math.prod(shape)} x {np_dtype.name} "
            f"for shape {list(shape)})",
        )
    a = np.frombuffer(data, dtype=np_dtype).reshape(shape)
    if finite:
        check_finite(a, field)
    return a


def check_finite(a: np.ndarray, field: str) -> None:
    """InvalidTensor naming ``field.data`` unless every element of ``a`` is finite."""
    # one reduction in a's own dtype (a float64 accumulator would convert every
    # element) and one scalar test; a sum of finite values that overflows is told apart below
    if a.size and not math.isfinite(np.add.reduce(a, axis=None)):
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise tensor_error(f"{field}.data", f"has {bad} NaN or Inf values: expected finite numbers")


def encode_moments(m: Moments, out: pb.Moments | None = None) -> pb.Moments:
    """A Moments message: count, mean and biased variance as float64 tensors."""
    msg = pb.Moments() if out is None else out
    encode(np.asarray(m.count, dtype=np.float64), msg.count)
    encode(np.asarray(m.mean, dtype=np.float64), msg.mean)
    encode(np.asarray(m.variance, dtype=np.float64), msg.variance)
    return msg


@njit(cache=True, nogil=False)
def _valid_m2(count, mean, variance, m2):  # pragma: no cover - compiled
    """m2 = variance * count (count: one value or one per element); False unless every mean is
    finite and every count and variance finite and >= 0."""
    if count.size == 1 and not 0.0 <= count[0] < math.inf:
        return False
    per = count.size > 1
    for i in range(mean.size):
        c = count[i] if per else count[0]
        v = variance[i]
        if not (math.isfinite(mean[i]) and 0.0 <= c < math.inf and 0.0 <= v < math.inf):
            return False
        m2[i] = v * c
    return True


def decode_moments(msg: pb.Moments, *, field: str, max_elements: int | None = None, owned: bool = False) -> Moments:
    """Validated :class:`Moments` from a message: finite, count >= 0, variance >= 0, shapes agree.

    This is the one check of a pushed message: the Moments are built without
    repeating it (the store still checks what it needs of any Moments, such as
    a positive count and the layer's shape).  Their arrays may be read-only
    views of the message's bytes, unless ``owned``: then they are arrays the
    caller owns and may write (what a client hands its user).
    """
    moments = _decode_moments(msg, field, max_elements)
    if owned:
        count, mean, m2 = (a if a.flags.writeable else a.copy() for a in (moments.count, moments.mean, moments.m2))
        moments = Moments._checked(count, mean, m2)
    return moments


def _decode_moments(msg: pb.Moments, field: str, max_elements: int | None) -> Moments:
    for part in ("count", "mean", "variance"):
        if not msg.HasField(part):
            raise tensor_error(f"{field}.{part}", "is missing: expected a tensor")
    count = decode(msg.count, field=f"{field}.count", max_elements=max_elements, finite=False)
    mean = decode(msg.mean, field=f"{field}.mean", max_elements=max_elements, finite=False)
    variance = decode(msg.variance, field=f"{field}.variance", max_elements=max_elements, finite=False)
    if variance.shape != mean.shape:
        raise tensor_error(
            f"{field}.variance", f"has shape {list(variance.shape)}: expected the mean's {list(mean.shape)}"
        )
    if count.ndim and count.shape != mean.shape:
        raise tensor_error(
            f"{field}.count",
            f"has shape {list(count.shape)}: expected a scalar or the mean's {list(mean.shape)}",
        )
    if count.dtype == mean.dtype == variance.dtype == np.float64:
        # the hot path: every check and m2 in one compiled pass; on failure the checks below say what is wrong
        m2 = np.empty(mean.shape)
        if _valid_m2(count.reshape(-1), mean.reshape(-1), variance.reshape(-1), m2.reshape(-1)):
            return Moments._checked(count, mean, m2)
    check_finite(mean, f"{field}.mean")
    for name, a in (("count", count), ("variance", variance)):
        # min >= 0 and max < inf: False for NaN, -x and Inf alike
        if a.size and not (a.min() >= 0 and a.max() < math.inf):
            check_finite(a, f"{field}.{name}")
            what = "counts" if name == "count" else "variances"
            raise tensor_error(f"{field}.{name}", f"has negative entries: expected {what} >= 0")
    count, mean, variance = (a if a.dtype == np.float64 else a.astype(np.float64) for a in (count, mean, variance))
    return Moments._checked(count, mean, variance * count)


def chunks(array: np.ndarray, size: int):
    """The bytes of ``array`` (little-endian, C order) in pieces of at most ``size`` bytes."""
    a = np.asarray(array)
    a = np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")
    data = memoryview(a.reshape(-1).view(np.uint8))  # bytes of any element type (bfloat16 has no buffer format)
    for start in range(0, len(data), size):
        yield bytes(data[start:start + size])


class Assembler:
    """Collects a tensor sent in chunks (NormalizeStream) into one buffer.

    The header (dtype, shape) is validated up front, so an oversized tensor is
    refused before its bytes arrive, and nothing is allocated until the first
    chunk: the caller can reserve ``nbytes`` in between (the server's
    :class:`~normsvc.server.limits.StreamBudget`).  The buffer is then
    allocated whole but uninitialized, so the process's memory grows with the
    bytes that arrive, not with what the header announced, and the assembled
    array is a view of it (no copy, no reallocation).
    """

    def __init__(self, dtype: int, shape, *, field: str, max_elements: int | None = None):
        self.dtype_code = dtype
        self.dtype, self.shape, self.nbytes = decode_header(dtype, shape, field=field, max_elements=max_elements)
        self.field = field
        self._buf = None
        self._filled = 0

    def add(self, chunk: bytes) -> None:
        end = self._filled + len(chunk)
        if end > self.nbytes:
            raise tensor_error(
                f"{self.field}.data",
                f"chunks carry more than the {self.nbytes} bytes of shape {list(self.shape)} x {self.dtype.name}",
            )
        if self._buf is None:
            self._buf = np.empty(self.nbytes, dtype=np.uint8)
        self._buf[self._filled:end] = np.frombuffer(chunk, dtype=np.uint8)
        self._filled = end

    def array(self, *, finite: bool = True) -> np.ndarray:
        """The assembled array (raises InvalidTensor when bytes are missing)."""
        if self._filled != self.nbytes:
            raise tensor_error(
                f"{self.field}.data",
                f"chunks carried {self._filled} bytes: expected {self.nbytes} for shape {list(self.shape)} "
                f"x {self.dtype.name}",
            )
        t = pb.Tensor(dtype=self.dtype_code, shape=self.shape)
        data = self._buf if self._buf is not None else b""
        return decode(t, field=self.field, finite=finite, data=data)
