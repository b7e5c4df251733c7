"""Client: the :class:`~normsvc.store.Store` interface over gRPC.

User code moves from in-process to remote statistics by swapping one object::

    store = normsvc.store.Store.open("sqlite:///stats.db")      # in-process
    store = normsvc.Client("10.0.0.5:50051", token="s3cret")    # remote

:class:`Client` has Store's methods with the same arguments and return types
(layer handles, :class:`~normsvc.running.RunningStats`,
:class:`~normsvc.moments.Moments`, numpy arrays) and raises the same
exceptions (:mod:`normsvc.client_errors` maps statuses back to them).  It adds
:meth:`Client.allreduce` (synchronized batch statistics across ranks) and
:meth:`Client.watch` (a stream of new versions).  :class:`AsyncClient`
(:mod:`normsvc.async_client`) has the same methods as coroutines.

Transport behaviour:

* every call has a deadline (``timeout``, default 30 s) that covers its retries;
* UNAVAILABLE is retried with exponential backoff and jitter (:class:`Retry`).
  That is safe because every mutation carries a ``request_id`` (a fresh random
  id per call unless you pass one), which the retry reuses, and the server
  applies a request id once;
* tensors whose request would exceed the server's message limit
  (``max_message_bytes``, the server's ``--max-message-mb``, default 64 MiB)
  travel through NormalizeStream in chunks, transparently.

How it is built: each operation is written once, as a generator that yields
the calls it needs (:class:`Call`) and turns the responses into return values.
:class:`Client` runs those generators with blocking calls, :class:`AsyncClient`
with ``grpc.aio``; neither holds protocol logic of its own.
"""

from __future__ import annotations

import collections
import itertools
import os
import random
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc
import numpy as np

from . import _wire
from ._proto import normsvc_pb2 as pb
from ._proto import normsvc_pb2_grpc as pb_grpc
from .client_errors import from_rpc_error
from .moments import Moments
from .running import RunningStats
from .convert import config_from_pb, config_to_pb, stats_from_pb
from .store.config import DEFAULT, LayerConfig, make_config
from .store.errors import InvalidArgument
from .tensor_codec import DTYPES, Assembler, chunks, decode_moments, encode

__all__ = [
    "Client",
    "RemoteLayer",
    "Retry",
    "LayerInfo",
    "LayerStats",
    "AllReduceResult",
    "Watch",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
]

DEFAULT_TARGET = "127.0.0.1:50051"
#: Seconds every call may take, retries included, unless the client says otherwise.
DEFAULT_TIMEOUT = 30.0
MiB = 1 << 20
#: The server's default message limit (``normsvc serve --max-message-mb 64``).
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
#: Room left in a message for everything but the tensor bytes.
_MESSAGE_OVERHEAD = 64 * 1024
_STREAM_CHUNK_BYTES = 1 * MiB
_LIST_PAGE_SIZE = 1000


# --- values the client returns besides the Store's ---------------------------------


class LayerInfo(NamedTuple):
    """A layer's name, config and statistics (:meth:`Client.describe`)."""

    name: str
    config: LayerConfig
    stats: RunningStats | None


class LayerStats(NamedTuple):
    """One new version of a watched layer (:meth:`Client.watch`)."""

    layer: str
    stats: RunningStats


class AllReduceResult(NamedTuple):
    """What :meth:`Client.allreduce` returns.

    ``moments``: layer -> the merged moments of every rank (the same on all
    ranks); ``stats``: layer -> running statistics after the step's update
    (empty with ``update_stats=False``).
    """

    moments: dict
    stats: dict


# --- transport policy --------------------------------------------------------------


@dataclass(frozen=True)
class Retry:
    """How UNAVAILABLE is retried: at most ``attempts`` tries in all, with the
    n-th retry after a random delay in ``[b/2, b]``,
    ``b = min(max_backoff, initial_backoff * multiplier**(n-1))``, and never
    past the call's deadline.  ``Retry(attempts=1)`` turns retries off.
    """

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"Retry(attempts={self.attempts}): expected at least 1 attempt")

    def delay(self, failed: int, deadline: float | None) -> float | None:
        """Seconds to wait after ``failed`` failed attempts, or None to give up."""
        if failed >= self.attempts:
            return None
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (failed - 1))
        delay = random.uniform(cap / 2, cap)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def _pem(value, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        with open(value, "rb") as f:
            return f.read()
    except (OSError, TypeError) as exc:
        raise ValueError(f"tls {what}: expected PEM bytes or a path to a PEM file, got {value!r} ({exc})") from None


def channel_credentials(tls) -> tuple[grpc.ChannelCredentials | None, list]:
    """``tls=`` of :class:`Client` -> (channel credentials or None, channel options).

    ``None``/``False``: plaintext.  ``True``: TLS with the system's root
    certificates.  PEM bytes or a path: TLS trusting that CA bundle.  A
    mapping with ``root`` (CA bundle), ``cert`` and ``key`` (a client
    certificate, for mutual TLS) and ``server_name`` (the name the server's
    certificate carries, when it is not the target's host); each PEM bytes or
    a path.  A ``grpc.ChannelCredentials`` is used as it is.
    """
    if tls is None or tls is False:
        return None, []
    if isinstance(tls, grpc.ChannelCredentials):
        return tls, []
    if tls is True:
        return grpc.ssl_channel_credentials(), []
    if isinstance(tls, (bytes, str, os.PathLike)):
        return grpc.ssl_channel_credentials(root_certificates=_pem(tls, "root")), []
    if isinstance(tls, Mapping):
        unknown = set(tls) - {"root", "cert", "key", "server_name"}
        if unknown:
            raise ValueError(f"tls has keys {sorted(unknown)}: expected root, cert, key, server_name")
        if ("cert" in tls) != ("key" in tls):
            raise ValueError("tls: a client certificate needs both 'cert' and 'key' (mutual TLS)")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_pem(tls["root"], "root") if tls.get("root") is not None else None,
            private_key=_pem(tls["key"], "key") if "key" in tls else None,
            certificate_chain=_pem(tls["cert"], "cert") if "cert" in tls else None,
        )
        options = [("grpc.ssl_target_name_override", tls["server_name"])] if tls.get("server_name") else []
        return creds, options
    raise ValueError(
        f"tls={tls!r}: expected None, True, a CA bundle (PEM bytes or path), a mapping with "
        "root/cert/key/server_name, or grpc.ChannelCredentials"
    )


#: Methods whose requests the client serializes itself -> the response deserializer (see :mod:`._wire`).
RAW_METHODS = {"Normalize": _wire.normalize_response}


def raw_methods(channel) -> dict:
    """Callables for :data:`RAW_METHODS` on a channel (sync or ``grpc.aio``): bytes in, parsed out."""
    return {name: channel.unary_unary(f"/normsvc.v1.NormService/{name}", response_deserializer=parse)
            for name, parse in RAW_METHODS.items()}


#: Channel options of every client: message sizes are the server's to limit.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


# --- the protocol, written once ----------------------------------------------------


@dataclass
class Call:
    """One RPC an operation needs.

    ``request`` is a message, or for a client-streaming call a function that
    returns a fresh iterator of messages (a retry sends them again).
    ``streaming`` calls (NormalizeStream) answer with the list of response
    messages.  ``raw`` calls send bytes and answer what :data:`RAW_METHODS`
    parse (Normalize: y).  ``timeout`` DEFAULT means the client's.
    """

    method: str
    request: Any
    streaming: bool = False
    timeout: Any = DEFAULT
    raw: bool = False


def _put_f64(out: pb.Tensor, array: np.ndarray) -> None:
    """A float64 tensor without the general codec's checks (the server validates requests)."""
    out.dtype = pb.DTYPE_FLOAT64
    out.shape.extend(array.shape)
    out.data = array.astype("<f8", copy=False).tobytes()


def new_request_id(request_id) -> str:
    """The caller's request id, or a fresh one: a retry of the call reuses it."""
    return os.urandom(16).hex() if request_id is None else request_id


def _moments_pb(name: str, moments, out: pb.LayerMoments) -> None:
    if not isinstance(moments, Moments):
        raise InvalidArgument(
            f"moments for layer {name!r} must be normsvc.Moments, got {type(moments).__name__}",
            layer=name, field="moments",
        )
    out.layer = name
    count, m2 = moments.count, moments.m2
    msg = out.moments
    _put_f64(msg.count, count)
    _put_f64(msg.mean, moments.mean)
    # Moments.variance without its errstate context: m2 / count, 0 for empty groups
    _put_f64(msg.variance, np.divide(m2, count, out=np.zeros(m2.shape), where=count > 0))


def _array(value, field: str, layer: str) -> np.ndarray:
    """An input tensor as the ops take it (lists of ints become float64)."""
    if not hasattr(value, "dtype"):
        value = np.asarray(value)
        if value.dtype.kind in "iub":
            value = value.astype(np.float64)
    value = np.asarray(value)
    if value.dtype.kind != "f" or value.dtype.newbyteorder("<") not in DTYPES.values():
        raise InvalidArgument(f"{field} has dtype {value.dtype}: expected float16, float32 or float64",
                              layer=layer, field=field)
    return value


def _param_pb(value, field: str, out: pb.Tensor) -> None:
    a = np.asarray(value)
    if a.dtype.kind != "f" or a.dtype.newbyteorder("<") not in DTYPES.values():
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{field} must be a numeric array, got {type(value).__name__}", field=field) from None
    encode(a, out)


_DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
_X_FIELD = pb.NormalizeRequest.DESCRIPTOR.fields_by_name["x"].number
_NAMINGS = {"keras": pb.NAMING_KERAS, "torch": pb.NAMING_TORCH}
_EXPORT_DTYPES = {"float64": pb.DTYPE_FLOAT64, "float32": pb.DTYPE_FLOAT32}
_MODES = {True: pb.MODE_TRAINING, False: pb.MODE_INFERENCE}


def _naming(naming) -> int:
    if naming not in _NAMINGS:
        raise InvalidArgument(f"naming={naming!r}: expected 'keras' or 'torch'", field="naming")
    return _NAMINGS[naming]


def _layer_list(layers) -> list:
    if layers is None:
        return []
    return [layers] if isinstance(layers, str) else list(layers)


class protocol:
    """The operations as generators: ``yield Call(...)`` receives the response.

    Only protocol here (requests, responses, paging, streaming); the drivers
    (``Client._run``, ``AsyncClient._run``) do the I/O, deadlines and retries.
    """

    @staticmethod
    def create_layer(client, name, options: dict):
        # validated and resolved here, so a bad argument fails as Store's does, before any I/O
        config = make_config(**options)
        request = pb.CreateLayerRequest(name=name)
        config_to_pb(config, request.config)
        response = yield Call("CreateLayer", request)
        return client._handle(response.layer.name)

    @staticmethod
    def get_layer(name):
        response = yield Call("GetLayer", pb.GetLayerRequest(names=[name]))
        return response.layers[0]

    @staticmethod
    def layer(client, name):
        yield from protocol.get_layer(name)
        return client._handle(name)

    @staticmethod
    def config(name):
        return config_from_pb((yield from protocol.get_layer(name)).config)

    @staticmethod
    def stats(name):
        return stats_from_pb((yield from protocol.get_layer(name)).stats)

    @staticmethod
    def list_pages(prefix, include_stats: bool, page_size: int = _LIST_PAGE_SIZE):
        """Every layer under ``prefix`` (one ListLayers call per page)."""
        if not isinstance(prefix, str):
            raise InvalidArgument(f"prefix must be a string, got {type(prefix).__name__}", field="prefix")
        layers, token = [], ""
        while True:
            response = yield Call("ListLayers", pb.ListLayersRequest(
                prefix=prefix, page_size=page_size, page_token=token, include_stats=include_stats))
            layers.extend(response.layers)
            token = response.next_page_token
            if not token:
                return layers

    @staticmethod
    def list_layers(prefix, after, limit):
        if after is not None and not isinstance(after, str):
            raise InvalidArgument(f"after must be a string or None, got {after!r}", field="after")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidArgument(f"limit={limit!r}: expected None or a positive int", field="limit")
        # page tokens are the server's own: `after` filters the full listing
        names = [layer.name for layer in (yield from protocol.list_pages(prefix, False))]
        if after is not None:
            names = [n for n in names if n > after]
        return names if limit is None else names[:limit]

    @staticmethod
    def describe(names, prefix):
        if names is not None:
            response = yield Call("GetLayer", pb.GetLayerRequest(names=_layer_list(names)))
            layers = response.layers
        else:
            layers = yield from protocol.list_pages(prefix, True)
        return [LayerInfo(m.name, config_from_pb(m.config), stats_from_pb(m.stats) if m.HasField("stats") else None)
                for m in layers]

    @staticmethod
    def delete_layer(name):
        yield Call("DeleteLayer", pb.DeleteLayerRequest(name=name))

    @staticmethod
    def update_many(updates, request_id):
        if not isinstance(updates, Mapping):
            raise InvalidArgument(
                f"updates must be a mapping of layer name to Moments, got {type(updates).__name__}",
                field="updates",
            )
        if not updates:
            return {}
        request = pb.UpdateStatsRequest(request_id=new_request_id(request_id))
        for name, moments in updates.items():
            _moments_pb(name, moments, request.updates.add())
        response = yield Call("UpdateStats", request)
        return {entry.layer: stats_from_pb(entry.stats) for entry in response.stats}

    @staticmethod
    def update(name, moments, request_id):
        return (yield from protocol.update_many({name: moments}, request_id))[name]

    @staticmethod
    def set_state(method, name, request_id):
        """ResetStats, Freeze, Unfreeze: one layer, one request id, the new statistics."""
        request = getattr(pb, f"{method}Request")(name=name, request_id=new_request_id(request_id))
        response = yield Call(method, request)
        return stats_from_pb(response.stats)

    @staticmethod
    def normalize(name, x, training, update, gamma, beta, request_id, max_message_bytes, return_moments=False):
        if not isinstance(training, (bool, np.bool_)):
            raise InvalidArgument(f"training must be a bool, got {training!r}", field="training")
        x = _array(x, "x", name)
        params = {}
        for field, value in (("gamma", gamma), ("beta", beta)):
            if value is not None:
                params[field] = pb.Tensor()
                _param_pb(value, field, params[field])
        mode = _MODES[bool(training)]
        updates = bool(training) and bool(update)
        rid = new_request_id(request_id) if updates else (request_id or "")
        size = x.nbytes + sum(len(t.data) for t in params.values()) + _MESSAGE_OVERHEAD
        if size <= max_message_bytes:
            request = pb.NormalizeRequest(layer=name, mode=mode, request_id=rid, **params)
            if training:
                request.update = bool(update)
            x = x.astype(x.dtype.newbyteorder("<"), copy=False)
            raw = _wire.with_tensor(request.SerializeToString(), _X_FIELD, x, _DTYPE_CODES[x.dtype])
            y, moments = yield Call("Normalize", raw, raw=True)  # parsed by _wire.normalize_response
            if not return_moments:
                return y
            return y, (decode_moments(moments, field="batch_moments") if moments is not None else None)
        header = pb.NormalizeStreamHeader(layer=name, dtype=_DTYPE_CODES[x.dtype.newbyteorder("<")], shape=x.shape,
                                          mode=mode, request_id=rid, **params)
        if training:
            header.update = bool(update)
        chunk = max(1, min(_STREAM_CHUNK_BYTES, max_message_bytes - _MESSAGE_OVERHEAD))

        def requests():
            yield pb.NormalizeStreamRequest(header=header)
            for piece in chunks(x, chunk):
                yield pb.NormalizeStreamRequest(chunk=piece)

        responses = yield Call("NormalizeStream", requests, streaming=True)
        if not responses or responses[0].WhichOneof("part") != "result":
            raise InvalidArgument("NormalizeStream answered without a result message", field="y")
        result = responses[0].result
        y = Assembler(result.dtype, result.shape, field="y")
        for message in responses[1:]:
            y.add(message.chunk)
        y = y.array(finite=False)
        if not return_moments:
            return y
        moments = (decode_moments(result.batch_moments, field="batch_moments")
                   if result.HasField("batch_moments") else None)
        return y, moments

    @staticmethod
    def allreduce(moments, step, rank, world_size, group, update_stats, timeout):
        if not isinstance(moments, Mapping):
            raise InvalidArgument(
                f"moments must be a mapping of layer name to Moments, got {type(moments).__name__}",
                field="moments",
            )
        request = pb.AllReduceMomentsRequest(group=group, step=step, rank=rank, world_size=world_size,
                                             update_stats=bool(update_stats))
        for name, m in moments.items():
            _moments_pb(name, m, request.moments.add())
        response = yield Call("AllReduceMoments", request, timeout=timeout)
        merged = {e.layer: decode_moments(e.moments, field=f"global_moments[{e.layer}]")
                  for e in response.global_moments}
        return AllReduceResult(merged, {e.layer: stats_from_pb(e.stats) for e in response.stats})

    @staticmethod
    def export(path, layers, naming, dtype):
        if dtype not in _EXPORT_DTYPES:
            raise InvalidArgument(f"dtype={dtype!r}: expected 'float64' or 'float32'", field="dtype")
        request = pb.ExportStatsRequest(names=_layer_list(layers), naming=_naming(naming),
                                        dtype=_EXPORT_DTYPES[dtype])
        response = yield Call("ExportStats", request)
        _write_atomically(path, response.safetensors)
        return list(response.layers)

    @staticmethod
    def import_(path, naming, layers):
        request = pb.ImportStatsRequest(naming=_naming(naming), names=_layer_list(layers))
        try:
            with open(path, "rb") as f:
                request.safetensors = f.read()
        except FileNotFoundError:
            raise InvalidArgument(f"no file {os.fspath(path)!r} to import", field="path") from None
        response = yield Call("ImportStats", request)
        return list(response.layers)


def _write_atomically(path, data: bytes) -> None:
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".normsvc-export-", suffix=".safetensors",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class WatchFilter:
    """WatchLayer bookkeeping shared by both clients.

    The stream is always asked for the layers' current versions first: once
    they arrived the server has subscribed, so ``watch()`` returns only then
    and no later version can be missed (with ``skip_initial`` they are
    dropped here).  After a reconnect the current versions fill the gap, and
    versions already delivered are dropped.
    """

    def __init__(self, names, skip_initial: bool):
        self.names = _layer_list(names)
        if not self.names:
            raise InvalidArgument("watch needs at least one layer name", field="names")
        self.skip_initial = skip_initial
        self.last: dict[str, int] = {}

    def request(self) -> pb.WatchLayerRequest:
        return pb.WatchLayerRequest(names=self.names)

    @property
    def ready(self) -> bool:
        """Whether every layer's initial version arrived (the subscription is live)."""
        return len(self.last) == len(set(self.names))

    def accept(self, message: pb.WatchLayerResponse) -> LayerStats | None:
        """The item to deliver for a message, or None."""
        first = message.layer not in self.last
        if message.stats.version <= self.last.get(message.layer, -1):
            return None
        self.last[message.layer] = message.stats.version
        if first and self.skip_initial:
            return None
        return LayerStats(message.layer, stats_from_pb(message.stats))


# --- the API, shared by Client and AsyncClient -------------------------------------


class RemoteLayer:
    """A handle on one layer of a server, as :class:`normsvc.store.Layer` is of a Store.

    It holds only the name: every call asks the server.  From an
    :class:`AsyncClient` each method (and ``config``) is awaitable.
    """

    def __init__(self, client, name: str):
        self._client = client
        self.name = name

    def __repr__(self) -> str:
        return f"RemoteLayer({self.name!r})"

    @property
    def config(self) -> LayerConfig:
        """The layer's configuration (with every default resolved)."""
        return self._client._run(protocol.config(self.name))

    def stats(self) -> RunningStats:
        """The current running statistics."""
        return self._client._run(protocol.stats(self.name))

    def update(self, moments: Moments, *, request_id: str | None = None) -> RunningStats:
        """Fold one batch's moments into the running statistics; see :meth:`normsvc.store.Layer.update`."""
        return self._client._run(protocol.update(self.name, moments, request_id))

    def freeze(self, *, request_id: str | None = None) -> RunningStats:
        """Stop updates; normalize with the running statistics."""
        return self._client._run(protocol.set_state("Freeze", self.name, request_id))

    def unfreeze(self, *, request_id: str | None = None) -> RunningStats:
        """Accept updates again."""
        return self._client._run(protocol.set_state("Unfreeze", self.name, request_id))

    def reset(self, *, request_id: str | None = None) -> RunningStats:
        """Back to the initial statistics (keeps config, shape and frozen flag)."""
        return self._client._run(protocol.set_state("ResetStats", self.name, request_id))

    def normalize(self, x, *, training: bool, update: bool = True, gamma=None, beta=None,
                  request_id: str | None = None, return_moments: bool = False):
        """Normalize ``x`` on the server as this layer; see :meth:`normsvc.store.Layer.normalize`.

        Returns ``y``, or with ``return_moments=True`` ``(y, batch Moments or None)``.
        Tensors larger than one message go through NormalizeStream.
        """
        return self._client._run(protocol.normalize(self.name, x, training, update, gamma, beta, request_id,
                                                    self._client.max_message_bytes, return_moments))


class _Api:
    """Store's methods plus update_many/allreduce/describe: each runs one protocol generator."""

    target: str
    max_message_bytes: int

    def _run(self, operation):  # pragma: no cover - defined by the drivers
        raise NotImplementedError

    def _handle(self, name: str) -> RemoteLayer:
        return RemoteLayer(self, name)

    def create_layer(self, name: str, *, kind: str = "batch", axis=-1, groups: int | None = None,
                     epsilon: float | None = None, momentum=DEFAULT, convention: str = "keras",
                     center: bool = True, scale: bool = True, num_features=None) -> RemoteLayer:
        """Create a layer, or return the existing one if its config is identical.

        Arguments as :meth:`normsvc.store.Store.create_layer`; ConfigConflict
        if the name holds another config.
        """
        options = dict(kind=kind, axis=axis, groups=groups, epsilon=epsilon, momentum=momentum,
                       convention=convention, center=center, scale=scale, num_features=num_features)
        return self._run(protocol.create_layer(self, name, options))

    def layer(self, name: str) -> RemoteLayer:
        """A handle on an existing layer; LayerNotFound if there is none."""
        return self._run(protocol.layer(self, name))

    def list_layers(self, prefix: str = "", *, after: str | None = None, limit: int | None = None) -> list[str]:
        """Sorted names of the layers starting with ``prefix`` (``after``/``limit`` page, as Store's)."""
        return self._run(protocol.list_layers(prefix, after, limit))

    def describe(self, names=None, *, prefix: str = "") -> list[LayerInfo]:
        """Name, config and statistics of ``names`` (all must exist), or of every layer under ``prefix``."""
        return self._run(protocol.describe(names, prefix))

    def delete_layer(self, name: str) -> None:
        """Delete a layer and its statistics; LayerNotFound if absent."""
        return self._run(protocol.delete_layer(name))

    def update_many(self, updates: Mapping, *, request_id: str | None = None) -> dict[str, RunningStats]:
        """Push one batch's moments to several layers in one all-or-nothing call.

        Returns layer name -> its RunningStats after the call.
        """
        return self._run(protocol.update_many(updates, request_id))

    def allreduce(self, moments: Mapping, *, step: int, rank: int, world_size: int, group: str = "",
                  update_stats: bool = True, timeout=DEFAULT) -> AllReduceResult:
        """Synchronized batch statistics (SyncBatchNorm without NCCL).

        Each of ``world_size`` ranks calls this with its own batch moments for
        the same ``(group, step)``; every rank gets the moments of all their
        data merged, and (``update_stats``) the running statistics take one
        update per step.  A rank that never comes fails the others with
        DeadlineExceeded at their deadline (``timeout``, default the client's).
        """
        return self._run(protocol.allreduce(moments, step, rank, world_size, group, update_stats, timeout))

    def export(self, path, layers=None, naming: str = "keras", *, dtype: str = "float64") -> list[str]:
        """Write running statistics to a local safetensors file (Keras or PyTorch names)."""
        return self._run(protocol.export(path, layers, naming, dtype))

    def import_(self, path, naming: str = "keras", *, layers=None) -> list[str]:
        """Load running statistics from a local safetensors file into the server's store."""
        return self._run(protocol.import_(path, naming, layers))


# --- the blocking driver -------------------------------------------------------------


def _metadata(token) -> tuple | None:
    if token is None:
        return None
    if not isinstance(token, str) or not token or token != token.strip():
        raise ValueError("token: expected a non-empty string without surrounding spaces")
    return (("authorization", f"Bearer {token}"),)


class _Transport:
    """Settings both drivers share: target, metadata, deadline, retries, errors."""

    def _setup(self, target, token, tls, timeout, retry, max_message_bytes):
        if not isinstance(target, str) or not target:
            raise ValueError(f"target={target!r}: expected 'host:port'")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout={timeout!r}: expected None or seconds > 0")
        self.target = target
        self.timeout = timeout
        self.retry = retry or Retry()
        self.max_message_bytes = int(max_message_bytes)
        self._metadata = _metadata(token)
        credentials, options = channel_credentials(tls)
        return credentials, CHANNEL_OPTIONS + options

    def _deadline(self, call: Call) -> float | None:
        timeout = self.timeout if call.timeout is DEFAULT else call.timeout
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _remaining(deadline):
        return None if deadline is None else max(deadline - time.monotonic(), 0.001)

    def _retry_delay(self, error: grpc.RpcError, failed: int, deadline) -> float | None:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        return self.retry.delay(failed, deadline)

    def _error(self, error: grpc.RpcError, method: str, attempts: int):
        where = f"{method} on {self.target}"
        if error.code() == grpc.StatusCode.UNAVAILABLE and attempts > 1:
            where += f" (gave up after {attempts} attempts)"
        return from_rpc_error(error, context=where)


class Client(_Transport, _Api):
    """Store's interface on a normsvc server.

    Parameters
    ----------
    target : str
        ``host:port`` of the server (any gRPC target, e.g. ``dns:///normsvc:50051``).
    token : str, optional
        Bearer token, sent as ``authorization: Bearer <token>``.
    tls : optional
        None: plaintext; True: TLS with the system roots; a CA bundle (PEM
        bytes or path); or ``{"root": ..., "cert": ..., "key": ...,
        "server_name": ...}`` for a private CA and mutual TLS (see
        :func:`channel_credentials`).
    timeout : float or None
        Deadline of every call in seconds, retries included (default 30).
    retry : Retry, optional
        UNAVAILABLE retries (default ``Retry()``: 5 attempts, 0.1 s doubling).
    max_message_bytes : int
        The server's message limit: Normalize requests above it use NormalizeStream.

    Thread-safe; close it (or use ``with``) to release the connection.

    Examples
    --------
    >>> client = normsvc.Client("127.0.0.1:50051")               # doctest: +SKIP
    >>> bn = client.create_layer("bn", convention="torch")      # doctest: +SKIP
    >>> bn.update(normsvc.moments(x, axes=[0])).version         # doctest: +SKIP
    1
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls=None,
                 timeout: float | None = DEFAULT_TIMEOUT, retry: Retry | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        credentials, options = self._setup(target, token, tls, timeout, retry, max_message_bytes)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.NormServiceStub(self._channel)
        self._raw = raw_methods(self._channel)

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, operation):
        try:
            call = next(operation)
            while True:
                call = operation.send(self._invoke(call))
        except StopIteration as done:
            return done.value

    def _invoke(self, call: Call):
        method = self._raw[call.method] if call.raw else getattr(self._stub, call.method)
        deadline = self._deadline(call)
        for attempt in itertools.count(1):
            try:
                timeout = self._remaining(deadline)
                if call.streaming:
                    return list(method(call.request(), timeout=timeout, metadata=self._metadata))
                return method(call.request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                delay = self._retry_delay(error, attempt, deadline)
                if delay is None:
                    raise self._error(error, call.method, attempt) from None
                time.sleep(delay)

    def watch(self, names, *, skip_initial: bool = False, timeout: float | None = None) -> "Watch":
        """Every new version of the layers' statistics, as :class:`LayerStats` items.

        Starts with each layer's current statistics unless ``skip_initial``;
        returns once the server has subscribed, so no later version is missed
        (LayerNotFound here if a layer does not exist).
        Iterate it; ``cancel()`` (or leaving a ``with`` block) ends it.  If
        the server goes away the watch reconnects (UNAVAILABLE is retried)
        and resumes after the last version it delivered; a deleted layer
        ends it with LayerNotFound.
        """
        return Watch(self, WatchFilter(names, skip_initial), timeout)


class Watch:
    """An iterator of :class:`LayerStats` from WatchLayer; ``cancel()`` stops it."""

    def __init__(self, client: Client, state: WatchFilter, timeout):
        self._client = client
        self._state = state
        self._timeout = timeout
        self._lock = threading.Lock()
        self._call = None
        self._cancelled = False
        self._ready = collections.deque()
        self._items = self._follow()
        try:
            while not state.ready:
                item = next(self._items)
                if item is not None:
                    self._ready.append(item)
        except StopIteration:
            pass
        except BaseException:
            self.cancel()
            raise

    def __iter__(self):
        return self

    def __next__(self) -> LayerStats:
        if self._ready:
            return self._ready.popleft()
        while True:
            item = next(self._items)
            if item is not None:
                return item

    def _follow(self):
        """Yields ``accept(message)`` for every message (None included), reconnecting on UNAVAILABLE."""
        client, failed = self._client, 0
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            with self._lock:
                if self._cancelled:
                    return
                self._call = client._stub.WatchLayer(self._state.request(), timeout=client._remaining(deadline),
                                                     metadata=client._metadata)
            try:
                for message in self._call:
                    failed = 0
                    yield self._state.accept(message)
                return
            except grpc.RpcError as error:
                if self._cancelled:
                    return
                failed += 1
                delay = client._retry_delay(error, failed, deadline)
                if delay is None:
                    raise client._error(error, "WatchLayer", failed) from None
                time.sleep(delay)
            finally:
                self._call.cancel()

    def cancel(self) -> None:
        """End the stream (iteration then stops); safe from another thread."""
        with self._lock:
            self._cancelled = True
            if self._call is not None:
                self._call.cancel()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()
