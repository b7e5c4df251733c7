"""Server reflection v1 and v1alpha (normsvc.server.reflection).

(tests/contract checks the same from a Node.js client; these run without node.)
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

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
