"""The gRPC service: ``serve()`` starts NormService (plus health and reflection) over a store.

Layout: :mod:`.servicer` (protobuf <-> store calls), :mod:`.errors` (the one
exception -> status mapping), :mod:`.interceptors` with :mod:`.auth` and
:mod:`.metrics`, :mod:`.allreduce` (the AllReduceMoments rendezvous),
:mod:`.watch` (WatchLayer fan-out), :mod:`.limits`, :mod:`.serve`.
"""

from .serve import SERVICE_NAME, Server, serve

__all__ = ["serve", "Server", "SERVICE_NAME"]
