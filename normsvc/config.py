"""Layer configurations: validated once, at the edge, and shared by the Store and the Client.

A :class:`LayerConfig` is what ``Store.create_layer`` stores: the kind of
norm, its axes, the update convention with its momentum and epsilon, and
optionally the statistics shape.  Omitted momentum and epsilon resolve to the
convention's defaults here, so two configs compare equal exactly when they
behave the same.

Statistics shape per kind (the shape of ``RunningStats.mean``):

=========  =========================================  =====================
kind       moments pushed (``ops.<kind>_norm``)        running statistics
=========  =========================================  =====================
batch      per feature, the kept ``axis`` shape        the same
instance   (N, C)                                      (C,): averaged over N
group      (N, G)                                      (G,): averaged over N
layer      per position of the kept axes, any shape    (): averaged over all
rms        per position of the kept axes, any shape    (): pooled over all
=========  =========================================  =====================

A batch layer with ``virtual_batch_size`` (tf.keras' ghost batches) takes
moments per virtual batch, shape ``(B / v, *features)``, and averages them
over the virtual batches as tf.keras does (the mean of the means and of the
variances): its moments are per sample of that leading axis, like instance
norm's.  ``renorm`` (tf.keras' batch renormalization) keeps three more
per-feature statistics next to the moving mean and variance (see
:mod:`normsvc.running`).

"Averaged over N" is what torch's ``InstanceNorm(track_running_stats=True)``
does: the batch statistic is the mean of the per-instance means and of the
per-instance variances (unbiased with each instance's own count, for the torch
convention).  The cumulative convention instead pools every sample of every
instance (the population statistics of the channel, spread between instances
included).  RMS layers pool in every convention, so that the running
``variance + mean**2`` is the running mean of ``x**2``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from . import norms
from .errors import InvalidArgument
from .running import CONVENTIONS, DEFAULTS, RunningStats

__all__ = ["DEFAULT", "LayerConfig", "LayerInfo", "make_config", "default_axis", "default_run", "step_arguments",
           "RUN_VARIABLES"]

class _Default:
    """Marks an argument left out, where None is itself a meaningful value."""

    def __repr__(self) -> str:
        return "<default>"

    def __reduce__(self):
        return "DEFAULT"


#: Sentinel for "use the convention's default" (``momentum=None`` means torch's cumulative average).
DEFAULT = _Default()


@dataclass(frozen=True)
class LayerConfig:
    """A validated layer configuration (build it with :func:`make_config`).

    ``axis`` is an int or a tuple of ints; ``num_features`` is the statistics
    shape as a tuple, or None when it is learned from the first batch.
    """

    kind: str = "batch"
    axis: int | tuple = -1
    groups: int | None = None
    epsilon: float = 1e-3
    momentum: float | None = 0.99
    convention: str = "keras"
    center: bool = True
    scale: bool = True
    num_features: tuple | None = None
    renorm: bool = False
    renorm_rmin: float | None = None
    renorm_rmax: float | None = None
    renorm_dmax: float | None = None
    renorm_momentum: float | None = None
    virtual_batch_size: int | None = None

    @property
    def renorm_clipping(self) -> dict:
        """tf.keras' ``renorm_clipping``: the bounds set among rmin, rmax and dmax."""
        bounds = {"rmin": self.renorm_rmin, "rmax": self.renorm_rmax, "dmax": self.renorm_dmax}
        return {key: value for key, value in bounds.items() if value is not None}

    @property
    def norm(self) -> norms.Norm:
        """The kind's entry in the table of norms."""
        return norms.NORMS[self.kind]

    @functools.cached_property  # read on every update: computed once per config
    def sample_ndim(self) -> int | None:
        """Leading axes of the pushed moments that are averaged away (None: all of them)."""
        return 1 if self.virtual_batch_size is not None else self.norm.sample_ndim

    @functools.cached_property  # read on every update: computed once per config
    def stat_ndim(self) -> int:
        """Rank of the running statistics."""
        return self.norm.stat_ndim(self.axis)

    @property
    def declared_shape(self) -> tuple | None:
        """The statistics shape known from the config alone, or None (learned from the first batch)."""
        if self.num_features is not None:
            return self.num_features
        return self.norm.declared_shape(self.axis, self.groups)

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists); :meth:`from_dict` inverts it."""
        d = asdict(self)
        if isinstance(self.axis, tuple):
            d["axis"] = list(self.axis)
        if self.num_features is not None:
            d["num_features"] = list(self.num_features)
        for key in _CLIPPING:
            del d[f"renorm_{key}"]
        if self.renorm:
            d["renorm_clipping"] = self.renorm_clipping
        else:  # tf.keras' options appear only where set
            del d["renorm"], d["renorm_momentum"]
        if self.virtual_batch_size is None:
            del d["virtual_batch_size"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerConfig":
        d = dict(d)
        for key, value in (d.pop("renorm_clipping", None) or {}).items():
            d[f"renorm_{key}"] = value
        if isinstance(d.get("axis"), list):
            d["axis"] = tuple(d["axis"])
        if d.get("num_features") is not None:
            d["num_features"] = tuple(d["num_features"])
        return cls(**d)

    def differences(self, other: "LayerConfig", known_shape: tuple | None) -> list[str]:
        """How a create with ``other`` differs from this layer (which has ``known_shape``), in words.

        Empty when it is the same layer: ``num_features`` left out of ``other``
        matches any shape.
        """
        known = known_shape if known_shape is not None else self.num_features
        have = asdict(self) | {"num_features": known}
        want = asdict(other) | {"num_features": known if other.num_features is None else other.num_features}
        return [f"{key} is {have[key]!r}, not {want[key]!r}" for key in have if have[key] != want[key]]

    def matches(self, other: "LayerConfig", known_shape: tuple | None) -> bool:
        """Whether a create with ``other`` is the same layer as this one (see :meth:`differences`)."""
        return not self.differences(other, known_shape)


class LayerInfo(NamedTuple):
    """A layer's name, config and statistics (``describe`` of a Store or a Client)."""

    name: str
    config: LayerConfig
    stats: RunningStats | None


#: The bounds of tf.keras' ``renorm_clipping``.
_CLIPPING = ("rmin", "rmax", "dmax")


def _int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgument(f"{field} must be an int, got {value!r}", field=field)
    return int(value)


#: Environment variables that name the current training run, the same on every rank of it
#: (first set one wins): normsvc's own, torchrun's (a fresh id with --standalone or --rdzv-id),
#: Slurm's job and step.
RUN_VARIABLES = ("NORMSVC_RUN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


def default_run() -> str:
    """The run a step contribution belongs to when the caller names none.

    ``NORMSVC_RUN`` if set, else the launcher's job id (``TORCHELASTIC_RUN_ID``
    unless torchrun left it at "none"; ``SLURM_JOB_ID`` with
    ``SLURM_STEP_ID``), else "" (the default run: a rerun that reuses its step
    numbers is refused until the layer is reset or the run is named).
    """
    import os

    for name in RUN_VARIABLES:
        value = os.environ.get(name, "")
        if value and value != "none":
            step = os.environ.get("SLURM_STEP_ID", "") if name == "SLURM_JOB_ID" else ""
            return f"{value}.{step}" if step else value
    return ""


#: Largest step number (int64 on the wire) and world size; longest run id.
MAX_STEP = 2**62
MAX_WORLD_SIZE = 1 << 20
MAX_RUN_LENGTH = 256


def _int_in(value, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InvalidArgument(f"{field}={value!r}: expected an int from {low} to {high}", field=field)
    return int(value)


def step_arguments(step, rank, world_size, run) -> tuple | None:
    """A step contribution's ``(run, step, rank, world_size)``, checked; None for a plain update.

    Shared by the Store and the Client (which checks before sending, since
    the wire cannot tell ``rank=0`` from no rank).  ``run`` left out is
    :func:`default_run` of this process.
    """
    if step is None and rank is None and world_size is None:
        if run is not None:
            raise InvalidArgument("run without step: expected step, rank and world_size with it", field="run")
        return None
    given = {"step": step, "rank": rank, "world_size": world_size}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise InvalidArgument(
            f"a step contribution needs step, rank and world_size: {', '.join(missing)} missing", field=missing[0])
    world_size = _int_in(world_size, "world_size", 1, MAX_WORLD_SIZE)
    rank = _int_in(rank, "rank", 0, world_size - 1)
    step = _int_in(step, "step", 0, MAX_STEP)
    run = default_run() if run is None else run
    if not isinstance(run, str) or len(run) > MAX_RUN_LENGTH:
        raise InvalidArgument(f"run={run!r}: expected a string of at most {MAX_RUN_LENGTH} characters",
                              field="run")
    return run, step, rank, world_size


def default_axis(kind: str, convention: str) -> int:
    """The axis a layer gets when ``axis`` is left out: PyTorch's channel dim 1 for the torch
    convention's batch, instance and group norms, the last axis otherwise (Keras, and torch's
    ``normalized_shape`` of trailing dims for layer and rms norm)."""
    return 1 if convention == "torch" and norms.NORMS[kind].axis_role != "normalized" else -1


def _axis(value, kind: str):
    if norms.NORMS[kind].axis_role == "channel":
        axis = _int(value, "axis")
        if axis == 0:
            raise InvalidArgument(
                f"axis=0 is the batch axis: {kind} norm needs the channel axis (e.g. 1 or -1)", field="axis"
            )
        return axis
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    try:
        if isinstance(value, (str, bytes, dict)):  # iterable, but not a list of axes
            raise TypeError
        items = tuple(_int(a, "axis") for a in value)
    except (TypeError, InvalidArgument):
        raise InvalidArgument(f"axis must be an int or a list of ints, got {value!r}", field="axis") from None
    if not items:
        raise InvalidArgument("axis is an empty list: expected at least one axis", field="axis")
    if len(set(items)) != len(items):
        raise InvalidArgument(f"axis={list(items)} names an axis twice", field="axis")
    return items[0] if len(items) == 1 else items


def _num_features(value, stat_ndim: int):
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        shape = (int(value),)
    else:
        try:
            shape = tuple(_int(s, "num_features") for s in value)
        except TypeError:
            raise InvalidArgument(
                f"num_features must be an int or a shape (tuple of ints), got {value!r}", field="num_features"
            ) from None
    if any(s < 1 for s in shape):
        raise InvalidArgument(f"num_features={value!r}: expected positive sizes", field="num_features")
    if len(shape) != stat_ndim:
        raise InvalidArgument(
            f"num_features={value!r} has rank {len(shape)}: this layer keeps statistics of rank {stat_ndim}",
            field="num_features",
        )
    return shape


def make_config(
    *,
    kind="batch",
    axis=DEFAULT,
    groups=None,
    epsilon=None,
    momentum=DEFAULT,
    convention="keras",
    center=True,
    scale=True,
    num_features=None,
    renorm=False,
    renorm_clipping=None,
    renorm_momentum=None,
    virtual_batch_size=None,
) -> LayerConfig:
    """Validate ``create_layer`` arguments and resolve the convention's defaults.

    Left out, ``axis`` is the channel dim 1 under the torch convention (batch,
    instance and group norm) and -1 otherwise (see :func:`default_axis`);
    momentum and epsilon are the convention's (``running.DEFAULTS``).
    """
    entry = norms.norm(kind)
    if convention not in CONVENTIONS:
        raise InvalidArgument(
            f"convention={convention!r}: expected one of {', '.join(CONVENTIONS)}", field="convention"
        )
    default_momentum, default_epsilon = DEFAULTS[convention]
    axis = _axis(default_axis(kind, convention) if axis is DEFAULT else axis, kind)

    if entry.grouped:
        groups = norms.DEFAULT_GROUPS if groups is None else _int(groups, "groups")
        if groups < 1 and groups != -1:
            raise InvalidArgument(
                f"groups={groups}: expected a positive number of groups, or -1 for one per channel", field="groups"
            )
    elif groups is not None:
        raise InvalidArgument(f"groups={groups!r} is only meaningful for kind='group', not {kind!r}", field="groups")

    if epsilon is None or epsilon is DEFAULT:
        epsilon = default_epsilon
    try:
        epsilon = float(epsilon)
    except (TypeError, ValueError):
        raise InvalidArgument(f"epsilon must be a number, got {epsilon!r}", field="epsilon") from None
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise InvalidArgument(f"epsilon={epsilon!r}: expected a finite number >= 0", field="epsilon")

    if momentum is DEFAULT:
        momentum = default_momentum
    elif momentum is None:
        if convention == "keras":
            raise InvalidArgument(
                "momentum=None (a cumulative average) does not exist in the keras convention: "
                "use convention='torch' with momentum=None, or convention='cumulative'",
                field="momentum",
            )
    elif convention == "cumulative":
        raise InvalidArgument(
            f"momentum={momentum!r} with convention='cumulative': a cumulative merge has no momentum, omit it",
            field="momentum",
        )
    if momentum is not None:
        try:
            momentum = float(momentum)
        except (TypeError, ValueError):
            raise InvalidArgument(f"momentum must be a number or None, got {momentum!r}", field="momentum") from None
        if not (0.0 <= momentum <= 1.0):
            raise InvalidArgument(f"momentum={momentum!r}: expected a number in [0, 1]", field="momentum")

    for flag, value in (("center", center), ("scale", scale)):
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidArgument(f"{flag} must be a bool, got {value!r}", field=flag)

    extras = _keras_extras(kind, convention, renorm, renorm_clipping, renorm_momentum, virtual_batch_size)
    cfg = LayerConfig(kind, axis, groups, epsilon, momentum, convention, bool(center), bool(scale), None, **extras)
    shape = _num_features(num_features, cfg.stat_ndim)
    declared = cfg.declared_shape
    if shape is not None and declared is not None and shape != declared:
        raise InvalidArgument(
            f"num_features={num_features!r} contradicts the {kind} layer's statistics shape {declared}",
            field="num_features",
        )
    return LayerConfig(kind, axis, groups, epsilon, momentum, convention, bool(center), bool(scale), shape,
                       **extras)


def _keras_extras(kind, convention, renorm, clipping, renorm_momentum, virtual_batch_size) -> dict:
    """tf.keras' batch renormalization and virtual batches, checked: LayerConfig's fields for them."""
    if not isinstance(renorm, (bool, np.bool_)):
        raise InvalidArgument(f"renorm must be a bool, got {renorm!r}", field="renorm")
    out = {}
    if renorm or virtual_batch_size is not None:
        what = "renorm" if renorm else "virtual_batch_size"
        if kind != "batch" or convention != "keras":
            raise InvalidArgument(
                f"{what} is tf.keras' BatchNormalization option: expected kind='batch' with convention='keras', "
                f"got kind={kind!r}, convention={convention!r}", field=what)
    if virtual_batch_size is not None:
        out["virtual_batch_size"] = _int(virtual_batch_size, "virtual_batch_size")
        if out["virtual_batch_size"] < 1:
            raise InvalidArgument(f"virtual_batch_size={virtual_batch_size}: expected a positive int",
                                  field="virtual_batch_size")
    if not renorm:
        for field, value in (("renorm_clipping", clipping), ("renorm_momentum", renorm_momentum)):
            if value is not None:
                raise InvalidArgument(f"{field}={value!r} without renorm=True: expected it left out (None)",
                                      field=field)
        return out
    out["renorm"] = True
    momentum = 0.99 if renorm_momentum is None else renorm_momentum  # tf.keras' default
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.integer, np.floating)) \
            or not 0.0 <= momentum <= 1.0:
        raise InvalidArgument(f"renorm_momentum={renorm_momentum!r}: expected a number in [0, 1]",
                              field="renorm_momentum")
    out["renorm_momentum"] = float(momentum)
    clipping = {} if clipping is None else clipping
    if not isinstance(clipping, dict) or set(clipping) - set(_CLIPPING):
        raise InvalidArgument(f"renorm_clipping={clipping!r}: expected a dict with keys among rmin, rmax, dmax",
                              field="renorm_clipping")
    for key, value in clipping.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value):
            raise InvalidArgument(f"renorm_clipping[{key!r}]={value!r}: expected a finite number",
                                  field="renorm_clipping")
        out[f"renorm_{key}"] = float(value)
    rmin, rmax, dmax = (out.get(f"renorm_{key}") for key in _CLIPPING)
    if rmin is not None and rmax is not None and rmin > rmax:
        raise InvalidArgument(f"renorm_clipping has rmin={rmin} > rmax={rmax}: expected rmin <= rmax",
                              field="renorm_clipping")
    if dmax is not None and dmax < 0:
        raise InvalidArgument(f"renorm_clipping has dmax={dmax}: expected dmax >= 0", field="renorm_clipping")
    return out
