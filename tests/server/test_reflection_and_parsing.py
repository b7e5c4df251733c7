"""Server reflection v1 and v1alpha; requests that do not parse are INVALID_ARGUMENT, not INTERNAL.

(tests/contract checks the same from a Node.js client; these run without node.)
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2
from server_util import pb, raises_code, rich_details

from normsvc.server.decoding import Undecodable, culprit, tolerant

SERVICES = {"normsvc.v1.NormService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"}


def _reflect(channel, version: str, **request):
    # v1 declares the same messages as v1alpha: the same bytes travel on either path
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10)))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_the_services(mstub, version):
    listed = _reflect(mstub.channel, version, list_services="*")
    assert {s.name for s in listed.list_services_response.service} == SERVICES
    found = _reflect(mstub.channel, version, file_containing_symbol="normsvc.v1.NormService")
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in found.file_descriptor_response.file_descriptor_proto]
    assert "normsvc/v1/normsvc.proto" in [f.name for f in files]
    own = _reflect(mstub.channel, version, file_containing_symbol=f"grpc.reflection.{version}.ServerReflection")
    packages = [descriptor_pb2.FileDescriptorProto.FromString(b).package
                for b in own.file_descriptor_response.file_descriptor_proto]
    assert f"grpc.reflection.{version}" in packages


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
