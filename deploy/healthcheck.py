"""Container health check: exit 0 when the gRPC health service says SERVING."""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target = f"127.0.0.1:{os.environ.get('NORMSVC_PORT', '50051')}"
try:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
except grpc.RpcError as exc:
    print(f"{target}: {exc.code().name}", file=sys.stderr)
    sys.exit(1)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
