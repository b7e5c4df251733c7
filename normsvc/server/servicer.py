"""NormService: each RPC decodes its request, calls the store, encodes the answer.

No logic of its own: validation of configs and statistics lives in the store,
tensor decoding in :mod:`normsvc.wire`, the AllReduceMoments
rendezvous in :mod:`.allreduce`, WatchLayer's fan-out in :mod:`.watch`,
status codes in :mod:`normsvc.wire.status`, auth and metrics in the interceptors.
Exceptions propagate to the errors interceptor.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import os
import tempfile

from .._proto import normsvc_pb2 as pb
from .._proto import normsvc_pb2_grpc as pb_grpc
from ..config import make_config
from ..errors import InvalidArgument, LayerNotFound, NormsvcError, ResourceExhausted
from ..store.validation import validate_name
from ..wire import framing
from ..wire import messages as convert
from ..wire.packed import pack_stats, unpack_moments
from ..wire.tensors import DTYPE_CODES, Assembler, chunks, decode, decode_moments, encode_moments
from .allreduce import ReductionStreams, Rendezvous
from .limits import Limits, StreamBudget
from .watch import DELETED, WatchHub, follow

__all__ = ["NormServicer", "SERIALIZED_RESPONSES"]

#: Methods whose servicer answers the serialized response (bytes), so that a large
#: tensor is copied into the answer once (Normalize), or every rank of an AllReduceMoments
#: step sends the answer serialized once; serve() registers them with a pass-through serializer.
SERIALIZED_RESPONSES = ("Normalize", "AllReduceMoments", "AllReduceMomentsStream")
_Y_FIELD = pb.NormalizeResponse.DESCRIPTOR.fields_by_name["y"].number

#: Bytes a repeated message field adds to each entry's own: its tag and a length of up to 5 bytes.
_ENTRY_OVERHEAD = 6

#: Room AllReduceMoments leaves before the caller's deadline to answer DEADLINE_EXCEEDED itself.
DEADLINE_MARGIN = 0.05


def _unique(names, field: str, leaf: str = "") -> list:
    seen = set()
    for i, name in enumerate(names):
        if name in seen:
            raise InvalidArgument(f"{field}[{i}]{leaf} repeats layer {name!r}: expected each layer once",
                                  field=f"{field}[{i}]{leaf}", layer=name)
        seen.add(name)
    return list(names)


def _name(name: str, field: str) -> str:
    """A valid layer name, or InvalidArgument at ``field``, its path in the request."""
    try:
        return validate_name(name)
    except InvalidArgument as exc:
        exc.field = field
        raise


def _names(names, field: str, leaf: str = "") -> None:
    """Check every name up front, so that a bad one is reported at its path in the request
    (``names[1]``, ``updates[0].layer``) rather than as the store's ``name``."""
    for i, name in enumerate(names):
        try:
            validate_name(name)
        except InvalidArgument as exc:
            exc.field = f"{field}[{i}]{leaf}"
            raise


#: NormalizeStream has no ``x``: its dtype and shape come in the header, its bytes in chunks.
_STREAM_FIELDS = {"x": "header.shape", "x.shape": "header.shape", "x.dtype": "header.dtype", "x.data": "chunk"}


@contextlib.contextmanager
def _stream_fields():
    """Errors of Normalize's fields, at their NormalizeStreamRequest paths (``header.gamma``, ``chunk``)."""
    try:
        yield
    except NormsvcError as exc:
        old = exc.field
        if old and not (old == "chunk" or old.startswith("header")):
            exc.moved(_STREAM_FIELDS.get(old) or f"header.{old}")
        raise


@contextlib.contextmanager
def _config_fields():
    """Config errors at their CreateLayerRequest path (``config.epsilon``)."""
    try:
        yield
    except NormsvcError as exc:
        if exc.field and exc.field != "name" and not exc.field.startswith("config."):
            exc.field = f"config.{exc.field}"
        raise


def _step_key(request) -> dict:
    """update_many's step arguments from an UpdateStatsRequest (the store checks them)."""
    if request.HasField("step"):
        return {"step": request.step, "rank": request.rank, "world_size": request.world_size, "run": request.run}
    return {"rank": request.rank or None, "world_size": request.world_size or None, "run": request.run or None}


def _with_results(message, moments, stats):
    """A Normalize answer with its batch moments and new running statistics, where there are any."""
    if moments is not None:
        encode_moments(moments, message.batch_moments)
    if stats is not None:
        convert.stats_to_pb(stats, message.stats)
    return message


class _field_paths:
    """Store errors name fields relative to one layer's call (``moments.mean``); give them
    their path in the request (``updates[2].moments.mean``) for BadRequest violations.

    A class, not a contextlib generator: it wraps every AllReduceMoments and
    UpdateStats, and costs nothing until an error passes through it."""

    __slots__ = ("entries", "field")

    def __init__(self, entries, field: str):
        self.entries, self.field = entries, field

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if isinstance(exc, NormsvcError):
            index = {e.layer: i for i, e in enumerate(self.entries)}.get(exc.layer)
            if index is not None and (exc.field == "moments" or (exc.field or "").startswith("moments.")):
                exc.field = f"{self.field}[{index}].{exc.field}"


@contextlib.contextmanager
def _packed_paths(names):
    """Store errors about one layer's moments, named by the PackedMoments field that holds them
    (``packed.mean``; m2 travels as ``packed.variance``)."""
    try:
        yield
    except NormsvcError as exc:
        part = (exc.field or "").partition("moments.")[2] if exc.layer in names else ""
        if part or exc.field == "moments":
            exc.field = {"": "packed", "m2": "packed.variance"}.get(part, f"packed.{part}")
        raise


class _StepStats(dict):
    """What an AllReduceMoments step's ``reduce`` returns: {layer: RunningStats} after its update
    (empty without one), and ``answers``, the step's serialized answer by layer order, made by
    the last rank to arrive before the others wake, and shared by the ranks that meet in this
    process (they get this very object)."""

    __slots__ = ("answers",)

    def __init__(self, *args):
        super().__init__(*args)
        self.answers = {}


def _allreduce_answer(merged: dict, stats: dict) -> bytes:
    """The serialized AllReduceMomentsResponse: the merged moments (float64 and finite: written
    without the general codec's checks) and, with an update, the running statistics after it."""
    response = pb.AllReduceMomentsResponse()
    for name, m in merged.items():
        convert.moments_to_pb(name, m, response.global_moments.add())
        if name in stats:
            convert.stats_to_pb(stats[name], response.stats.add(layer=name).stats)
    return response.SerializeToString()


def _required(names, field: str) -> None:
    if not names:
        raise InvalidArgument(f"{field} is empty: expected at least one layer", field=field)


class NormServicer(pb_grpc.NormServiceServicer):
    def __init__(self, store, *, limits: Limits | None = None, hub: WatchHub | None = None,
                 rendezvous: Rendezvous | None = None, metrics=None, watch_poll: float = 2.0,
                 device: str = "cpu", stream_budget: StreamBudget | None = None,
                 reductions: ReductionStreams | None = None):
        self.store = store
        self.limits = limits or Limits()
        self.stream_budget = stream_budget or StreamBudget(self.limits.max_stream_bytes)
        self.hub = hub or WatchHub()
        self.rendezvous = rendezvous or Rendezvous()
        self.reductions = reductions or ReductionStreams()
        self.metrics = metrics
        self.watch_poll = watch_poll
        self._update_counters = {}
        # Layer.normalize's device argument, passed only off the CPU (resolved by serve())
        self._device = {} if device == "cpu" else {"device": device}

    # --- helpers ------------------------------------------------------------

    def _published(self, rpc: str, stats: dict, *, updates: bool = True) -> None:
        """Hand new versions to watchers; count running-statistics updates."""
        for name, s in stats.items():
            self.hub.publish(name, s)
        if updates and self.metrics is not None:
            for name in stats:
                counter = self._update_counters.get((name, rpc))
                if counter is None:  # labels() validates and locks: once per (layer, rpc)
                    counter = self._update_counters[name, rpc] = self.metrics.layer_updates.labels(name, rpc)
                counter.inc()

    def _check_names(self, names, field: str, suffix: str) -> None:
        """The layers one request names: at least one, within the limit, valid and unique."""
        _required(names, field)
        self.limits.check_layers_per_request(len(names), field)
        _names(names, field, suffix)
        _unique(names, field, suffix)

    def _moments(self, entries, field: str) -> dict:
        self._check_names([e.layer for e in entries], field, ".layer")
        max_el = self.limits.max_tensor_elements
        return {
            e.layer: decode_moments(e.moments, field=f"{field}[{i}].moments", max_elements=max_el)
            for i, e in enumerate(entries)
        }

    def _layer(self, name: str):
        return self.store.layer(name)

    # --- layer lifecycle -----------------------------------------------------

    def CreateLayer(self, request, context):
        kwargs = convert.config_kwargs(request.config)
        try:
            with _config_fields():
                declared = make_config(**kwargs).declared_shape
            if declared is not None:  # checked before the store allocates statistics of that shape
                field = "config.num_features" if request.config.num_features else "config.groups"
                self.limits.check_statistics(declared, field)
            self.store.layer(request.name)
        except LayerNotFound:
            self.limits.check_layer_count(len(self.store.list_layers(limit=self.limits.max_layers)))
        with _config_fields():
            layer = self.store.create_layer(request.name, **kwargs)
        response = pb.CreateLayerResponse()
        convert.layer_to_pb(layer.name, layer.config(), layer.stats(), response.layer)
        return response

    def GetLayer(self, request, context):
        _required(request.names, "names")
        self.limits.check_layers_per_request(len(request.names), "names")
        _names(request.names, "names")
        response = pb.GetLayerResponse()
        room = self.limits.max_answer_bytes  # refused before the answer outgrows a message
        for i, name in enumerate(request.names):
            layer = self.store.layer(name)
            entry = convert.layer_to_pb(name, layer.config(), layer.stats(), response.layers.add())
            room -= entry.ByteSize() + _ENTRY_OVERHEAD
            if room < 0:
                raise ResourceExhausted(
                    f"the answer for names[0:{i + 1}] outgrows the {self.limits.max_message_mb} MiB message "
                    f"limit: expected fewer layers per GetLayer (ask names[{i}:] in another call)",
                    field="names", reason="ANSWER_TOO_LARGE")
        return response

    def ListLayers(self, request, context):
        limits = self.limits
        if request.page_size < 0:
            raise InvalidArgument(f"page_size={request.page_size}: expected >= 0", field="page_size")
        size = min(request.page_size or limits.default_page_size, limits.max_page_size)
        after = None
        if request.page_token:
            try:
                after = base64.urlsafe_b64decode(request.page_token.encode()).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise InvalidArgument("page_token is not one this server issued: pass next_page_token "
                                      "of the previous page", field="page_token") from None
        names = self.store.list_layers(request.prefix, after=after, limit=size + 1)
        response = pb.ListLayersResponse()
        room, last = limits.max_answer_bytes, None  # a page ends before its encoding outgrows a message
        for name in names[:size]:
            try:
                layer = self.store.layer(name)
                config = layer.config()
                stats = layer.stats() if request.include_stats else None
            except LayerNotFound:  # deleted since the listing
                last = name
                continue
            entry = convert.layer_to_pb(name, config, stats, response.layers.add())
            room -= entry.ByteSize() + _ENTRY_OVERHEAD
            if room < 0 and len(response.layers) > 1:
                del response.layers[-1]  # the next page starts with it
                break
            last = name
        else:
            last = last if len(names) > size else None
        if last is not None:
            response.next_page_token = base64.urlsafe_b64encode(last.encode()).decode()
        return response

    def DeleteLayer(self, request, context):
        self.store.delete_layer(request.name)
        self.hub.publish(request.name, DELETED)
        return pb.DeleteLayerResponse()

    def ResetStats(self, request, context):
        stats = self._layer(request.name).reset(request_id=request.request_id or None)
        self._published("ResetStats", {request.name: stats}, updates=False)
        return pb.ResetStatsResponse(stats=convert.stats_to_pb(stats))

    # --- statistics ----------------------------------------------------------

    def UpdateStats(self, request, context):
        packed = request.HasField("packed")
        if packed:
            if request.updates:
                raise InvalidArgument(f"both updates (with {len(request.updates)} layer entries) and packed are set: "
                                      "expected one of them", field="packed")
            names = list(request.packed.layers)
            self._check_names(names, "packed.layers", "")
            updates = unpack_moments(request.packed, field="packed", max_elements=self.limits.max_tensor_elements)
            paths = _packed_paths(names)
        else:
            updates = self._moments(request.updates, "updates")
            paths = _field_paths(request.updates, "updates")
        step = _step_key(request)
        with paths:
            stats = self.store.update_many(updates, request_id=request.request_id or None, **step)
        # a contribution updates the statistics when its step is applied
        applied = not request.HasField("step") or all(
            s.last_step is not None and s.last_step >= request.step for s in stats.values())
        self._published("UpdateStats", stats, updates=applied)
        response = pb.UpdateStatsResponse()
        if packed:
            pack_stats({name: stats[name] for name in updates}, response.packed)
            return response
        for name in updates:
            entry = response.stats.add(layer=name)
            convert.stats_to_pb(stats[name], entry.stats)
        return response

    def AllReduceMomentsStream(self, request_iterator, context):
        # one AllReduceMoments per message, in order; the first error ends the stream with its status
        for request in self.reductions.messages(request_iterator, context):
            yield self.AllReduceMoments(request, context)

    def AllReduceMoments(self, request, context):
        wait = request.wait_seconds if request.HasField("wait_seconds") else None
        if wait is not None and not 0.0 < wait < math.inf:
            raise InvalidArgument(f"wait_seconds={wait!r}: expected a finite number of seconds > 0",
                                  field="wait_seconds")
        moments = self._moments(request.moments, "moments")
        update = not request.HasField("update_stats") or request.update_stats
        group, step = request.group, request.step
        if step < 0:
            raise InvalidArgument(f"step={step}: expected >= 0", field="step")
        if len(group) > 128:
            raise InvalidArgument(f"group has {len(group)} characters: expected at most 128", field="group")
        # a rank waits at most until its call's deadline (a stream's, if it has one), its wait_seconds and the
        # rendezvous's maximum; the deadline is read after the decoding, so that the wait ends before the caller
        # gives up however long the decoding took (the caller then hears why, and the slot is free at once)
        remaining = context.time_remaining()
        timeout = None if remaining is None else remaining - DEADLINE_MARGIN
        if wait is not None:
            timeout = wait if timeout is None else min(timeout, wait)

        def reduce(merged):
            stats = _StepStats()
            if update:
                # one contribution of world size 1: a step the run already applied is refused, never skipped
                stats.update(self.store.update_many(merged, step=step, rank=0, world_size=1, run=request.run))
                self._published("AllReduceMoments", stats)
            # the step's answer, serialized once before any waiting rank wakes: they all send these bytes
            stats.answers[tuple(merged)] = _allreduce_answer(merged, stats)
            return stats

        with _field_paths(request.moments, "moments"):
            merged, stats = self.rendezvous.join(
                (request.run, group), step, request.rank, request.world_size, moments,
                reduce=reduce, timeout=timeout, is_active=context.is_active, options=(update,),
            )
        # a rank that lists the layers in another order, or whose stats came from another replica
        # (no answers then), serializes its own
        answers = getattr(stats, "answers", None)
        raw = None if answers is None else answers.get(tuple(merged))
        return _allreduce_answer(merged, stats) if raw is None else raw

    def WatchLayer(self, request, context):
        _required(request.names, "names")
        self.limits.check_layers_per_request(len(request.names), "names")
        _names(request.names, "names")
        for name, stats in follow(self.store, self.hub, request.names, skip_initial=request.skip_initial,
                                  context=context, poll=self.watch_poll):
            yield pb.WatchLayerResponse(layer=name, stats=convert.stats_to_pb(stats))

    # --- compute -------------------------------------------------------------

    def _normalize(self, params, x, rpc):
        """Run the layer's normalize with ``params`` (a NormalizeRequest or a stream's header: layer,
        mode, update, gamma, beta, request_id); returns (y, batch Moments or None, RunningStats or None)."""
        name = params.layer
        training = convert.training(params.mode)
        update = training and (not params.HasField("update") or params.update)
        max_el = self.limits.max_tensor_elements
        gamma, beta = (decode(getattr(params, f), field=f, max_elements=max_el) if params.HasField(f) else None
                       for f in ("gamma", "beta"))
        layer = self._layer(name)
        y, moments = layer.normalize(x, training=training, update=update, gamma=gamma, beta=beta,
                                     request_id=params.request_id or None, return_moments=True, **self._device)
        stats = None
        if update and moments is not None:  # no moments: a frozen layer normalized with its running stats
            stats = layer.stats()
            self._published(rpc, {name: stats}, updates=not stats.frozen)
        return y, moments, stats

    def Normalize(self, request, context):
        """Answers the serialized NormalizeResponse (bytes: see :data:`SERIALIZED_RESPONSES`)."""
        _name(request.layer, "layer")
        if not request.HasField("x"):
            raise InvalidArgument("x is missing: expected a tensor", field="x")
        x = decode(request.x, field="x", max_elements=self.limits.max_tensor_elements)
        y, moments, stats = self._normalize(request, x, "Normalize")
        del x
        response = _with_results(pb.NormalizeResponse(), moments, stats)
        # y's bytes go into the answer once, not three times (Tensor, message, serialization)
        y = y.astype(y.dtype.newbyteorder("<"), copy=False)
        return framing.with_tensor(response.SerializeToString(), _Y_FIELD, y, DTYPE_CODES[y.dtype])

    def NormalizeStream(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("NormalizeStream: the first message must be a header", field="header")
        h = first.header
        _name(h.layer, "header.layer")
        with _stream_fields():
            x = Assembler(h.dtype, h.shape, field="x", max_elements=self.limits.max_tensor_elements)
        # x's buffer and y, reserved before either is allocated; given back however the stream ends
        what = f"NormalizeStream of {list(x.shape)} x {x.dtype.name} (x and y)"
        with self.stream_budget.reserve(2 * x.nbytes, field="header.shape", what=what):
            with _stream_fields():
                for i, msg in enumerate(request_iterator, start=1):
                    if msg.WhichOneof("part") != "chunk":
                        raise InvalidArgument(f"NormalizeStream message {i} is a {msg.WhichOneof('part')}: "
                                              "expected only chunks after the header", field="chunk")
                    x.add(msg.chunk)
                x = x.array()
                y, moments, stats = self._normalize(h, x, "NormalizeStream")
            del x
            result = _with_results(pb.NormalizeStreamResult(dtype=h.dtype, shape=y.shape), moments, stats)
            yield pb.NormalizeStreamResponse(result=result)
            for chunk in chunks(y, self.limits.stream_chunk_bytes):
                yield pb.NormalizeStreamResponse(chunk=chunk)

    # --- state ---------------------------------------------------------------

    def Freeze(self, request, context):
        stats = self._layer(request.name).freeze(request_id=request.request_id or None)
        self._published("Freeze", {request.name: stats}, updates=False)
        return pb.FreezeResponse(stats=convert.stats_to_pb(stats))

    def Unfreeze(self, request, context):
        stats = self._layer(request.name).unfreeze(request_id=request.request_id or None)
        self._published("Unfreeze", {request.name: stats}, updates=False)
        return pb.UnfreezeResponse(stats=convert.stats_to_pb(stats))

    def ExportStats(self, request, context):
        naming, dtype = convert.naming(request.naming), convert.export_dtype(request.dtype)
        _names(request.names, "names")
        with tempfile.TemporaryDirectory(prefix="normsvc-export-") as tmp:
            path = os.path.join(tmp, "stats.safetensors")
            layers = self.store.export(path, layers=list(request.names) or None, naming=naming,
                                       prefix=request.prefix, strip_prefix=request.strip_prefix, dtype=dtype)
            with open(path, "rb") as f:
                data = f.read()
        return pb.ExportStatsResponse(safetensors=data, layers=layers)

    def ImportStats(self, request, context):
        naming = convert.naming(request.naming)
        _names(request.names, "names")
        try:
            layers = self.store.import_(request.safetensors, naming=naming, layers=list(request.names) or None,
                                        add_prefix=request.add_prefix, max_layers=self.limits.max_layers)
        except NormsvcError as exc:  # the Store names its arguments; give them their request fields
            exc.field = {"path": "safetensors", "layers": "names"}.get(exc.field, exc.field)
            raise
        self._published("ImportStats", {name: self.store.layer(name).stats() for name in layers}, updates=False)
        return pb.ImportStatsResponse(layers=layers)
