"""Generated gRPC stubs for normsvc.v1 (do not edit; run scripts/gen_proto.py).

grpcio-tools 1.85.1
"""

from . import normsvc_pb2, normsvc_pb2_grpc

__all__ = ["normsvc_pb2", "normsvc_pb2_grpc"]
