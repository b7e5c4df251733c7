"""``serve()``: start a NormService server; the same function backs tests, the CLI and containers.

>>> from normsvc.server import serve
>>> server = serve("memory://", port=0)       # doctest: +SKIP
>>> server.port                                # the port it bound  # doctest: +SKIP
>>> server.stop(grace=5)                       # doctest: +SKIP

The server is grpc's synchronous server over a thread pool (faster than the
asyncio server on these machines: design.md); the numba kernels release the
GIL and run on a thread-safe threading layer, so concurrent Normalize calls
use every core.  Besides NormService it serves ``grpc.health.v1.Health`` and
server reflection (v1 and v1alpha: :mod:`.reflection`).  NormService's
request deserializers never raise (:mod:`.decoding`): a request that does not
parse is INVALID_ARGUMENT, not grpc's INTERNAL.

With ``health_port`` the health service is also served alone on a second,
plaintext port with threads of its own, for container and kubelet probes:
those cannot present the client certificate that mutual TLS asks for
(kubelet's gRPC probe speaks no TLS at all), and a Check on the main port
waits for a free worker like any other call.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .._proto import normsvc_pb2 as pb
from .._proto import normsvc_pb2_grpc as pb_grpc
from ..errors import InvalidArgument, LayerNotFound, NormsvcError
from ..store import Store
from ..store.steps import DEFAULT_LAG
from . import auth, reflection
from .allreduce import ReductionStreams, Rendezvous
from .decoding import tolerant
from .interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor, StreamLimitInterceptor
from .limits import Limits, StreamBudget, StreamSlots
from .metrics import Metrics
from .servicer import SERIALIZED_RESPONSES, NormServicer
from .watch import DELETED, WatchHub

__all__ = ["serve", "Server", "SERVICE_NAME", "DEVICES", "resolve_device"]

log = logging.getLogger("normsvc.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["NormService"].full_name
DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``auto`` -> the device Normalize runs its kernels on.

    ``cuda`` fails unless a usable GPU is present (:func:`normsvc.ops.cuda_available`);
    ``auto`` picks cuda then, and cpu otherwise.
    """
    if device not in DEVICES:
        raise InvalidArgument(f"device={device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    from .. import ops

    if ops.cuda_available():
        return "cuda"
    if device == "cuda":
        raise InvalidArgument("device='cuda': no usable CUDA GPU (numba.cuda sees none, or numba-cuda is "
                         "not installed); use --device cpu or auto")
    return "cpu"


class Server:
    """A running server: ``port``, ``address``, ``health_port`` (None without one), ``store``,
    ``metrics``, ``rendezvous``, ``reductions`` (:class:`.allreduce.ReductionStreams`), ``limits``
    (resolved for this server), ``streams`` (:class:`.limits.StreamSlots`), ``stream_budget``
    (:class:`.limits.StreamBudget`); ``stop()`` ends it."""

    def __init__(self, grpc_server, *, port, host, store, owns_store, health_servicer, hub,
                 rendezvous, metrics, metrics_port, device, tls, limits=None, streams=None, stream_budget=None,
                 unsubscribe=None, health_server=None, health_port=None, reductions=None):
        self._server = grpc_server
        self._health_server = health_server
        self.health_port = health_port
        self._unsubscribe = unsubscribe
        self.port = port
        self.host = host
        self.store = store
        self._owns_store = owns_store
        self.health = health_servicer
        self.hub = hub
        self.rendezvous = rendezvous
        self.reductions = reductions
        self.metrics = metrics
        self.metrics_port = metrics_port
        self.device = device
        self.tls = tls
        self.limits = limits
        self.streams = streams
        self.stream_budget = stream_budget
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopping = False

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = 10.0) -> None:
        """Graceful shutdown: health NOT_SERVING, no new calls, in-flight calls get ``grace``
        seconds to finish, then the store is flushed and closed.  Safe to call twice."""
        with self._stop_lock:
            if self._stopping:
                first = False
            else:
                self._stopping = first = True
        if not first:
            self._stopped.wait()
            return
        try:
            log.info("stopping: health NOT_SERVING, %s s grace for calls in flight", grace)
            self.health.enter_graceful_shutdown()
            self.hub.close()  # watch streams end (UNAVAILABLE) so clients reconnect elsewhere
            if self.reductions is not None:  # reduction streams between reductions: cancelled (clients retry)
                self.reductions.close()
            self._server.stop(grace).wait()
        finally:
            try:
                if self._unsubscribe is not None:
                    self._unsubscribe()
                if self._owns_store:
                    self.store.close()
            finally:
                if self._health_server is not None:  # it answered NOT_SERVING while the calls drained
                    self._health_server.stop(0).wait()
                self.metrics.close()
                self._stopped.set()
                log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (or ``timeout``); True if it has."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)


class _Handlers:
    """Stands in for a server to collect the generated code's method handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def _serialized(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _add_service(servicer: NormServicer, server) -> None:
    """Register NormService as the generated code does, except that requests that do not
    parse reach the errors interceptor (:func:`.decoding.tolerant`), and the methods in
    :data:`.servicer.SERIALIZED_RESPONSES` answer bytes the servicer serialized itself."""
    collected = _Handlers()
    pb_grpc.add_NormServiceServicer_to_server(servicer, collected)
    handlers = collected.handlers
    methods = pb.DESCRIPTOR.services_by_name["NormService"].methods_by_name
    for name, h in handlers.items():
        attr, factory = _FACTORIES[h.request_streaming, h.response_streaming]
        handlers[name] = factory(
            getattr(h, attr),
            request_deserializer=tolerant(getattr(pb, methods[name].input_type.name)),
            response_serializer=_serialized if name in SERIALIZED_RESPONSES else h.response_serializer,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _read(path) -> bytes:
    return Path(path).read_bytes()


def serve(
    store="memory://",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_message_mb: int | None = None,
    tokens=None,
    tls_cert=None,
    tls_key=None,
    tls_client_ca=None,
    metrics_port: int | None = None,
    health_port: int | None = None,
    device: str = "auto",
    workers: int = 64,
    limits: Limits | None = None,
    allreduce_max_wait: float = 300.0,
    watch_poll: float = 2.0,
    step_lag: int = DEFAULT_LAG,
) -> Server:
    """Start a server and return its :class:`Server` handle.

    Parameters
    ----------
    store : str or Store
        A store URL (``memory://``, ``sqlite:///path``), opened and closed by the
        server, or an open :class:`~normsvc.store.Store` (left open on stop).
    host, port : str, int
        Where to listen; port 0 picks a free port (``Server.port`` tells which).
    max_message_mb : int, optional
        Largest gRPC message either way (default ``limits.max_message_mb``, 64).
    tokens : path or TokenTable, optional
        Bearer tokens with roles and layer prefixes (:mod:`.auth`); without
        them every call is allowed.
    tls_cert, tls_key : path, optional
        PEM server certificate chain and key: serve TLS.
    tls_client_ca : path, optional
        PEM CA bundle: require client certificates signed by it (mutual TLS).
    metrics_port : int, optional
        Serve Prometheus metrics over HTTP on this port (0: a free one; the
        handle's ``metrics_port`` tells which).  None: no HTTP endpoint (the
        registry is still at ``Server.metrics.registry``).
    health_port : int, optional
        Also serve ``grpc.health.v1.Health`` alone on this port of ``host``
        (0: a free one; the handle's ``health_port`` tells which): plaintext
        even when the main port serves TLS, no tokens, and threads of its
        own, so it answers while every worker is busy.  For probes (the
        image's HEALTHCHECK, kubelet's gRPC probes).  None: no such port.
    device : {"cpu", "cuda", "auto"}
        Where the kernels run (see :func:`resolve_device`).
    workers : int
        Threads serving calls; each WatchLayer or NormalizeStream stream (and
        server reflection stream) and each rank waiting in AllReduceMoments
        holds one while it lasts.  At most ``limits.max_streams`` of them
        (default: all but ``max(2, workers // 4)``) go to such calls, and at
        most ``limits.max_streams_per_token`` to one token's; beyond them the
        call is refused at once (RESOURCE_EXHAUSTED), so unary calls and
        health checks always find a thread.
    limits : Limits, optional
        Request limits (:class:`.limits.Limits`).
    allreduce_max_wait : float
        Longest an AllReduceMoments rank waits for the others when its call has no deadline.
    watch_poll : float
        How often WatchLayer streams poll the store for versions made by other processes.
    step_lag : int
        A training step still open when a contribution this many steps ahead
        arrives is closed and applied with what arrived (see UpdateStats);
        only for a store given by URL (an open Store keeps its own).
    """
    if isinstance(tokens, (str, Path)):
        tokens = auth.TokenTable.load(tokens)
    limits = _limits(limits, max_message_mb).for_server(workers, tokens=tokens is not None)
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("tls_cert and tls_key go together: pass both to serve TLS, or neither")
    if tls_client_ca is not None and tls_cert is None:
        raise InvalidArgument("tls_client_ca (mutual TLS) needs tls_cert and tls_key as well")
    device = resolve_device(device)

    owns_store = isinstance(store, str)
    store = Store.open(store, step_lag=step_lag) if owns_store else store
    metrics = Metrics()
    theirs = store.on_incomplete  # a Store passed in may have its own hook: call both

    def on_incomplete(*args):
        metrics.steps_closed_incomplete.inc()
        if theirs is not None:
            theirs(*args)

    store.on_incomplete = on_incomplete
    health_server = bound_health = unsubscribe = None
    try:
        hub = WatchHub()
        if store.backend.shared:  # replicas share the store (redis): the rendezvous and notices go through it
            from .shared_allreduce import SharedRendezvous

            rendezvous = SharedRendezvous(store.backend, max_wait=allreduce_max_wait,
                                          on_outcome=metrics.allreduce_outcome)
            unsubscribe = store.backend.subscribe(_forward_changes(store, hub))
        else:
            rendezvous = Rendezvous(max_wait=allreduce_max_wait, on_outcome=metrics.allreduce_outcome)
            unsubscribe = None
        stream_budget = StreamBudget(limits.max_stream_bytes)
        reductions = ReductionStreams()
        servicer = NormServicer(store, limits=limits, hub=hub, rendezvous=rendezvous, metrics=metrics,
                                watch_poll=watch_poll, device=device, stream_budget=stream_budget,
                                reductions=reductions)
        streams = StreamSlots(limits.max_streams, limits.max_streams_per_token)
        metrics.follow_capacity(streams, stream_budget)
        server, health_servicer = _grpc_server(servicer, metrics, tokens, limits, workers, streams)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = _listen(server, target, tls_cert, tls_key, tls_client_ca)
        if health_port is not None:
            health_server, bound_health = _health_server(health_servicer, host, health_port)
        server.start()
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        bound_metrics = metrics.serve_http(metrics_port, host) if metrics_port is not None else None
    except BaseException:
        if health_server is not None:
            health_server.stop(0)
        if unsubscribe is not None:
            unsubscribe()
        metrics.close()
        if owns_store:
            store.close()
        raise
    tls = "mtls" if tls_client_ca else ("tls" if tls_cert else "none")
    log.info("serving %s on %s (tls=%s, auth=%s, device=%s, store=%s%s)", SERVICE_NAME, target.rsplit(":", 1)[0] +
             f":{bound}", tls, "tokens" if tokens is not None else "off", device, getattr(store, "url", store),
             "" if bound_health is None else f"; health alone on port {bound_health}")
    return Server(server, port=bound, host=host, store=store, owns_store=owns_store,
                  health_servicer=health_servicer, hub=hub, rendezvous=rendezvous, reductions=reductions,
                  metrics=metrics,
                  metrics_port=bound_metrics, device=device, tls=tls, limits=limits, streams=streams,
                  stream_budget=stream_budget, unsubscribe=unsubscribe, health_server=health_server,
                  health_port=bound_health)


def _forward_changes(store, hub: WatchHub):
    """The store's change notices (every replica's writes) as new versions for this server's watchers."""

    def forward(name: str) -> None:
        if not hub.watched(name):
            return
        try:
            hub.publish(name, store.layer(name).stats())
        except LayerNotFound:
            hub.publish(name, DELETED)
        except NormsvcError:  # the store is unreachable for now: the watchers' polling catches up
            pass

    return forward


def _limits(limits: Limits | None, max_message_mb) -> Limits:
    """The request limits, with ``max_message_mb`` applied and stream chunks that fit a message."""
    limits = limits or Limits()
    if max_message_mb is not None:
        if max_message_mb <= 0:
            raise InvalidArgument(f"max_message_mb={max_message_mb}: expected a positive number",
                                  field="max_message_mb")
        limits = Limits(**{**limits.__dict__, "max_message_mb": max_message_mb})
    if limits.stream_chunk_bytes > limits.max_message_bytes - 1024:
        limits = Limits(**{**limits.__dict__, "stream_chunk_bytes": max(limits.max_message_bytes // 2, 1)})
    return limits


def _grpc_server(servicer, metrics, tokens, limits: Limits, workers: int, streams: StreamSlots):
    """The grpc server with NormService, health and reflection registered (not yet listening)."""
    interceptors = [MetricsInterceptor(metrics), ErrorInterceptor(), StreamLimitInterceptor(streams, tokens)]
    if tokens is not None:
        interceptors.append(AuthInterceptor(tokens))
    options = [
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="normsvc"),
        interceptors=interceptors,
        options=options,
    )
    _add_service(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
        server,
    )
    return server, health_servicer


#: Threads of the health port's server: Check is a dict lookup, and Watch (non-blocking) holds none.
HEALTH_WORKERS = 2


def _health_server(health_servicer, host: str, port: int):
    """``grpc.health.v1.Health`` alone, plaintext, on ``host:port`` with threads of its own (started);
    returns (server, port bound).  It shares the main server's servicer, so it says what that says."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=HEALTH_WORKERS, thread_name_prefix="normsvc-health"),
                         options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(target)
    if not bound:
        raise OSError(f"could not listen on {target} (the health port)")
    server.start()
    return server, bound


def _listen(server, target: str, tls_cert, tls_key, tls_client_ca) -> int:
    """Add the (TLS or plaintext) port; returns the port bound."""
    if tls_cert is not None:
        credentials = grpc.ssl_server_credentials(
            [(_read(tls_key), _read(tls_cert))],
            root_certificates=_read(tls_client_ca) if tls_client_ca is not None else None,
            require_client_auth=tls_client_ca is not None,
        )
        bound = server.add_secure_port(target, credentials)
    else:
        bound = server.add_insecure_port(target)
    if not bound:
        raise OSError(f"could not listen on {target}")
    return bound
