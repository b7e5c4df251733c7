"""Protobuf wire format for the one large field of a Normalize call: a copy each way, not three.

upb (Python protobuf) copies a bytes field into its arena when it is set,
again when the message is serialized, and again when it is read back as a
Python ``bytes``; for a 4 MiB tensor those copies cost the client more than
the transport does.  So the client writes a NormalizeRequest as the
upb-serialized small fields followed by the ``x`` field written here (a
message's fields may come in any order, each once), and reads ``y`` straight
out of the received bytes.  Anything unexpected in a response falls back to
upb.  The server answers Normalize the same way (``NormServicer.Normalize``
returns the response bytes with ``y`` written here).

Examples
--------
>>> import numpy as np
>>> from normsvc._proto import normsvc_pb2 as pb
>>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> raw = with_tensor(pb.NormalizeRequest(layer="bn").SerializeToString(), 2, x, pb.DTYPE_FLOAT32)
>>> msg = pb.NormalizeRequest.FromString(raw)
>>> msg.layer, list(msg.x.shape), len(msg.x.data)
('bn', [2, 3], 24)
"""

from __future__ import annotations

import math

import numpy as np

from .._proto import normsvc_pb2 as pb
from .tensors import DTYPES, decode

__all__ = ["varint", "read_varint", "with_tensor", "normalize_response", "normalize_y"]

_LEN = 2  # wire type of length-delimited fields
_VARINT = 0


def varint(n: int) -> bytes:
    """A non-negative int as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def with_tensor(message: bytes, number: int, array: np.ndarray, dtype: int) -> bytes:
    """``message`` (serialized, without field ``number``) plus ``array`` as Tensor field ``number``.

    ``array`` must already have the element type ``dtype`` names, little-endian.
    """
    data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # bytes of any element type
    shape = b"".join(varint(int(s)) for s in array.shape)
    head = bytes([1 << 3 | _VARINT]) + varint(dtype)
    if shape:
        head += bytes([2 << 3 | _LEN]) + varint(len(shape)) + shape
    if len(data):
        head += bytes([3 << 3 | _LEN]) + varint(len(data))
    return b"".join([message, varint(number << 3 | _LEN), varint(len(head) + len(data)), head, data])


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at ``buf[pos]``; ValueError when the bytes end
    inside it or it runs past the 10 bytes of a 64-bit value."""
    result = shift = 0
    while pos < len(buf) and shift < 70:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("truncated varint")


def _fields(buf: bytes, pos: int, end: int):
    """(number, wire type, value or start, end) for each field in ``buf[pos:end]``."""
    while pos < end:
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = read_varint(buf, pos)
            yield number, wire, value, pos
        elif wire == _LEN:
            n, pos = read_varint(buf, pos)
            yield number, wire, pos, pos + n
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")


def _tensor(buf: bytes, start: int, end: int) -> np.ndarray | None:
    """The array a Tensor message at ``buf[start:end]`` holds (a copy you may modify), or None."""
    dtype, shape, data = 0, [], (start, start)
    for number, wire, a, b in _fields(buf, start, end):
        if number == 1 and wire == _VARINT:
            dtype = a
        elif number == 2 and wire == _LEN:
            pos = a
            while pos < b:
                size, pos = read_varint(buf, pos)
                shape.append(size)
        elif number == 2 and wire == _VARINT:
            shape.append(a)
        elif number == 3 and wire == _LEN:
            data = (a, b)
    np_dtype = DTYPES.get(dtype)
    count = math.prod(shape)
    if np_dtype is None or data[1] - data[0] != count * np_dtype.itemsize:
        return None
    return np.frombuffer(buf, dtype=np_dtype, count=count, offset=data[0]).reshape(shape).copy()


def normalize_response(raw: bytes) -> tuple[np.ndarray, pb.Moments | None]:
    """``y`` and ``batch_moments`` (a message, or None when absent) of a serialized NormalizeResponse.

    The client's response deserializer.  The small moments are parsed by upb
    from their own slice of the bytes; only y's bytes are read here.
    """
    try:
        spans = {1: [], 2: []}
        for number, wire, a, b in _fields(raw, 0, len(raw)):
            if number in spans and wire == _LEN:
                spans[number].append((a, b))
        y = _tensor(raw, *spans[1][0]) if len(spans[1]) == 1 and len(spans[2]) <= 1 else None
    except (ValueError, IndexError):
        y = None
    if y is None:  # not the layout this module writes and reads: let upb parse it
        msg = pb.NormalizeResponse.FromString(raw)
        y = np.array(decode(msg.y, field="y", finite=False))
        return y, (msg.batch_moments if msg.HasField("batch_moments") else None)
    moments = pb.Moments.FromString(raw[slice(*spans[2][0])]) if spans[2] else None
    return y, moments


def normalize_y(raw: bytes) -> np.ndarray:
    """``y`` of a serialized NormalizeResponse."""
    return normalize_response(raw)[0]
