"""Step contributions: one update of the running statistics per training step, from many workers.

Data-parallel training has ``world_size`` ranks, each with its own batch per
step.  The statistics users expect are those of ONE process that saw the
concatenated batch, so each rank pushes its batch moments as a contribution
keyed by ``(run, step, rank)`` and the layer applies a step exactly once,
when all ``world_size`` contributions are in:

* the contributions are merged in rank order (the same bits whatever the
  arrival order): Chan's formula for batch norm, whose moments are per
  feature; concatenation along the sample axis for the kinds whose moments
  are per sample (instance, group, layer, rms), so that the layer averages
  over every sample as it would for one process;
* the merged moments take ONE update of the layer's convention, with the
  global count (torch: the unbiased variance of the whole batch);
* steps apply in increasing order: a complete step waits while a lower step
  of the run is still open.

A step that never completes (a rank died, or skipped it) is **closed** when a
contribution ``lag`` or more steps ahead arrives: it is applied with the
contributions that did arrive (merged the same way), counted in the layer's
``incomplete_steps`` and reported to the store's ``on_incomplete`` hook (the
server's metrics).  A contribution for a step the run has already applied or
closed is refused (FailedPrecondition ``STEP_APPLIED``), never merged
silently.

Runs: contributions belong to a run (a string all ranks agree on; see
:func:`normsvc.config.default_run`).  A contribution of a new run ends the
layer's current run (its open contributions are dropped) and starts fresh at
any step; a contribution of a run that has ended is refused (``RUN_ENDED``).
``reset()`` forgets all of it.

The same rank and step again with the same moments is a retry (no change);
with other moments, AlreadyExists ``CONTRIBUTION_CONFLICT``.

The state lives in the layer's record (:class:`Steps`), so it is written in
the same transaction as the statistics: an acknowledged contribution
survives a crash of the process.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..errors import AlreadyExists, FailedPrecondition, FrozenLayer, InvalidArgument
from ..moments import Moments, merge_all

__all__ = ["StepKey", "Contribution", "Steps", "DEFAULT_LAG", "MAX_ENDED_RUNS", "merge", "admit", "due"]

#: A step closes incomplete when a contribution this many steps ahead arrives.
DEFAULT_LAG = 8
#: Ended runs a layer remembers, to refuse their late contributions.
MAX_ENDED_RUNS = 16


class StepKey(NamedTuple):
    """Where a contribution belongs: ``run``, ``step``, and the sender's ``rank`` of ``world_size``."""

    run: str
    step: int
    rank: int
    world_size: int


class Contribution(NamedTuple):
    """One rank's batch moments for one step."""

    step: int
    rank: int
    world_size: int
    moments: Moments


@dataclass(frozen=True)
class Steps:
    """A layer's step state: the run it follows and what is pending.

    Attributes
    ----------
    run : str
        The current run ("" before any contribution).
    last_step : int or None
        The last step of ``run`` applied (or closed); None before the first.
    incomplete : int
        Steps of ``run`` closed before all their ranks came.
    ended : tuple of str
        Runs that ended (newest first, at most :data:`MAX_ENDED_RUNS`).
    pending : tuple of Contribution
        Contributions of open steps, by (step, rank).
    origin : int
        The layer version at the last reset: request ids remembered from
        before it are forgotten (a reset starts fresh).
    """

    run: str = ""
    last_step: int | None = None
    incomplete: int = 0
    ended: tuple = ()
    pending: tuple = ()
    origin: int = 0

    @property
    def active(self) -> bool:
        return self.last_step is not None or bool(self.pending)


def _switch_run(steps: Steps, run: str, layer: str) -> Steps:
    """``steps`` following ``run``: itself, a fresh state that ends the current run, or an error."""
    if run == steps.run:
        return steps
    if run in steps.ended:
        raise FailedPrecondition(
            f"run {run!r} of layer {layer!r} has ended (the layer follows run {steps.run!r} now): expected a "
            "contribution of the current run, or a new run",
            layer=layer, field="run", reason="RUN_ENDED",
        )
    ended = ((steps.run,) + steps.ended)[:MAX_ENDED_RUNS] if steps.active else steps.ended
    return Steps(run=run, ended=ended, origin=steps.origin)


def admit(steps: Steps, key: StepKey, moments: Moments, layer: str) -> Steps | None:
    """``steps`` with the contribution added; None for a retry of one already there."""
    if key.run != steps.run:
        steps = _switch_run(steps, key.run, layer)
    if steps.last_step is not None and key.step <= steps.last_step:
        raise FailedPrecondition(
            f"step {key.step} of run {key.run!r} was already applied to layer {layer!r} (the run is at step "
            f"{steps.last_step}): a contribution after its step is applied is never merged; expected a later "
            "step, or a new run (run=...) or reset() to start over",
            layer=layer, field="step", reason="STEP_APPLIED",
        )
    pending = steps.pending
    for c in pending:
        if c.step != key.step:
            continue
        if c.world_size != key.world_size:
            raise InvalidArgument(
                f"world_size={key.world_size} for step {key.step} of layer {layer!r}: expected {c.world_size}, "
                f"as rank {c.rank} sent", layer=layer, field="world_size",
            )
        if c.rank == key.rank:
            if _same(c.moments, moments):
                return None
            raise AlreadyExists(
                f"rank {key.rank} already contributed other moments to step {key.step} of run {key.run!r} "
                f"of layer {layer!r}: expected the same moments again (a retry) or a later step",
                layer=layer, field="rank", reason="CONTRIBUTION_CONFLICT",
            )
    # kept beyond the call: a copy, so the caller may reuse its arrays (a scalar count is immutable)
    count = moments.count
    owned = Moments._checked(np.float64(count) if count.ndim == 0 else np.array(count, dtype=np.float64),
                             np.array(moments.mean, dtype=np.float64), np.array(moments.m2, dtype=np.float64))
    new = Contribution(key.step, key.rank, key.world_size, owned)
    at = len(pending)  # kept sorted by (step, rank); a new one usually goes last
    while at and (pending[at - 1].step, pending[at - 1].rank) > (key.step, key.rank):
        at -= 1
    pending = pending + (new,) if at == len(pending) else pending[:at] + (new,) + pending[at:]
    return Steps(steps.run, steps.last_step, steps.incomplete, steps.ended, pending, steps.origin)


def _same(a: Moments, b: Moments) -> bool:
    """Whether two moments hold the same values (a retry), shapes included."""
    return all(x.shape == y.shape and np.array_equal(x, y) for x, y in ((a.count, b.count), (a.mean, b.mean),
                                                                          (a.m2, b.m2)))


def due(steps: Steps, arriving: int, lag: int) -> tuple[list, Steps]:
    """The steps ready to apply, in order, and the state without them.

    Each ready step is ``(step, contributions in rank order, complete)``: the
    lowest open step when all its ranks are in, or when ``arriving`` is
    ``lag`` or more steps ahead of it; then the next, and so on.
    """
    pending = steps.pending
    if not pending:
        return [], steps
    first = pending[0]  # the hot path: the lowest open step still waits for ranks
    if arriving - first.step < lag and (len(pending) < first.world_size
                                        or pending[first.world_size - 1].step != first.step):
        return [], steps
    ready, pending = [], list(pending)
    last, incomplete = steps.last_step, steps.incomplete
    while pending:
        step = pending[0].step
        parts = [c for c in pending if c.step == step]
        complete = len(parts) == parts[0].world_size
        if not complete and arriving - step < lag:
            break
        ready.append((step, parts, complete))
        pending = pending[len(parts):]
        last, incomplete = step, incomplete + (not complete)
    if not ready:
        return ready, steps
    return ready, Steps(steps.run, last, incomplete, steps.ended, tuple(pending), steps.origin)


def merge(parts: list, sample_ndim: int | None) -> Moments:
    """The moments of one process that saw every rank's batch (``parts`` in rank order).

    Per-feature moments (``sample_ndim == 0``, batch norm) merge by Chan's
    formula; per-sample moments concatenate along the sample axis.
    """
    moments = [c.moments for c in parts]
    if sample_ndim == 0:
        return merge_all(moments)
    # per-sample moments: every position of layer/rms moments is a sample (flatten them); instance and
    # group moments keep their (N, C) layout and stack along N
    flat = sample_ndim is None
    means = [m.mean.reshape(-1) if flat else np.atleast_1d(m.mean) for m in moments]
    counts = [np.broadcast_to(m.count, m.mean.shape).reshape(mean.shape) for m, mean in zip(moments, means)]
    m2s = [m.m2.reshape(mean.shape) for m, mean in zip(moments, means)]
    return Moments(np.concatenate(counts), np.concatenate(means), np.concatenate(m2s))


def pending_shape(steps: Steps, sample_ndim: int | None) -> tuple | None:
    """The statistics shape of the contributions waiting (None when none waits, or any shape fits)."""
    if not steps.pending or sample_ndim is None:
        return None
    return steps.pending[0].moments.mean.shape[sample_ndim:]


def check_not_frozen(frozen: bool, layer: str) -> None:
    if frozen:
        raise FrozenLayer(f"layer {layer!r} is frozen and takes no updates: unfreeze it first", layer=layer)


# --- codec: the pending contributions as bytes ---------------------------------

_HEAD = struct.Struct("<qii16sBB")


def encode_pending(pending: tuple) -> bytes:
    """The pending contributions as bytes (little-endian, float64 arrays)."""
    out = [struct.pack("<I", len(pending))]
    for c in pending:
        m = c.moments
        per_element = m.count.ndim > 0
        # the 16 bytes held a content digest up to 2026-11 (retries now compare the moments themselves)
        out.append(_HEAD.pack(c.step, c.rank, c.world_size, bytes(16), per_element, m.mean.ndim))
        out.append(struct.pack(f"<{m.mean.ndim}q", *m.mean.shape))
        for a in (m.count, m.mean, m.m2):
            out.append(np.ascontiguousarray(a, dtype="<f8").tobytes())
    return b"".join(out)


def decode_pending(data: bytes) -> tuple:
    """Inverse of :func:`encode_pending`."""
    if not data:
        return ()
    (n,), pos, out = struct.unpack_from("<I", data), 4, []
    for _ in range(n):
        step, rank, world_size, _unused, per_element, ndim = _HEAD.unpack_from(data, pos)
        pos += _HEAD.size
        shape = struct.unpack_from(f"<{ndim}q", data, pos)
        pos += 8 * ndim
        size = int(np.prod(shape))
        arrays = []
        for count in ((size if per_element else 1), size, size):
            arrays.append(np.frombuffer(data, dtype="<f8", count=count, offset=pos).astype(np.float64))
            pos += 8 * count
        count = arrays[0].reshape(shape) if per_element else arrays[0].reshape(())
        moments = Moments(count, arrays[1].reshape(shape), arrays[2].reshape(shape))
        out.append(Contribution(step, rank, world_size, moments))
    return tuple(out)
