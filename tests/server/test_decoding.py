"""normsvc.server.decoding: requests that do not parse are INVALID_ARGUMENT naming the field, not INTERNAL."""

from __future__ import annotations

import doctest

import grpc
import pytest
from server_util import pb, raises_code, rich_details

from normsvc.errors import InvalidArgument
from normsvc.server import decoding
from normsvc.server.decoding import Undecodable, checked, culprit, raise_if_undecodable, tolerant


def _len(field: int, body: bytes) -> bytes:
    """A length-delimited field (wire type 2) of a short body."""
    assert len(body) < 128
    return bytes([field << 3 | 2, len(body)]) + body


@pytest.mark.parametrize("method, data, field", [
    ("CreateLayer", b"\x0a\xff\xff\xff\xff\x0f\x01", "name"),           # a length past the end
    ("UpdateStats", b"\x0a\x04\x0a\x02\xc3\x28", "updates[0].layer"),  # a name that is not UTF-8
    ("GetLayer", b"\xff", None),                                         # ends inside a tag
])
def test_a_request_that_does_not_parse_is_invalid_argument(mstub, method, data, field):
    call = mstub.channel.unary_unary(f"/normsvc.v1.NormService/{method}")
    with raises_code(grpc.StatusCode.INVALID_ARGUMENT, f"not a valid normsvc.v1.{method}Request") as info:
        call(data, timeout=10)
    details = rich_details(info.value)
    assert details["ErrorInfo"].reason == "MALFORMED_REQUEST" and details["ErrorInfo"].domain == "normsvc"
    if field is None:
        assert "BadRequest" not in details
    else:
        assert details["BadRequest"].field_violations[0].field == field


def test_a_stream_message_that_does_not_parse_is_invalid_argument(mstub):
    call = mstub.channel.stream_stream("/normsvc.v1.NormService/NormalizeStream")
    with raises_code(grpc.StatusCode.INVALID_ARGUMENT, "NormalizeStreamRequest"):
        list(call(iter([b"\x0a\xff\xff\xff\xff\x0f\x01"]), timeout=10))


def test_tolerant_parses_good_bytes_and_blames_the_bad_field():
    parse = tolerant(pb.UpdateStatsRequest)
    good = pb.UpdateStatsRequest(updates=[pb.LayerMoments(layer="a"), pb.LayerMoments(layer="b")])
    assert parse(good.SerializeToString()) == good
    bad = good.SerializeToString() + b"\x0a\x04\x0a\x02\xc3\x28"
    result = parse(bad)
    assert isinstance(result, Undecodable) and result.error.field == "updates[2].layer"
    assert culprit(b"\x12\x03ab", pb.UpdateStatsRequest.DESCRIPTOR) == "request_id"  # length past the end
    assert culprit(good.SerializeToString(), pb.UpdateStatsRequest.DESCRIPTOR) is None


def test_tolerant_keeps_unknown_fields_of_a_newer_client():
    data = pb.GetLayerRequest(names=["a"]).SerializeToString() + b"\xa0\x06\x01"  # field 100 = 1
    assert tolerant(pb.GetLayerRequest)(data).names == ["a"]


def test_the_error_says_what_was_expected():
    error = tolerant(pb.GetLayerRequest)(_len(1, b"a") + b"\x0f").error  # names: wire type 7 does not exist
    assert type(error) is InvalidArgument
    assert (error.field, error.reason, error.code) == ("names[1]", "MALFORMED_REQUEST", "INVALID_ARGUMENT")
    assert error.message == (
        "the request is not a valid normsvc.v1.GetLayerRequest: the bytes of field names[1] are malformed "
        "(expected the protobuf encoding of a normsvc.v1.GetLayerRequest as declared in normsvc/v1/normsvc.proto)")
    unblamed = tolerant(pb.GetLayerRequest)(b"\xff").error
    assert unblamed.field is None and "the bytes of field" not in unblamed.message


# a Tensor whose packed shape ends inside a varint, inside Moments.mean, inside LayerMoments
_BAD_TENSOR = _len(2, b"\xff")
_BAD_ENTRY = _len(1, b"b") + _len(2, _len(2, _BAD_TENSOR))


@pytest.mark.parametrize("descriptor, data, path", [
    (pb.UpdateStatsRequest.DESCRIPTOR, _len(1, _len(1, b"a")) + _len(1, _BAD_ENTRY), "updates[1].moments.mean.shape"),
    (pb.GetLayerRequest.DESCRIPTOR, _len(1, b"a") + _len(1, b"b") + b"\x09abc", "names[2]"),  # fixed64 past the end
    (pb.GetLayerRequest.DESCRIPTOR, _len(1, b"a") + b"\x08\xff", "names[1]"),  # a varint that never ends
    (pb.GetLayerRequest.DESCRIPTOR, _len(1, b"a") + b"\xff\x07", None),  # field 127 (unknown), wire type 7
    (pb.Tensor.DESCRIPTOR, _len(2, b"\x01\x02") + b"\x12\x05\x01", "shape"),  # packed: no index
], ids=["nested", "fixed64", "varint", "unknown-field", "packed"])
def test_culprit_names_the_path_of_the_first_bad_field(descriptor, data, path):
    assert culprit(data, descriptor) == path


def test_checked_yields_messages_until_the_first_that_did_not_parse():
    bad = tolerant(pb.NormalizeStreamRequest)(b"\x0a\xff\xff\xff\xff\x0f\x01")
    assert isinstance(bad, Undecodable)
    good = [pb.NormalizeStreamRequest(chunk=b"1"), pb.NormalizeStreamRequest(chunk=b"2")]
    after = pb.NormalizeStreamRequest(chunk=b"3")
    seen = []
    with pytest.raises(InvalidArgument) as info:
        for message in checked(iter([*good, bad, after])):
            seen.append(message)
    assert seen == good and info.value is bad.error


def test_raise_if_undecodable():
    raise_if_undecodable(pb.GetLayerRequest(names=["a"]))  # a message: nothing to say
    bad = tolerant(pb.GetLayerRequest)(b"\xff")
    with pytest.raises(InvalidArgument) as info:
        raise_if_undecodable(bad)
    assert info.value is bad.error


def test_doctests():
    result = doctest.testmod(decoding)
    assert result.attempted > 0 and result.failed == 0
