"""Server reflection, both ``grpc.reflection.v1`` (what current grpcurl and clients ask
for) and ``grpc.reflection.v1alpha`` (what older ones ask for).

grpcio-reflection ships only v1alpha.  v1 declares the very same messages
(field for field) in package ``grpc.reflection.v1``, so the same servicer
answers both: v1 is registered with v1alpha's message classes, whose bytes
are v1's, and its file descriptor (v1alpha's, renamed) joins the descriptor
pool so that reflection can describe itself under either name.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2

__all__ = ["V1_SERVICE_NAME", "V1ALPHA_SERVICE_NAME", "SERVICE_NAMES", "enable"]

V1ALPHA_SERVICE_NAME = v1alpha.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _rename(name: str) -> str:
    return name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")


def _rename_types(messages) -> None:
    for message in messages:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = _rename(field.type_name)
        _rename_types(message.nested_type)


def _register_v1_descriptor(pool) -> None:
    """Add grpc/reflection/v1/reflection.proto to ``pool`` (once), built from v1alpha's."""
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.ClearField("options")  # v1alpha's java/go package options
    _rename_types(proto.message_type)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = _rename(method.input_type), _rename(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())


def enable(service_names, server, pool=None) -> None:
    """Serve reflection v1 and v1alpha for ``service_names`` (the reflection services are added)."""
    pool = pool if pool is not None else descriptor_pool.Default()
    _register_v1_descriptor(pool)
    names = tuple(dict.fromkeys((*service_names, *SERVICE_NAMES)))
    servicer = v1alpha.ReflectionServicer(names, pool=pool)
    v1alpha.enable_server_reflection(names, server, pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
