"""protobuf messages <-> store values (LayerConfig, RunningStats, layers, enums).

Shared by the server (store values -> responses, requests -> store calls) and
the client (responses -> store values); it imports nothing from either, and
not grpc.  Only translation: defaults and validation belong to the store
(:func:`normsvc.config.make_config`), which sees an unset proto field
as an argument left out.  Errors are the store's ``InvalidArgument`` (the
server maps it to INVALID_ARGUMENT).
"""

from __future__ import annotations

import math

import numpy as np

from .._proto import normsvc_pb2 as pb
from ..errors import InvalidArgument
from .. import norms
from ..moments import Moments
from ..running import RunningStats
from ..config import LayerConfig, make_config
from .tensors import DTYPES, decode, encode

__all__ = [
    "KINDS",
    "CONVENTIONS",
    "put_f64",
    "moments_to_pb",
    "param_to_pb",
    "config_kwargs",
    "config_to_pb",
    "config_from_pb",
    "stats_to_pb",
    "stats_from_pb",
    "layer_to_pb",
    "naming",
    "naming_code",
    "training",
    "mode_code",
    "export_dtype",
    "export_dtype_code",
]

#: LayerKind -> kind: LAYER_KIND_<KIND> for every kind of the norm table
KINDS = {pb.LayerKind.Value(f"LAYER_KIND_{kind.upper()}"): kind for kind in norms.KINDS}
CONVENTIONS = {
    pb.CONVENTION_KERAS: "keras",
    pb.CONVENTION_TORCH: "torch",
    pb.CONVENTION_CUMULATIVE: "cumulative",
}
NAMINGS = {pb.NAMING_UNSPECIFIED: "keras", pb.NAMING_KERAS: "keras", pb.NAMING_TORCH: "torch"}
EXPORT_DTYPES = {
    pb.DTYPE_UNSPECIFIED: "float64",
    pb.DTYPE_FLOAT64: "float64",
    pb.DTYPE_FLOAT32: "float32",
}
_KIND_CODES = {v: k for k, v in KINDS.items()}
_CONVENTION_CODES = {v: k for k, v in CONVENTIONS.items()}
_NAMING_CODES = {"keras": pb.NAMING_KERAS, "torch": pb.NAMING_TORCH}
_EXPORT_DTYPE_CODES = {"float64": pb.DTYPE_FLOAT64, "float32": pb.DTYPE_FLOAT32}


def _enum(value: int, table: dict, enum, field: str) -> str | None:
    """None for UNSPECIFIED (the store default), the store's name otherwise."""
    if value == 0:
        return None
    if value not in table:
        raise InvalidArgument(
            f"{field}={value}: expected one of {', '.join(enum.Name(v) for v in table)}", field=field
        )
    return table[value]


def config_kwargs(cfg: pb.LayerConfig, field: str = "config") -> dict:
    """``Store.create_layer`` keyword arguments for a LayerConfig message (unset fields left out)."""
    kw = {}
    kind = _enum(cfg.kind, KINDS, pb.LayerKind, f"{field}.kind")
    if kind is not None:
        kw["kind"] = kind
    convention = _enum(cfg.convention, CONVENTIONS, pb.Convention, f"{field}.convention")
    if convention is not None:
        kw["convention"] = convention
    if len(cfg.axis) == 1:
        kw["axis"] = cfg.axis[0]
    elif cfg.axis:
        kw["axis"] = list(cfg.axis)
    for name in ("groups", "epsilon", "center", "scale"):
        if cfg.HasField(name):
            kw[name] = getattr(cfg, name)
    if cfg.cumulative_average:
        if cfg.HasField("momentum"):
            raise InvalidArgument(
                f"{field}: cumulative_average=true with momentum={cfg.momentum}: expected one of them",
                field=f"{field}.momentum",
            )
        kw["momentum"] = None
    elif cfg.HasField("momentum"):
        kw["momentum"] = cfg.momentum
    if cfg.num_features:
        kw["num_features"] = tuple(cfg.num_features)
    if cfg.renorm:
        kw["renorm"] = True
        kw["renorm_clipping"] = {key: getattr(cfg, f"renorm_{key}") for key in ("rmin", "rmax", "dmax")
                                 if cfg.HasField(f"renorm_{key}")}
        if cfg.HasField("renorm_momentum"):
            kw["renorm_momentum"] = cfg.renorm_momentum
    else:
        for name in ("renorm_rmin", "renorm_rmax", "renorm_dmax", "renorm_momentum"):
            if cfg.HasField(name):
                raise InvalidArgument(f"{field}.{name} is set without renorm: expected renorm=true, or the "
                                      f"field unset", field=f"{field}.{name}")
    if cfg.HasField("virtual_batch_size"):
        kw["virtual_batch_size"] = cfg.virtual_batch_size
    return kw


def config_to_pb(config: LayerConfig, out: pb.LayerConfig) -> pb.LayerConfig:
    """The resolved config as a message (every optional field set)."""
    out.kind = _KIND_CODES[config.kind]
    out.axis[:] = list(config.axis) if isinstance(config.axis, tuple) else [config.axis]
    if config.groups is not None:
        out.groups = config.groups
    out.epsilon = config.epsilon
    if config.momentum is not None:
        out.momentum = config.momentum
    out.cumulative_average = config.momentum is None and config.convention == "torch"
    out.convention = _CONVENTION_CODES[config.convention]
    out.center = config.center
    out.scale = config.scale
    if config.num_features is not None:
        out.num_features[:] = config.num_features
    if config.renorm:
        out.renorm = True
        out.renorm_momentum = config.renorm_momentum
        for key, value in config.renorm_clipping.items():
            setattr(out, f"renorm_{key}", value)
    if config.virtual_batch_size is not None:
        out.virtual_batch_size = config.virtual_batch_size
    return out


def put_f64(array: np.ndarray, out: pb.Tensor) -> None:
    """A float64 array into a Tensor message without the general codec's checks, one copy
    (the store's statistics are float64 and finite; the server validates what clients send)."""
    out.dtype = pb.DTYPE_FLOAT64
    out.shape[:] = array.shape
    out.data = np.asarray(array, dtype="<f8").tobytes()


def moments_to_pb(name: str, moments, out: pb.LayerMoments) -> pb.LayerMoments:
    """One layer's entry of an UpdateStats or AllReduceMoments request."""
    if not isinstance(moments, Moments):
        raise InvalidArgument(
            f"moments for layer {name!r} must be normsvc.Moments, got {type(moments).__name__}",
            layer=name, field="moments",
        )
    out.layer = name
    count, m2 = moments.count, moments.m2
    msg = out.moments
    put_f64(count, msg.count)
    put_f64(moments.mean, msg.mean)
    # Moments.variance without its errstate context: m2 / count, 0 for empty groups
    put_f64(np.divide(m2, count, out=np.zeros(m2.shape), where=count > 0), msg.variance)
    return out


def param_to_pb(value, field: str, out: pb.Tensor) -> pb.Tensor:
    """An affine parameter (gamma, beta) as a Tensor: float arrays as they are, numbers as float64."""
    a = np.asarray(value)
    if a.dtype.kind not in "fV" or a.dtype.newbyteorder("<") not in DTYPES.values():
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError):
            raise InvalidArgument(f"{field} must be a numeric array, got {type(value).__name__}",
                                  field=field) from None
    return encode(a, out)


def _f64(t: pb.Tensor, field: str) -> np.ndarray:
    """A float64 array you may modify, from a Tensor message."""
    data, shape = t.data, tuple(t.shape)
    if t.dtype == pb.DTYPE_FLOAT64 and len(data) == 8 * math.prod(shape):
        return np.frombuffer(data, dtype="<f8").reshape(shape).astype(np.float64)
    return np.array(decode(t, field=field, finite=False), dtype=np.float64)


def stats_to_pb(stats: RunningStats, out: pb.RunningStats | None = None) -> pb.RunningStats:
    out = pb.RunningStats() if out is None else out
    if stats.mean is not None:
        put_f64(stats.mean, out.mean)
        put_f64(stats.variance, out.variance)
    out.count = float(stats.count)
    out.num_batches = int(stats.num_batches)
    out.version = int(stats.version)
    out.frozen = bool(stats.frozen)
    nanos = int(round(stats.updated_at * 1e9))
    out.updated_at.seconds, out.updated_at.nanos = divmod(nanos, 1_000_000_000)
    out.run = stats.run
    if stats.last_step is not None:
        out.last_step = stats.last_step
    if stats.renorm is not None:
        for name, array in zip(_RENORM_FIELDS, stats.renorm):
            put_f64(array, getattr(out, name))
    return out


_RENORM_FIELDS = ("moving_stddev", "renorm_mean", "renorm_stddev")


def stats_from_pb(msg: pb.RunningStats) -> RunningStats:
    """A RunningStats message -> :class:`RunningStats` (float64 arrays you may modify)."""
    mean = variance = None
    if msg.HasField("mean"):
        mean, variance = _f64(msg.mean, "stats.mean"), _f64(msg.variance, "stats.variance")
    renorm = {}
    if msg.HasField("renorm_mean"):
        renorm = {name: _f64(getattr(msg, name), f"stats.{name}") for name in _RENORM_FIELDS}
    return RunningStats(
        mean, variance, float(msg.count), int(msg.num_batches), int(msg.version), bool(msg.frozen),
        msg.updated_at.seconds + msg.updated_at.nanos * 1e-9, msg.run,
        msg.last_step if msg.HasField("last_step") else None, **renorm,
    )


def config_from_pb(msg: pb.LayerConfig) -> LayerConfig:
    """A resolved LayerConfig message -> :class:`LayerConfig`, equal to the server store's."""
    return make_config(**config_kwargs(msg))


def layer_to_pb(name: str, config: LayerConfig, stats: RunningStats | None, out: pb.Layer) -> pb.Layer:
    out.name = name
    config_to_pb(config, out.config)
    if stats is not None:
        stats_to_pb(stats, out.stats)
    return out


def naming(value: int, field: str = "naming") -> str:
    name = NAMINGS.get(value)
    if name is None:
        raise InvalidArgument(f"{field}={value}: expected NAMING_KERAS or NAMING_TORCH", field=field)
    return name


def naming_code(name) -> int:
    """'keras' or 'torch' -> the Naming enum."""
    if name not in _NAMING_CODES:
        raise InvalidArgument(f"naming={name!r}: expected 'keras' or 'torch'", field="naming")
    return _NAMING_CODES[name]


def export_dtype_code(name) -> int:
    """'float64' or 'float32' -> the DType of an export."""
    if name not in _EXPORT_DTYPE_CODES:
        raise InvalidArgument(f"dtype={name!r}: expected 'float64' or 'float32'", field="dtype")
    return _EXPORT_DTYPE_CODES[name]


def mode_code(training: bool) -> int:
    return pb.MODE_TRAINING if training else pb.MODE_INFERENCE


def export_dtype(value: int, field: str = "dtype") -> str:
    name = EXPORT_DTYPES.get(value)
    if name is None:
        raise InvalidArgument(f"{field}={value}: expected DTYPE_FLOAT32 or DTYPE_FLOAT64", field=field)
    return name


def training(mode: int, field: str = "mode") -> bool:
    if mode == pb.MODE_TRAINING:
        return True
    if mode == pb.MODE_INFERENCE:
        return False
    raise InvalidArgument(f"{field}={pb.Mode.Name(mode) if mode in pb.Mode.values() else mode}: "
                          "expected MODE_TRAINING or MODE_INFERENCE", field=field)
