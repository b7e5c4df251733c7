"""Requests the server cannot parse: INVALID_ARGUMENT that names the field at fault.

grpc answers INTERNAL ("Exception deserializing request!") when a request
deserializer raises, before any interceptor sees the call.  :func:`serve`
therefore registers NormService with :func:`tolerant` deserializers: they
answer an :class:`Undecodable` in place of the message, and the errors
interceptor reports it (:func:`raise_if_undecodable`, :func:`checked`) as
INVALID_ARGUMENT, reason ``MALFORMED_REQUEST``, with the path of the field
whose bytes do not parse (``updates[2].moments.mean``) when it can be told.

>>> from normsvc._proto import normsvc_pb2 as pb
>>> parse = tolerant(pb.GetLayerRequest)
>>> parse(pb.GetLayerRequest(names=["a"]).SerializeToString())
names: "a"
<BLANKLINE>
>>> parse(b"\\x0a\\x05ab").error.field
'names[0]'
"""

from __future__ import annotations

from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from ..errors import InvalidArgument
from ..wire.framing import read_varint

__all__ = ["Undecodable", "tolerant", "raise_if_undecodable", "checked"]

_NOT_PACKED = (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES)


class Undecodable:
    """Stands in for a request message whose bytes did not parse; ``error`` reports it."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument):
        self.error = error


def _varint(data: bytes, pos: int):
    """(value, next position), or (None, pos) when the bytes end inside the varint."""
    try:
        return read_varint(data, pos)
    except ValueError:
        return None, pos


def culprit(data: bytes, descriptor, prefix: str = "") -> str | None:
    """The path of the first field of ``descriptor`` whose bytes in ``data`` do not parse,
    or None when no field can be blamed (say, the bytes end inside a field's tag)."""
    cls = message_factory.GetMessageClass(descriptor)
    seen: dict[int, int] = {}
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        tag, pos = _varint(data, pos)
        if tag is None:
            return None
        number, wire = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number)
        path = None
        if field is not None:
            path = prefix + field.name
            if field.is_repeated and not (wire == 2 and field.type not in _NOT_PACKED):
                index = seen.get(number, 0)
                seen[number] = index + 1
                path += f"[{index}]"
        if wire == 0:
            value, pos = _varint(data, pos)
            if value is None:
                return path
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if length is None or pos + length > end:
                return path
            body = data[pos:pos + length]
            pos += length
            if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                try:
                    message_factory.GetMessageClass(field.message_type).FromString(body)
                except DecodeError:
                    return culprit(body, field.message_type, path + ".") or path
        else:  # groups (3, 4) are not used by these messages; anything else is no wire type
            return path
        if pos > end:
            return path
        if field is not None:
            try:
                cls.FromString(data[start:pos])  # e.g. a string that is not UTF-8
            except DecodeError:
                return path
    return None


def _error(descriptor, data: bytes) -> InvalidArgument:
    path = culprit(data, descriptor)
    where = f": the bytes of field {path} are malformed" if path else ""
    return InvalidArgument(
        f"the request is not a valid {descriptor.full_name}{where} (expected the protobuf encoding of a "
        f"{descriptor.full_name} as declared in normsvc/v1/normsvc.proto)",
        field=path, reason="MALFORMED_REQUEST",
    )


def tolerant(message_cls):
    """A request deserializer for ``message_cls`` that answers :class:`Undecodable` instead of raising."""
    parse = message_cls.FromString
    descriptor = message_cls.DESCRIPTOR

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception:  # DecodeError, and whatever else a malformed message may raise
            return Undecodable(_error(descriptor, data))

    return deserialize


def raise_if_undecodable(request) -> None:
    """Raise the INVALID_ARGUMENT that stands for a request which did not parse."""
    if isinstance(request, Undecodable):
        raise request.error


def checked(request_iterator):
    """The messages of a request stream, raising at the first one that did not parse."""
    for request in request_iterator:
        if isinstance(request, Undecodable):
            raise request.error
        yield request
