"""The store facade (:class:`Store`, :class:`Layer`) and the backend interface.

All validation and all statistics live here and in :mod:`normsvc.running`;
a backend only keeps records and makes one read-modify-write atomic.  The
contract every backend honours:

* ``mutate(names, fn, request_id)`` reads the records of ``names``, calls
  ``fn(record)`` for each and writes every result, all or nothing, as one
  atomic step per call (one transaction).  ``fn`` returns the new record, or
  None for "nothing changes" (no write, no version bump), or raises to abort
  the whole call with nothing written.  ``fn`` is pure, so an optimistic
  backend may call it again after a conflict (Redis: ``WATCH`` the layer
  keys, read, compute, ``MULTI``/``EXEC``, retry on ``WatchError``).
* A layer that already applied ``request_id`` is skipped (``fn`` is not
  called, its current record is returned); each layer remembers the request
  ids of its last ``request_window`` versions, written in the same atomic
  step as the record.
* ``insert(record)`` stores a new layer unless the name exists, and returns
  what is stored (either way), atomically.
* A layer's config never changes after ``insert``: ``mutate`` only writes
  statistics (a backend may skip rewriting the config).

A new backend registers its URL scheme in :data:`BACKENDS` and provides
``from_url(url, **options)``.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

import numpy as np

from .. import ops
from ..moments import Moments
from ..plan import normalize_axes
from ..running import BatchStatistics, RunningStats, apply_update, batch_statistics, fold, initial_state
from .config import DEFAULT, LayerConfig, make_config, validate_name
from .errors import ConfigConflict, FrozenLayer, InvalidArgument, LayerNotFound, NoStatistics, StoreError

__all__ = [
    "Store",
    "Layer",
    "Backend",
    "Record",
    "new_record",
    "known_shape",
    "BACKENDS",
    "REQUEST_WINDOW",
    "encode_record",
    "decode_record",
]

#: Request ids a layer remembers: those of its last this-many versions.
REQUEST_WINDOW = 1024
MAX_REQUEST_ID_LENGTH = 256

#: URL scheme -> "module:Class" of the backend (imported on first use).
BACKENDS = {
    "memory": "normsvc.store.memory:MemoryBackend",
    "sqlite": "normsvc.store.sqlite:SqliteBackend",
}


@dataclass(frozen=True)
class Record:
    """What a backend stores per layer: its name, config and statistics."""

    name: str
    config: LayerConfig
    stats: RunningStats


def new_record(name: str, config: LayerConfig) -> Record:
    """A fresh layer at version 0: initial statistics, 0-d while the shape is still unknown."""
    stats = initial_state(config.convention, config.declared_shape or ())
    return Record(name, config, replace(stats, updated_at=time.time()))


def known_shape(record: Record) -> tuple | None:
    """The layer's statistics shape, or None while it waits for its first batch."""
    shape = record.stats.mean.shape
    return shape if len(shape) == record.config.stat_ndim else None


def _array_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


@functools.lru_cache(maxsize=1024)
def _config_json(config: LayerConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


@functools.lru_cache(maxsize=1024)
def _config_from_json(text: str) -> LayerConfig:
    return LayerConfig.from_dict(json.loads(text))


@functools.lru_cache(maxsize=64)
def _shape_from_json(text: str) -> tuple:
    return tuple(json.loads(text))


def encode_record(record: Record) -> dict:
    """Flat field dict (str, bytes, int, float) for row- or hash-shaped backends.

    Arrays travel as float64 little-endian bytes, the shape as JSON.
    """
    s = record.stats
    return {
        "config": _config_json(record.config),
        "shape": json.dumps(list(s.mean.shape)),
        "mean": _array_bytes(s.mean),
        "variance": _array_bytes(s.variance),
        "count": float(s.count),
        "num_batches": int(s.num_batches),
        "version": int(s.version),
        "frozen": int(bool(s.frozen)),
        "updated_at": float(s.updated_at),
    }


def decode_record(name: str, fields: Mapping) -> Record:
    """Inverse of :func:`encode_record`."""
    shape = _shape_from_json(fields["shape"])
    mean = np.frombuffer(fields["mean"], dtype="<f8").astype(np.float64).reshape(shape)
    variance = np.frombuffer(fields["variance"], dtype="<f8").astype(np.float64).reshape(shape)
    stats = RunningStats(
        mean,
        variance,
        float(fields["count"]),
        int(fields["num_batches"]),
        int(fields["version"]),
        bool(int(fields["frozen"])),
        float(fields["updated_at"]),
    )
    return Record(name, _config_from_json(fields["config"]), stats)


class Backend(ABC):
    """Where records live; see the module docstring for the contract."""

    request_window: int = REQUEST_WINDOW

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, **options) -> "Backend":
        """Open the backend a URL names."""

    @abstractmethod
    def insert(self, record: Record) -> Record:
        """Store ``record`` unless its name exists; return the stored record."""

    @abstractmethod
    def get(self, name: str) -> Record | None:
        """The record of ``name``, or None."""

    @abstractmethod
    def names(self, prefix: str = "", after: str | None = None, limit: int | None = None) -> list[str]:
        """Sorted layer names starting with ``prefix``, greater than ``after``, at most ``limit``."""

    @abstractmethod
    def delete(self, name: str) -> bool:
        """Remove a layer and its request ids; False if it did not exist."""

    @abstractmethod
    def mutate(
        self, names: Sequence[str], fn: Callable[[Record], Record | None], request_id: str | None
    ) -> dict[str, Record]:
        """Atomic read-modify-write of several layers; returns each layer's record afterwards.

        Raises LayerNotFound (nothing written) when a name does not exist.
        """

    def close(self) -> None:
        """Release connections."""


def _open_backend(url: str, options: dict) -> Backend:
    if not isinstance(url, str):
        raise InvalidArgument(f"store URL must be a string, got {type(url).__name__}", field="url")
    scheme = urlsplit(url).scheme
    if scheme == "rediss":
        scheme = "redis"
    target = BACKENDS.get(scheme)
    if target is None:
        raise InvalidArgument(
            f"store URL {url!r} has no known scheme: expected memory://, sqlite:///path/to/stats.db"
            + (" or redis://host:port/db" if "redis" in BACKENDS else ""),
            field="url",
        )
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls).from_url(url, **options)


def _request_id(request_id) -> str | None:
    if request_id is None:
        return None
    if not isinstance(request_id, str) or not request_id or len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(
            f"request_id={request_id!r}: expected None or a string of 1 to {MAX_REQUEST_ID_LENGTH} characters",
            field="request_id",
        )
    return request_id


def _all_finite(*arrays: np.ndarray) -> bool:
    """Whether every element of ``arrays`` is finite: one sum each (hot path), then
    elementwise only when a sum is not finite (NaN/Inf, or finite values that overflow)."""
    total = 0.0
    for a in arrays:
        total += float(np.add.reduce(a, axis=None))
    if math.isfinite(total):
        return True
    return all(bool(np.isfinite(a).all()) for a in arrays)


def _finite(moments: Moments, layer: str) -> None:
    if _all_finite(moments.count, moments.mean, moments.m2):
        return
    for field in ("count", "mean", "m2"):
        if not np.isfinite(getattr(moments, field)).all():
            raise InvalidArgument(f"moments.{field} contains NaN or Inf: expected finite values",
                                  layer=layer, field=f"moments.{field}")


def _batch(record: Record, moments) -> BatchStatistics:
    """Validate pushed moments against a layer; reduce them to its statistics shape."""
    name, cfg, shape = record.name, record.config, known_shape(record)
    if not isinstance(moments, Moments):
        raise InvalidArgument(
            f"moments for layer {name!r} must be normsvc.Moments, got {type(moments).__name__}",
            layer=name,
            field="moments",
        )
    _finite(moments, name)
    count = moments.count
    if count.ndim:
        if count.size == 0 or (count != count.flat[0]).any():
            raise InvalidArgument(
                f"moments.count for layer {name!r} differs between groups: the running statistics need "
                "one sample count per batch (a scalar)",
                layer=name,
                field="moments.count",
            )
        count = count.flat[0]
    if count <= 0:
        raise InvalidArgument(
            f"moments.count={float(count)!r} for layer {name!r}: expected a positive sample count",
            layer=name,
            field="moments.count",
        )
    if moments.m2.size and np.minimum.reduce(moments.m2, axis=None) < 0:
        raise InvalidArgument(
            f"moments.m2 for layer {name!r} has negative entries: expected variances >= 0",
            layer=name,
            field="moments.m2",
        )
    mean = moments.mean
    sample_ndim = mean.ndim if cfg.sample_ndim is None else cfg.sample_ndim
    if mean.ndim != sample_ndim + cfg.stat_ndim or mean.size == 0:
        layout = {
            "batch": f"one value per feature (rank {cfg.stat_ndim}, the kept axis {cfg.axis})",
            "instance": "shape (N, C): per sample and channel, as ops.instance_norm returns",
            "group": "shape (N, G): per sample and group, as ops.group_norm returns",
        }.get(cfg.kind, "any non-empty shape (per position, as ops returns)")
        raise InvalidArgument(
            f"moments for {cfg.kind} layer {name!r} have shape {mean.shape}: expected {layout}",
            layer=name,
            field="moments.mean",
        )
    features = mean.shape[sample_ndim:]
    expected = shape if shape is not None else cfg.declared_shape
    if expected is not None and features != expected:
        raise InvalidArgument(
            f"moments for layer {name!r} have statistics shape {features} (from {mean.shape}): "
            f"the layer keeps statistics of shape {expected}",
            layer=name,
            field="moments.mean",
        )
    if moments.count.ndim:
        moments = Moments(count, mean, moments.m2)
    batch = batch_statistics(moments, sample_ndim, pool=cfg.kind == "rms")
    if cfg.convention == "torch" and batch.unit_count <= 1:
        raise InvalidArgument(
            f"moments.count={batch.unit_count:g} per statistic for torch-convention layer {name!r}: "
            "the unbiased variance needs more than 1 value per channel (as torch requires in training)",
            layer=name,
            field="moments.count",
        )
    return batch


def _updated(record: Record, stats: RunningStats, now: float) -> Record:
    """``record`` with new statistics, one version on, stamped ``now``."""
    s = stats
    new = RunningStats(s.mean, s.variance, s.count, s.num_batches, record.stats.version + 1, s.frozen, now)
    return Record(record.name, record.config, new)


def _update_fn(moments, now: float) -> Callable[[Record], Record]:
    def fn(record: Record) -> Record:
        cfg, stats = record.config, record.stats
        if cfg.kind == "batch" and not stats.frozen and isinstance(moments, Moments) and known_shape(record) is not None:
            # the hot path: one compiled pass, or None and the checks below say what is wrong
            new = fold(stats, moments, convention=cfg.convention, momentum=cfg.momentum)
            if new is not None:
                return _updated(record, new, now)
        batch = _batch(record, moments)
        if stats.frozen:
            raise FrozenLayer(
                f"layer {record.name!r} is frozen and takes no updates: unfreeze it first",
                layer=record.name,
            )
        if known_shape(record) is None:
            fresh = initial_state(cfg.convention, batch.mean.shape)
            stats = replace(stats, mean=fresh.mean, variance=fresh.variance)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            new = apply_update(stats, batch, convention=cfg.convention, momentum=cfg.momentum)
        if not _all_finite(new.mean, new.variance):
            raise InvalidArgument(
                f"moments for layer {record.name!r} overflow the running statistics to Inf",
                layer=record.name,
                field="moments.mean",
            )
        return _updated(record, new, now)

    return fn


def _error_field(message: str, default: str = "x") -> str:
    head = message.replace("=", " ").split(" ", 1)[0]
    if head in ("mean", "variance"):  # the running statistics do not fit x
        return "x"
    return head if head in ("x", "gamma", "beta", "axis", "groups", "epsilon") else default


class Store:
    """Named layers with running statistics, over a backend chosen by URL.

    Open one with :meth:`Store.open`; it is safe to share between threads,
    and (sqlite, redis) between processes.

    Examples
    --------
    >>> import numpy as np, normsvc
    >>> store = Store.open("memory://")
    >>> bn = store.create_layer("bn", momentum=0.9)
    >>> x = np.array([[1.0, 2.0], [3.0, 6.0]])
    >>> bn.update(normsvc.ops.moments(x, axes=[0])).mean
    array([0.2, 0.4])
    >>> store.list_layers()
    ['bn']
    """

    def __init__(self, backend: Backend, url: str = ""):
        self._backend = backend
        self.url = url

    @classmethod
    def open(cls, url: str, **options) -> "Store":
        """Open a store.

        Parameters
        ----------
        url : str
            ``memory://`` (process-local), ``sqlite:///path/to/stats.db`` (the
            embedded default: WAL, one file shared by threads and processes;
            four slashes for an absolute path).
        **options
            Backend options; sqlite takes ``synchronous`` ("normal": an
            acknowledged update survives a crash of the process; "full": also
            a power loss), ``busy_timeout`` (seconds) and ``request_window``.
            They may also be given as URL query parameters.
        """
        return cls(_open_backend(url, options), url)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # --- layers -----------------------------------------------------------

    def create_layer(
        self,
        name: str,
        *,
        kind: str = "batch",
        axis=-1,
        groups: int | None = None,
        epsilon: float | None = None,
        momentum=DEFAULT,
        convention: str = "keras",
        center: bool = True,
        scale: bool = True,
        num_features=None,
    ) -> "Layer":
        """Create a layer, or return the existing one if its config is identical.

        Parameters
        ----------
        name : str
            Letters, digits and ``_ . - /`` (``/`` separates namespaces), at most 256 characters.
        kind : {"batch", "layer", "instance", "group", "rms"}
        axis : int or list of int
            As in the ops: the kept feature axes (batch), the channel axis
            (instance, group), the normalized axes (layer, rms).
        groups : int, optional
            Group norm only; default 32 (Keras), -1 for one group per channel.
        epsilon : float, optional
            Default per convention: keras and cumulative 1e-3, torch 1e-5.
        momentum : float or None, optional
            Default per convention: keras 0.99, torch 0.1; with convention
            "torch", None is torch's cumulative moving average; "cumulative"
            takes none.
        convention : {"keras", "torch", "cumulative"}
            How batches fold into the running statistics (see :mod:`normsvc.running`).
        center, scale : bool
            Whether :meth:`Layer.normalize` accepts ``beta`` / ``gamma``.
        num_features : int or tuple, optional
            The statistics shape (see :mod:`normsvc.store.config`); left out,
            it is learned from the first batch (group, layer and rms layers
            know it from their config).

        Raises
        ------
        InvalidArgument
            Bad name or config.
        ConfigConflict
            The name holds a layer with a different config.
        """
        validate_name(name)
        config = make_config(
            kind=kind,
            axis=axis,
            groups=groups,
            epsilon=epsilon,
            momentum=momentum,
            convention=convention,
            center=center,
            scale=scale,
            num_features=num_features,
        )
        stored = self._backend.insert(new_record(name, config))
        if stored.config != config and not stored.config.matches(config, known_shape(stored)):
            raise ConfigConflict(
                f"layer {name!r} exists with config {stored.config.to_dict()}: "
                f"cannot create it again with {config.to_dict()} (delete it first, or use another name)",
                layer=name,
            )
        return Layer(self, name)

    def layer(self, name: str) -> "Layer":
        """A handle on an existing layer; LayerNotFound if there is none."""
        self._record(name)
        return Layer(self, name)

    def list_layers(self, prefix: str = "", *, after: str | None = None, limit: int | None = None) -> list[str]:
        """Sorted names of the layers starting with ``prefix``.

        ``after`` and ``limit`` page through them: pass the last name of one
        page as ``after`` of the next.
        """
        if not isinstance(prefix, str):
            raise InvalidArgument(f"prefix must be a string, got {type(prefix).__name__}", field="prefix")
        if after is not None and not isinstance(after, str):
            raise InvalidArgument(f"after must be a string or None, got {after!r}", field="after")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidArgument(f"limit={limit!r}: expected None or a positive int", field="limit")
        return self._backend.names(prefix, after, limit)

    def delete_layer(self, name: str) -> None:
        """Delete a layer, its statistics and its request ids; LayerNotFound if absent."""
        validate_name(name)
        if not self._backend.delete(name):
            raise LayerNotFound(f"no layer named {name!r} to delete", layer=name)

    # --- statistics -------------------------------------------------------

    def update_many(self, updates: Mapping, *, request_id: str | None = None) -> dict[str, RunningStats]:
        """Push one batch's moments to several layers in one transaction.

        All layers update or none does (any invalid moments, unknown or frozen
        layer aborts the whole call); each layer's version grows by one.
        A layer that already applied ``request_id`` is left as it is.

        Returns
        -------
        dict
            Layer name -> its RunningStats after the call.
        """
        if not isinstance(updates, Mapping):
            raise InvalidArgument(
                f"updates must be a mapping of layer name to Moments, got {type(updates).__name__}",
                field="updates",
            )
        for name in updates:
            validate_name(name)
        request_id = _request_id(request_id)
        if not updates:
            return {}
        now = time.time()
        fns = {name: _update_fn(m, now) for name, m in updates.items()}
        out = self._backend.mutate(list(updates), lambda r: fns[r.name](r), request_id)
        return {name: out[name].stats for name in updates}

    def export(self, path, layers=None, naming: str = "keras", *, dtype: str = "float64") -> list[str]:
        """Write running statistics to a safetensors file; see :mod:`normsvc.store.safetensors_io`."""
        from .safetensors_io import export_stats

        return export_stats(self, path, layers=layers, naming=naming, dtype=dtype)

    def import_(self, path, naming: str = "keras", *, layers=None) -> list[str]:
        """Load running statistics from a safetensors file; see :mod:`normsvc.store.safetensors_io`."""
        from .safetensors_io import import_stats

        return import_stats(self, path, naming=naming, layers=layers)

    # --- for Layer and the io module -------------------------------------

    def _record(self, name: str) -> Record:
        validate_name(name)
        record = self._backend.get(name)
        if record is None:
            raise LayerNotFound(f"no layer named {name!r}: create it with create_layer first", layer=name)
        return record

    def _mutate(self, names, fn, request_id=None) -> dict[str, Record]:
        return self._backend.mutate(names, fn, _request_id(request_id))


class Layer:
    """A handle on one named layer of a :class:`Store`.

    The handle holds only the name: every call reads the current state, so
    handles in many threads or processes see each other's updates.

    Training and inference (``normalize``), as Keras ``BatchNormalization``:

    * ``training=True``: normalize with the batch statistics and fold them
      into the running statistics (one update), unless ``update=False``;
    * ``training=False``: normalize with the running statistics;
    * a frozen layer always normalizes with its running statistics and takes
      no update, even with ``training=True`` (Keras ``trainable=False``).

    Inference reads ``RunningStats.mean``/``variance`` as they are stored: the
    unbiased running variance for torch layers (as torch's ``eval()``), the
    biased one for keras and cumulative layers.  Instance and group layers
    broadcast their per-channel / per-group statistics to every sample; layer
    norm uses its scalar running mean and variance for every position, rms
    norm the running mean square ``variance + mean**2`` (its running variance
    pools all samples, so that this is the running mean of ``x**2``).
    """

    def __init__(self, store: Store, name: str):
        self._store = store
        self.name = name

    def __repr__(self) -> str:
        return f"Layer({self.name!r})"

    @property
    def config(self) -> LayerConfig:
        return self._store._record(self.name).config

    def stats(self) -> RunningStats:
        """The current running statistics."""
        return self._store._record(self.name).stats

    def update(self, moments: Moments, *, request_id: str | None = None) -> RunningStats:
        """Fold one batch's moments into the running statistics; returns the new statistics.

        ``moments`` are what the ops return for this kind (see
        :mod:`normsvc.store.config`).  Raises FrozenLayer on a frozen layer and
        InvalidArgument for NaN/Inf, negative counts or m2, or a shape other
        than the layer's; nothing changes then.  A repeated ``request_id``
        changes nothing and returns the current statistics.
        """
        fn = _update_fn(moments, time.time())
        return self._store._mutate([self.name], fn, request_id)[self.name].stats

    def freeze(self, *, request_id: str | None = None) -> RunningStats:
        """Stop updates; normalize with the running statistics (no-op if already frozen)."""
        return self._set_frozen(True, request_id)

    def unfreeze(self, *, request_id: str | None = None) -> RunningStats:
        """Accept updates again (no-op if not frozen)."""
        return self._set_frozen(False, request_id)

    def _set_frozen(self, frozen: bool, request_id) -> RunningStats:
        now = time.time()

        def fn(record: Record) -> Record | None:
            if record.stats.frozen == frozen:
                return None
            return _updated(record, replace(record.stats, frozen=frozen), now)

        return self._store._mutate([self.name], fn, request_id)[self.name].stats

    def reset(self, *, request_id: str | None = None) -> RunningStats:
        """Back to the initial statistics (keras/torch: mean 0, variance 1; cumulative: empty).

        Keeps the config, the learned shape and the frozen flag.
        """
        now = time.time()

        def fn(record: Record) -> Record:
            fresh = initial_state(record.config.convention, record.stats.mean.shape)
            return _updated(record, replace(fresh, frozen=record.stats.frozen), now)

        return self._store._mutate([self.name], fn, request_id)[self.name].stats

    def normalize(self, x, *, training: bool, update: bool = True, gamma=None, beta=None,
                  request_id: str | None = None, return_moments: bool = False, device: str = "auto"):
        """Normalize ``x`` as this layer; returns ``y`` (same shape and dtype as ``x``).

        With ``return_moments=True`` returns ``(y, moments)``: the batch
        :class:`~normsvc.moments.Moments` that normalized ``x`` in training
        mode (what the ops return for this kind, pushed to the running
        statistics unless ``update=False``), or None when the running
        statistics did (inference mode, or a frozen layer).

        Parameters
        ----------
        x : array of float16, float32 or float64
        training : bool
            Batch statistics (and one running update) or running statistics.
        update : bool
            With ``training=True``, whether to fold the batch into the running statistics.
        gamma, beta : array, optional
            Scale and offset as the ops take them (per channel, or per
            normalized element for layer/rms); refused when the layer was
            created with ``scale=False`` / ``center=False``.  rms takes no beta.
        request_id : str, optional
            Makes the running update (if any) idempotent.
        return_moments : bool
            Also return the batch moments (None when none were used).
        device : {"auto", "cpu", "cuda"}
            Where the kernels run, as in :mod:`normsvc.ops` (``"cuda"`` normalizes a
            host array on the GPU; y comes back like x).
        """
        if not isinstance(training, (bool, np.bool_)):
            raise InvalidArgument(f"training must be a bool, got {training!r}", field="training")
        record = self._store._record(self.name)
        cfg = record.config
        if gamma is not None and not cfg.scale:
            raise InvalidArgument(f"layer {self.name!r} has scale=False: pass no gamma", layer=self.name, field="gamma")
        if beta is not None and (not cfg.center or cfg.kind == "rms"):
            why = "rms norm has no offset" if cfg.kind == "rms" else "it has center=False"
            raise InvalidArgument(f"layer {self.name!r} takes no beta: {why}", layer=self.name, field="beta")
        if training and not record.stats.frozen:
            y, moments = self._op(cfg, x, gamma, beta, device)
            if not update:
                return (y, moments) if return_moments else y
            try:
                self.update(moments, request_id=request_id)
                return (y, moments) if return_moments else y
            except FrozenLayer:
                record = self._store._record(self.name)  # frozen meanwhile: as if it had been all along
            except InvalidArgument as exc:
                if exc.field == "request_id":
                    raise
                raise InvalidArgument(f"x {np.shape(x)} does not fit the layer: {exc}", layer=self.name,
                                      field="x") from exc
        y = self._infer(record, x, gamma, beta, device)
        return (y, None) if return_moments else y

    # --- helpers ----------------------------------------------------------

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StoreError:
            raise
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(str(exc), layer=self.name, field=_error_field(str(exc))) from exc

    def _op(self, cfg: LayerConfig, x, gamma, beta, device):
        eps = cfg.epsilon
        if cfg.kind == "batch":
            return self._call(ops.batch_norm, x, axis=_axis_arg(cfg.axis), epsilon=eps, gamma=gamma, beta=beta, device=device)
        if cfg.kind == "layer":
            return self._call(ops.layer_norm, x, axis=_axis_arg(cfg.axis), epsilon=eps, gamma=gamma, beta=beta, device=device)
        if cfg.kind == "rms":
            return self._call(ops.rms_norm, x, axis=_axis_arg(cfg.axis), epsilon=eps, gamma=gamma, device=device)
        if cfg.kind == "instance":
            return self._call(ops.instance_norm, x, axis=cfg.axis, epsilon=eps, gamma=gamma, beta=beta, device=device)
        return self._call(ops.group_norm, x, groups=cfg.groups, axis=cfg.axis, epsilon=eps, gamma=gamma, beta=beta, device=device)

    def _infer(self, record: Record, x, gamma, beta, device) -> np.ndarray:
        cfg, stats = record.config, record.stats
        if cfg.convention == "cumulative" and stats.count == 0:
            raise NoStatistics(
                f"cumulative layer {self.name!r} has no samples yet: push moments (or normalize with "
                "training=True) before normalizing in inference mode",
                layer=self.name,
            )
        # Before its first batch a lazily shaped layer holds 0-d initial values: they broadcast.
        mean, var = stats.mean, stats.variance
        eps = cfg.epsilon
        if cfg.kind == "batch":
            return self._call(ops.batch_norm, x, axis=_axis_arg(cfg.axis), epsilon=eps, gamma=gamma, beta=beta,
                              mean=mean, variance=var, device=device)[0]
        if cfg.kind == "layer":
            return self._call(ops.layer_norm, x, axis=_axis_arg(cfg.axis), epsilon=eps, gamma=gamma, beta=beta,
                              mean=mean, variance=var, device=device)[0]
        if cfg.kind == "rms":
            return self._rms_infer(cfg, x, gamma, mean, var, device)
        x_arr = x if hasattr(x, "ndim") else np.asarray(x)
        if x_arr.ndim < 2:
            raise InvalidArgument(
                f"x has rank {x_arr.ndim}: {cfg.kind} norm needs a batch axis and a channel axis",
                layer=self.name, field="x",
            )
        (ch,) = self._call(normalize_axes, cfg.axis, x_arr.ndim)
        n, channels = x_arr.shape[0], x_arr.shape[ch]
        groups = channels if cfg.kind == "instance" or cfg.groups == -1 else cfg.groups
        if mean.ndim and mean.shape != (groups,):
            what = "channels" if groups == channels else f"groups ({cfg.groups} groups of {channels} channels)"
            raise InvalidArgument(
                f"x has {groups} {what} along axis {cfg.axis}: layer {self.name!r} keeps statistics "
                f"of shape {mean.shape}",
                layer=self.name, field="x",
            )
        mean, var = np.broadcast_to(mean, (n, groups)), np.broadcast_to(var, (n, groups))
        if cfg.kind == "instance":
            return self._call(ops.instance_norm, x, axis=cfg.axis, epsilon=eps, gamma=gamma, beta=beta,
                              mean=mean, variance=var, device=device)[0]
        return self._call(ops.group_norm, x, groups=cfg.groups, axis=cfg.axis, epsilon=eps, gamma=gamma,
                          beta=beta, mean=mean, variance=var, device=device)[0]

    def _rms_infer(self, cfg: LayerConfig, x, gamma, mean, var, device) -> np.ndarray:
        x_arr = x if hasattr(x, "ndim") else np.asarray(x)
        if x_arr.ndim == 0:
            raise InvalidArgument("x is a scalar: expected an array of rank >= 1", layer=self.name, field="x")
        axes = self._call(normalize_axes, cfg.axis, x_arr.ndim)
        scale = None
        if gamma is not None:
            expected = tuple(x_arr.shape[a] for a in axes)
            g = np.asarray(gamma, dtype=np.float64)
            if g.size != int(np.prod(expected)) or tuple(s for s in g.shape if s != 1) != tuple(
                s for s in expected if s != 1
            ):
                raise InvalidArgument(
                    f"gamma has shape {g.shape}: expected {expected} (one value per element of the "
                    f"normalized axes {list(axes)})",
                    layer=self.name, field="gamma",
                )
            scale = g.reshape([x_arr.shape[i] if i in axes else 1 for i in range(x_arr.ndim)])
        mean_square = float(var + mean * mean)
        return self._call(ops.normalize, x, 0.0, mean_square, scale=scale, epsilon=cfg.epsilon, device=device)


def _axis_arg(axis):
    return list(axis) if isinstance(axis, tuple) else axis
