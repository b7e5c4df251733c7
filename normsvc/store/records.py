"""What a backend stores per layer (:class:`Record`) and its versioned codec.

Row- and hash-shaped backends keep a record as the flat fields of
:func:`encode_record`: the config as JSON, the statistics as float64
little-endian bytes with their shape as JSON, and the counters.

Storage formats (:data:`FORMAT` is the one written; sqlite also keeps it in
``PRAGMA user_version``):

1. The config JSON is the bare :meth:`LayerConfig.to_dict` dict (normsvc up
   to the store split; sqlite's user_version was left at 0).
2. The config JSON is ``{"format": 2, "config": {...}}``: every record names
   its format, so a backend without a file-wide version (a Redis hash) can
   tell formats apart too.
3. Step contributions: ``steps`` (JSON: run, last_step, incomplete, ended,
   origin) and ``pending`` (the open contributions, bytes of
   :func:`normsvc.store.steps.encode_pending`).  Older records have none.
4. Batch renormalization and virtual batches: the config may hold
   ``renorm``, ``renorm_clipping``, ``renorm_momentum`` and
   ``virtual_batch_size``; ``renorm`` holds moving_stddev, renorm_mean and
   renorm_stddev (float64 bytes, one after the other, each of the mean's
   shape), empty for a layer without renorm.  Older records have neither.

Reading upgrades older formats one step at a time (:data:`UPGRADES`), as
torch's ``_load_from_state_dict`` fills what old checkpoints lack; a format
newer than :data:`FORMAT` is refused with FailedPrecondition rather than
misread.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from ..config import LayerConfig, make_config
from ..errors import FailedPrecondition, InvalidArgument
from ..running import RunningStats, initial_state
from .steps import Steps, decode_pending, encode_pending

__all__ = [
    "FORMAT",
    "UPGRADES",
    "Record",
    "new_record",
    "known_shape",
    "check_format",
    "encode_config",
    "decode_config",
    "encode_record",
    "decode_record",
]

#: The storage format this code writes.
FORMAT = 4


@dataclass(frozen=True)
class Record:
    """What a backend stores per layer: its name, config, statistics and step state."""

    name: str
    config: LayerConfig
    stats: RunningStats
    steps: Steps = Steps()

    def report(self) -> RunningStats:
        """The statistics as callers see them: with the run and the last step applied."""
        s = self.stats
        if (s.run, s.last_step) == (self.steps.run, self.steps.last_step):
            return s
        return s.evolve(run=self.steps.run, last_step=self.steps.last_step)


def new_record(name: str, config: LayerConfig) -> Record:
    """A fresh layer at version 0: initial statistics, 0-d while the shape is still unknown."""
    stats = initial_state(config.convention, config.declared_shape or (), renorm=config.renorm)
    return Record(name, config, replace(stats, updated_at=time.time()))


def known_shape(record: Record) -> tuple | None:
    """The layer's statistics shape, or None while it waits for its first batch."""
    shape = record.stats.mean.shape
    return shape if len(shape) == record.config.stat_ndim else None


def check_format(found, where: str, field: str | None = None) -> int:
    """``found`` if this code reads that format; FailedPrecondition (naming ``where``) if not."""
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise FailedPrecondition(f"{where} has storage format {found!r}: expected an integer from 1 to {FORMAT}",
                                 field=field)
    if found > FORMAT:
        raise FailedPrecondition(
            f"{where} has storage format {found}, newer than this normsvc reads (formats 1 to {FORMAT}): "
            "open it with the normsvc that wrote it, or a newer one",
            field=field,
        )
    return found


def _from_format_1(config: dict) -> dict:
    return {"format": 2, "config": config}


def _from_format_2(data: dict) -> dict:
    return {**data, "format": 3}  # the config is unchanged; records of format 2 have no step state


def _from_format_3(data: dict) -> dict:
    return {**data, "format": 4}  # the config is unchanged; records of format 3 have no renorm state


#: format n -> the function lifting a decoded config JSON from format n to n + 1.
UPGRADES = {1: _from_format_1, 2: _from_format_2, 3: _from_format_3}


@functools.lru_cache(maxsize=1024)
def encode_config(config: LayerConfig) -> str:
    """The config JSON of the current format."""
    return json.dumps({"format": FORMAT, "config": config.to_dict()}, sort_keys=True)


@functools.lru_cache(maxsize=1024)
def decode_config(text: str) -> LayerConfig:
    """A config JSON of any format up to :data:`FORMAT`, checked as ``create_layer`` checks one.

    Every way in validates a config before storing it; this catches state
    written otherwise (an older normsvc, a hand-edited file): such a layer is
    FailedPrecondition to every call, with a message that says what to do,
    instead of an internal error.
    """
    data = json.loads(text)
    version = check_format(data.get("format", 1), "a stored layer config")
    for step in range(version, FORMAT):
        data = UPGRADES[step](data)
    try:
        config = LayerConfig.from_dict(data["config"])
        if make_config(**config.to_dict()) == config:
            return config
        problem = "it differs from what create_layer resolves for it"
    except (InvalidArgument, TypeError, ValueError, KeyError) as exc:
        problem = str(exc)
    raise FailedPrecondition(f"the stored config is invalid ({problem}): expected one create_layer accepts; "
                             "delete the layer and create it again", field="config")


@functools.lru_cache(maxsize=64)
def _shape_from_json(text: str) -> tuple:
    return tuple(json.loads(text))


def _array_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<f8").tobytes()


def _array(data: bytes, shape: tuple) -> np.ndarray:
    """A new writable array (``astype`` copies out of the read-only bytes): the caller owns it."""
    return np.frombuffer(data, dtype="<f8").astype(np.float64).reshape(shape)


def encode_record(record: Record) -> dict:
    """Flat field dict (str, bytes, int, float) for row- or hash-shaped backends."""
    s = record.stats
    return {
        "config": encode_config(record.config),
        "shape": json.dumps(list(s.mean.shape)),
        "mean": _array_bytes(s.mean),
        "variance": _array_bytes(s.variance),
        "count": float(s.count),
        "num_batches": int(s.num_batches),
        "version": int(s.version),
        "frozen": int(bool(s.frozen)),
        "updated_at": float(s.updated_at),
        "steps": _steps_json(record.steps),
        "pending": encode_pending(record.steps.pending) if record.steps.pending else b"",
        "renorm": b"".join(map(_array_bytes, s.renorm)) if s.renorm is not None else b"",
    }


def _steps_json(steps: Steps) -> str:
    return json.dumps({"run": steps.run, "last_step": steps.last_step, "incomplete": steps.incomplete,
                       "ended": list(steps.ended), "origin": steps.origin})


def _steps(fields: Mapping) -> Steps:
    """The step state of a record's fields (records of formats 1 and 2 have none)."""
    text = fields.get("steps")
    if not text:
        return Steps()
    d = json.loads(text)
    return Steps(d["run"], d["last_step"], d["incomplete"], tuple(d["ended"]),
                 decode_pending(fields.get("pending") or b""), d["origin"])


def _renorm(data: bytes, shape: tuple) -> dict:
    """Renorm's three arrays from a record's ``renorm`` bytes (none for records without renorm)."""
    if not data:
        return {}
    size = len(data) // 3
    parts = [_array(data[i * size:(i + 1) * size], shape) for i in range(3)]
    return dict(zip(("moving_stddev", "renorm_mean", "renorm_stddev"), parts))


def decode_record(name: str, fields: Mapping) -> Record:
    """Inverse of :func:`encode_record`, for fields written in any format up to :data:`FORMAT`."""
    shape = _shape_from_json(fields["shape"])
    stats = RunningStats(
        _array(fields["mean"], shape),
        _array(fields["variance"], shape),
        float(fields["count"]),
        int(fields["num_batches"]),
        int(fields["version"]),
        bool(int(fields["frozen"])),
        float(fields["updated_at"]),
        **_renorm(fields.get("renorm") or b"", shape),
    )
    try:
        config = decode_config(fields["config"])
    except FailedPrecondition as exc:
        exc.layer, exc.message = name, f"layer {name!r}: {exc.message}"
        raise
    return Record(name, config, stats, _steps(fields))
