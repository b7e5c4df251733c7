"""Validation at the store's edge: names, request ids, pushed moments, written statistics.

Everything a caller hands the store passes through here before any backend
sees it, so a rejected request changes nothing.  Each error names the
argument at fault (``field``) and the layer (``layer``), says what was wrong
and what was expected.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Mapping

import numpy as np
import xxhash
from numba import njit

from ..moments import Moments
from ..running import BatchStatistics, RunningStats, batch_statistics
from ..config import LayerConfig, make_config, step_arguments
from ..errors import InvalidArgument
from .steps import StepKey

__all__ = [
    "positive_int",
    "step_key",
    "request_digest",
    "MAX_NAME_LENGTH",
    "MAX_REQUEST_ID_LENGTH",
    "MAX_NUM_BATCHES",
    "validate_name",
    "request_id",
    "mapping",
    "all_finite",
    "batch",
    "config_from_mapping",
    "count",
    "num_batches",
    "running_values",
]

MAX_NAME_LENGTH = 256
MAX_REQUEST_ID_LENGTH = 256
#: num_batches is stored as a signed 64-bit integer (SQLite INTEGER, torch's int64 num_batches_tracked).
MAX_NUM_BATCHES = 2**63 - 1
# one regex, one pass: non-empty parts of [A-Za-z0-9_.-] between '/', none exactly '.' or '..'
_PART = r"(?!\.{1,2}(?:/|$))[A-Za-z0-9_.\-]+"
_NAME = re.compile(rf"{_PART}(?:/{_PART})*")


def validate_name(name) -> str:
    """A layer name: 1 to 256 ASCII letters, digits and ``_ . - /``.

    Names are opaque keys that ``/`` splits into namespace parts
    (``encoder/block1/bn``): every part is non-empty (no leading, trailing
    or doubled ``/``) and none is ``.`` or ``..``, which read as paths and
    are refused rather than resolved.  So ``team/`` + anything is a name
    inside the namespace ``team/``, and a token scoped to the prefix
    ``team/`` (:mod:`normsvc.server.auth`) reaches exactly those names.
    Dots inside a part are fine (``layer1.0.bn1``, ``..x``).
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"layer name must be a string, got {type(name).__name__}", field="name")
    # a model's layer names come with every request: each plain str is checked once (a str subclass
    # may compare or hash as it likes, so it is checked every time)
    return _checked_name(name) if type(name) is str else _check_name(name)


def _check_name(name: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"layer name has {len(name)} characters: expected 1 to {MAX_NAME_LENGTH}", field="name"
        )
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"layer name {name!r} is not valid: expected letters, digits and '_', '.', '-', "
            "with '/' only between non-empty namespace parts other than '.' and '..' (e.g. 'encoder/block1/bn')",
            field="name",
        )
    return name


_checked_name = functools.lru_cache(maxsize=4096)(_check_name)


def request_id(value) -> str | None:
    """None, or an idempotency key of 1 to 256 characters."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(
            f"request_id={value!r}: expected None or a string of 1 to {MAX_REQUEST_ID_LENGTH} characters",
            field="request_id",
        )
    return value


def positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgument(f"{field}={value!r}: expected a positive int", field=field)
    return int(value)


def step_key(step, rank, world_size, run) -> StepKey | None:
    """The contribution's key, or None for a plain update (see :func:`normsvc.config.step_arguments`)."""
    checked = step_arguments(step, rank, world_size, run)
    return None if checked is None else StepKey(*checked)


#: The first byte of a request digest; a remembered digest without it (16 bytes: an older normsvc's
#: blake2b) cannot be compared and counts as unknown (see backend.is_retry).
DIGEST_VERSION = b"\x02"


#: How a scalar has always been digested: np.ascontiguousarray makes it an array of shape (1,).
_SCALAR = struct.pack("<2q", 1, 1)
_F8 = np.dtype("<f8")


def _array_parts(arrays) -> list:
    """Per array its rank and shape (int64), then its float64 values: what a digest covers."""
    out = []
    for a in arrays:
        if type(a) is np.float64:  # a scalar count
            out += (_SCALAR, struct.pack("<d", a))
            continue
        if type(a) is not np.ndarray or a.dtype != _F8 or not a.ndim or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype="<f8")
        out.append(struct.pack(f"<{a.ndim + 1}q", a.ndim, *a.shape))
        out.append(a.data)
    return out


def request_digest(what: str, key: StepKey | None, values: Mapping) -> bytes:
    """What a request id is bound to: the kind of call, its step key and every layer's values.

    17 bytes: :data:`DIGEST_VERSION` and the XXH3 128-bit hash of the content
    (an identity check between a request and its retry, not a security
    boundary: any client may send any content under its own ids).
    """
    parts = [f"{what}|{tuple(key) if key else ''}".encode()]
    for name in sorted(values):
        parts.append(b"\0" + name.encode() + b"\0")
        v = values[name]
        if isinstance(v, Moments):
            parts += _array_parts((v.count, v.mean, v.m2))
        elif isinstance(v, tuple):
            parts += _array_parts(v)
        # anything else is refused by the call's own checks before it changes a thing
    return DIGEST_VERSION + xxhash.xxh3_128_digest(b"".join(parts))


def mapping(value, field: str, of: str) -> Mapping:
    """``value`` if it is a mapping of layer names to ``of``, with every name valid."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{field} must be a mapping of layer name to {of}, got {type(value).__name__}",
                              field=field)
    for name in value:
        validate_name(name)
    return value


def all_finite(*arrays: np.ndarray) -> bool:
    """Whether every element of ``arrays`` is finite.

    One sum per array on the hot path; elementwise only when a sum is not
    finite (NaN/Inf, or finite values whose sum overflows).
    """
    total = 0.0
    for a in arrays:
        total += float(np.add.reduce(a, axis=None))
    if math.isfinite(total):
        return True
    return all(bool(np.isfinite(a).all()) for a in arrays)


def _finite_moments(moments: Moments, layer: str) -> None:
    if all_finite(moments.count, moments.mean, moments.m2):
        return
    for part in ("count", "mean", "m2"):
        if not np.isfinite(getattr(moments, part)).all():
            raise InvalidArgument(f"moments.{part} contains NaN or Inf: expected finite values",
                                  layer=layer, field=f"moments.{part}")


def _one_count(moments: Moments, layer: str):
    """The batch's sample count: a scalar, or per-group counts that all agree."""
    count = moments.count
    if count.ndim:
        if count.size == 0 or (count != count.flat[0]).any():
            raise InvalidArgument(
                f"moments.count for layer {layer!r} differs between groups: the running statistics need "
                "one sample count per batch (a scalar)",
                layer=layer, field="moments.count",
            )
        count = count.flat[0]
    if count <= 0:
        raise InvalidArgument(f"moments.count={float(count)!r} for layer {layer!r}: expected a positive sample count",
                              layer=layer, field="moments.count")
    return count


def _layout(cfg: LayerConfig) -> str:
    """What the moments of one batch look like for this layer, for messages."""
    if cfg.sample_ndim == 0:  # the statistics shape itself
        return f"{cfg.norm.moments} (rank {cfg.stat_ndim}, the kept axis {cfg.axis})"
    return cfg.norm.moments


def _sample_ndim(cfg: LayerConfig, mean: np.ndarray, layer: str) -> int:
    """Leading axes of ``mean`` that are samples (averaged away); checks the rank."""
    sample_ndim = mean.ndim if cfg.sample_ndim is None else cfg.sample_ndim
    if mean.ndim != sample_ndim + cfg.stat_ndim or mean.size == 0:
        layout = _layout(cfg)
        raise InvalidArgument(f"moments for {cfg.kind} layer {layer!r} have shape {mean.shape}: expected {layout}",
                              layer=layer, field="moments.mean")
    return sample_ndim


def plain_batch(cfg: LayerConfig, shape: tuple | None, moments, *, whole: bool = True) -> bool:
    """Whether :func:`batch` would accept ``moments`` without a word, told fast for the common
    case (per-feature moments with one scalar count, of the layer's known shape); False means
    "not known to be fine": :func:`batch` then decides and names any problem."""
    if cfg.sample_ndim != 0 or shape is None or type(moments) is not Moments:
        return False
    count, mean, m2 = moments.count, moments.mean, moments.m2
    if count.ndim or mean.shape != shape or not mean.size:
        return False
    k = float(count)
    if not 0.0 < k < math.inf or (whole and cfg.convention == "torch" and k <= 1.0):
        return False
    return _finite_and_nonnegative(mean.reshape(-1), m2.reshape(-1))


@njit(cache=True, nogil=False)
def _finite_and_nonnegative(mean, m2):  # pragma: no cover - compiled
    """Whether every mean is finite and every m2 finite and >= 0."""
    for i in range(mean.size):
        if not (math.isfinite(mean[i]) and 0.0 <= m2[i] < math.inf):
            return False
    return True


def batch(name: str, cfg: LayerConfig, shape: tuple | None, moments, *, whole: bool = True) -> BatchStatistics:
    """Check pushed moments against a layer and reduce them to its statistics shape.

    Parameters
    ----------
    name : str
    cfg : LayerConfig
        The layer's name and config.
    shape : tuple or None
        The layer's statistics shape, None while it waits for its first batch.
    moments : Moments
        What the ops return for this kind (see :mod:`normsvc.config`).
    """
    if not isinstance(moments, Moments):
        raise InvalidArgument(f"moments for layer {name!r} must be normsvc.Moments, got {type(moments).__name__}",
                              layer=name, field="moments")
    _finite_moments(moments, name)
    count = _one_count(moments, name)
    if moments.m2.size and np.minimum.reduce(moments.m2, axis=None) < 0:
        raise InvalidArgument(f"moments.m2 for layer {name!r} has negative entries: expected variances >= 0",
                              layer=name, field="moments.m2")
    mean = moments.mean
    sample_ndim = _sample_ndim(cfg, mean, name)
    features = mean.shape[sample_ndim:]
    expected = shape if shape is not None else cfg.declared_shape
    if expected is not None and features != expected:
        raise InvalidArgument(
            f"moments for layer {name!r} have statistics shape {features} (from {mean.shape}): "
            f"the layer keeps statistics of shape {expected}",
            layer=name, field="moments.mean",
        )
    if moments.count.ndim:
        moments = Moments(count, mean, moments.m2)
    stats = batch_statistics(moments, sample_ndim, pool=not cfg.norm.centered)
    # torch needs more than one value per channel in the whole batch; one rank's share may hold one
    if whole and cfg.convention == "torch" and stats.unit_count <= 1:
        raise InvalidArgument(
            f"moments.count={stats.unit_count:g} per statistic for torch-convention layer {name!r}: "
            "the unbiased variance needs more than 1 value per channel (as torch requires in training)",
            layer=name, field="moments.count",
        )
    return stats


# --- statistics written as they are (Store.put_stats, imports) ----------------

_CONFIG_KEYS = ("kind", "axis", "groups", "epsilon", "momentum", "convention", "center", "scale", "num_features",
                "renorm", "renorm_clipping", "renorm_momentum", "virtual_batch_size")


def config_from_mapping(value, layer: str) -> LayerConfig:
    """A config given as a dict (``LayerConfig.to_dict``): the same checks as ``create_layer``.

    Keys are ``create_layer``'s arguments; a key left out takes its default.
    """
    if isinstance(value, LayerConfig):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"config of layer {layer!r} is a {type(value).__name__}: expected a mapping of "
                              f"create_layer arguments ({', '.join(_CONFIG_KEYS)})", layer=layer, field="config")
    unknown = sorted(str(k) for k in value if k not in _CONFIG_KEYS)
    if unknown:
        raise InvalidArgument(f"config of layer {layer!r} has unknown keys {unknown}: expected only "
                              f"{', '.join(_CONFIG_KEYS)}", layer=layer, field="config")
    try:
        return make_config(**value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"config of layer {layer!r}: {exc.message}", layer=layer, field=exc.field) from None


def count(value, layer: str, field: str = "count") -> float:
    """A sample count: a finite real number >= 0."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidArgument(f"{field} of layer {layer!r} is {value!r}: expected a number >= 0",
                              layer=layer, field=field)
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument(f"{field}={value!r} for layer {layer!r}: expected a finite number >= 0",
                              layer=layer, field=field)
    return float(value)


def num_batches(value, layer: str, field: str = "num_batches") -> int:
    """A batch count: an integer in [0, 2**63)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(f"{field} of layer {layer!r} is {value!r}: expected an integer >= 0",
                              layer=layer, field=field)
    if not 0 <= value <= MAX_NUM_BATCHES:
        raise InvalidArgument(f"{field}={value!r} for layer {layer!r}: expected an integer in [0, 2**63)",
                              layer=layer, field=field)
    return int(value)


def _real_array(value, layer: str, field: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise InvalidArgument(f"{field} of layer {layer!r} has dtype {arr.dtype}: expected real numbers",
                              layer=layer, field=field)
    arr = np.array(arr, dtype=np.float64)  # a copy: the store never aliases the caller's array
    if not np.isfinite(arr).all():
        raise InvalidArgument(f"{field} of layer {layer!r} has NaN or Inf: expected finite values",
                              layer=layer, field=field)
    return arr


def running_values(name: str, stats) -> RunningStats:
    """Check statistics written as they are; returns them as float64 RunningStats.

    Only ``mean``, ``variance``, ``count``, ``num_batches`` and renorm's
    arrays of ``stats`` are read; whether the shape fits the layer is for
    the write to check.
    """
    if not isinstance(stats, RunningStats):
        raise InvalidArgument(f"statistics for layer {name!r} must be normsvc.RunningStats, got "
                              f"{type(stats).__name__}", layer=name, field="stats")
    mean = _real_array(stats.mean, name, "stats.mean")
    variance = _real_array(stats.variance, name, "stats.variance")
    if mean.shape != variance.shape:
        raise InvalidArgument(f"layer {name!r}: mean shape {mean.shape} differs from variance shape "
                              f"{variance.shape}: expected equal shapes", layer=name, field="stats.variance")
    if (variance < 0).any():
        raise InvalidArgument(f"layer {name!r} has negative variances: expected variances >= 0",
                              layer=name, field="stats.variance")
    renorm = {}
    if stats.renorm is not None:
        for field, value in zip(("moving_stddev", "renorm_mean", "renorm_stddev"), stats.renorm):
            renorm[field] = _real_array(value, name, f"stats.{field}")
            if renorm[field].shape != mean.shape:
                raise InvalidArgument(f"layer {name!r}: {field} shape {renorm[field].shape} differs from mean "
                                      f"shape {mean.shape}: expected equal shapes", layer=name, field=f"stats.{field}")
        for field in ("moving_stddev", "renorm_stddev"):
            if (renorm[field] < 0).any():
                raise InvalidArgument(f"layer {name!r} has a negative {field}: expected values >= 0", layer=name,
                                      field=f"stats.{field}")
    return RunningStats(mean, variance, count(stats.count, name, "stats.count"),
                        num_batches(stats.num_batches, name, "stats.num_batches"), **renorm)
