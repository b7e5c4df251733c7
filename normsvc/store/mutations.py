"""How each mutation changes one layer's record: the ``fn`` a backend's ``mutate`` calls.

Each builder returns a pure function ``Record -> Record | None`` (None: no
change, no version bump) that raises to abort the whole transaction.  Every
change moves the layer's version on by exactly one and stamps the time the
call started, so all layers of one transaction share one ``updated_at``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from ..moments import Moments
from ..running import RunningStats, apply_update, fold, initial_state
from . import validation
from ..errors import FrozenLayer, InvalidArgument
from . import steps as step_state
from .records import Record, known_shape
from .steps import Steps, StepKey

__all__ = ["updated", "apply", "update", "contribute", "set_frozen", "reset", "put"]

Mutation = Callable[[Record], "Record | None"]


def updated(record: Record, stats: RunningStats, now: float) -> Record:
    """``record`` with new statistics, one version on, stamped ``now`` (no run or last step: the
    record's step state tells those, see :meth:`Record.report`)."""
    new = stats.evolve(version=record.stats.version + 1, updated_at=now, run="", last_step=None)
    return Record(record.name, record.config, new, record.steps)


def apply(record: Record, moments, now: float) -> Record:
    """``record`` with one batch's moments folded into its statistics, by the layer's convention."""
    cfg, stats = record.config, record.stats
    if cfg.sample_ndim == 0 and not cfg.renorm and not stats.frozen and type(moments) is Moments \
            and known_shape(record) is not None:
        # the hot path: one compiled pass, or None and the checks below say what is wrong
        new = fold(stats, moments, convention=cfg.convention, momentum=cfg.momentum)
        if new is not None:
            return updated(record, new, now)
    batch = validation.batch(record.name, cfg, known_shape(record), moments)
    if stats.frozen:
        raise FrozenLayer(f"layer {record.name!r} is frozen and takes no updates: unfreeze it first",
                          layer=record.name)
    if known_shape(record) is None:
        fresh = initial_state(cfg.convention, batch.mean.shape, renorm=cfg.renorm)
        stats = replace(stats, mean=fresh.mean, variance=fresh.variance, moving_stddev=fresh.moving_stddev,
                        renorm_mean=fresh.renorm_mean, renorm_stddev=fresh.renorm_stddev)
    renorm = (cfg.renorm_momentum, cfg.epsilon) if cfg.renorm else None
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        new = apply_update(stats, batch, convention=cfg.convention, momentum=cfg.momentum, renorm=renorm)
    if not validation.all_finite(new.mean, new.variance, *(new.renorm or ())):
        raise InvalidArgument(f"moments for layer {record.name!r} overflow the running statistics to Inf",
                              layer=record.name, field="moments.mean")
    return updated(record, new, now)


def update(updates: Mapping, now: float) -> Mutation:
    """Fold each layer's moments (``updates[name]``) into its running statistics, by its convention."""
    return lambda record: apply(record, updates[record.name], now)


def contribute(updates: Mapping, key: StepKey, now: float, *, lag: int, closed: dict) -> Mutation:
    """Add each layer's moments (``updates[name]``) to a step as one rank's contribution (see
    :mod:`normsvc.store.steps`); apply the steps now due.

    Each step due takes one update of the layer's convention with the
    merged moments (one version each).  ``closed[name]`` receives the steps
    this call closed before all their ranks came.
    """
    whole = key.world_size == 1

    def fn(record: Record) -> Record | None:
        moments, cfg = updates[record.name], record.config
        # while the layer learns its shape, the contributions already waiting fix it
        shape = known_shape(record)
        if shape is None:
            shape = step_state.pending_shape(record.steps, cfg.sample_ndim)
        if not validation.plain_batch(cfg, shape, moments, whole=whole):
            validation.batch(record.name, cfg, shape, moments, whole=whole)
        step_state.check_not_frozen(record.stats.frozen, record.name)
        steps = step_state.admit(record.steps, key, moments, record.name)
        if steps is None:
            return None  # a retry of a contribution already here
        ready, steps = step_state.due(steps, key.step, lag)
        record = Record(record.name, cfg, record.stats, steps)
        for step, parts, complete in ready:
            record = apply(record, step_state.merge(parts, cfg.sample_ndim), now)
            if not complete:
                closed.setdefault(record.name, []).append((step, [c.rank for c in parts], parts[0].world_size))
        return record

    return fn


def set_frozen(frozen: bool, now: float) -> Mutation:
    """Freeze or unfreeze; no change (None) when the layer already is."""

    def fn(record: Record) -> Record | None:
        if record.stats.frozen == frozen:
            return None
        return updated(record, replace(record.stats, frozen=frozen), now)

    return fn


def reset(now: float) -> Mutation:
    """Back to the initial statistics, keeping the learned shape and the frozen flag.

    The step state starts fresh too (no run, nothing pending), and request ids
    remembered from before are forgotten: a rerun after a reset is applied,
    never taken for a retry.
    """

    def fn(record: Record) -> Record:
        fresh = initial_state(record.config.convention, record.stats.mean.shape, renorm=record.config.renorm)
        new = updated(record, replace(fresh, frozen=record.stats.frozen), now)
        return replace(new, steps=Steps(origin=new.stats.version))

    return fn


def put(values: Mapping[str, RunningStats], now: float) -> Mutation:
    """Replace mean, variance, count and num_batches with ``values[name]`` (checked ones).

    Layers not in ``values`` are left as they are; the frozen flag is kept.
    The shape must be the layer's: its known shape, or any of its rank while
    it waits for its first batch.
    """

    def fn(record: Record) -> Record | None:
        new = values.get(record.name)
        if new is None:
            return None
        _check_shape(record, new.mean.shape)
        _check_renorm(record, new)
        # values were copied when checked: the caller holds no reference to these arrays
        return updated(record, replace(new, frozen=record.stats.frozen), now)

    return fn


def _check_shape(record: Record, shape: tuple) -> None:
    expected = known_shape(record)
    if expected is not None and shape != expected:
        what = f"statistics of shape {expected}"
    elif expected is None and len(shape) != record.config.stat_ndim:
        what = f"statistics of rank {record.config.stat_ndim}"
    else:
        return
    raise InvalidArgument(f"layer {record.name!r} keeps {what}: got shape {shape}",
                          layer=record.name, field="stats.mean")


def _check_renorm(record: Record, stats: RunningStats) -> None:
    """Statistics for a renorm layer carry renorm's three arrays; for any other layer, none."""
    if record.config.renorm and stats.renorm is None:
        raise InvalidArgument(f"layer {record.name!r} has renorm: expected moving_stddev, renorm_mean and "
                              "renorm_stddev with its statistics", layer=record.name, field="stats.renorm_mean")
    if not record.config.renorm and stats.renorm is not None:
        raise InvalidArgument(f"layer {record.name!r} has no renorm: expected no moving_stddev, renorm_mean or "
                              "renorm_stddev", layer=record.name, field="stats.renorm_mean")
