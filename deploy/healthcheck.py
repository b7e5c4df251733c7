"""Container health check: exit 0 when the server's gRPC health service says SERVING.

It asks the health port (``NORMSVC_HEALTH_PORT``; the image sets 8081): served
in plaintext even when the main port serves TLS or mutual TLS, and by threads
of its own, so a server whose workers are all busy is still healthy.  Without
a health port it asks the main port (``NORMSVC_PORT``), which works only
without TLS, and only while a worker is free.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT = 2.0  # seconds; the image's HEALTHCHECK gives the whole check 3


def main() -> int:
    health_port = os.environ.get("NORMSVC_HEALTH_PORT", "")
    if not health_port and os.environ.get("NORMSVC_TLS_CERT"):
        print("the main port serves TLS: set NORMSVC_HEALTH_PORT (e.g. 8081), the plaintext health port "
              "this check asks", file=sys.stderr)
        return 1
    target = f"127.0.0.1:{health_port or os.environ.get('NORMSVC_PORT', '50051')}"
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    except grpc.RpcError as exc:
        print(f"{target}: {exc.code().name} {exc.details() or ''}".rstrip(), file=sys.stderr)
        return 1
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
