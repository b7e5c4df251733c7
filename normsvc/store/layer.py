"""Layer: one named layer of a store, with its updates, freeze, reset and normalize."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from .. import ops
from .._compat import deprecated_property_method
from ..moments import Moments
from ..running import RunningStats
from . import mutations, validation
from ..config import LayerConfig
from ..errors import FrozenLayer, InvalidArgument, NoStatistics, NormsvcError
from .records import Record

if TYPE_CHECKING:
    from .store import Store

__all__ = ["Layer"]


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
        self._backend = store.backend
        self.name = name

    def __repr__(self) -> str:
        return f"Layer({self.name!r})"

    @deprecated_property_method
    def config(self) -> LayerConfig:
        """The layer's configuration (with every default resolved).

        A method, as on :class:`~normsvc.client.RemoteLayer` where it asks the
        server; the property spelling ``layer.config`` still works but warns
        DeprecationWarning.
        """
        return self._backend.require(self.name).config

    def stats(self) -> RunningStats:
        """The current running statistics."""
        return self._backend.require(self.name).report()

    def update(self, moments: Moments, *, request_id: str | None = None, step: int | None = None,
               rank: int | None = None, world_size: int | None = None, run: str | None = None) -> RunningStats:
        """Fold one batch's moments into the running statistics; returns the new statistics.

        ``moments`` are what the ops return for this kind (see
        :mod:`normsvc.config`).  Raises FrozenLayer on a frozen layer and
        InvalidArgument for NaN/Inf, negative counts or m2, or a shape other
        than the layer's; nothing changes then.  A repeated ``request_id``
        with the same moments changes nothing and returns the current
        statistics.  With ``step``, ``rank`` and ``world_size`` (and ``run``)
        the moments are one rank's contribution to a data-parallel training
        step, applied once every rank's is in: see :meth:`Store.update_many`.
        """
        return self._store.update_many({self.name: moments}, request_id=request_id, step=step, rank=rank,
                                       world_size=world_size, run=run)[self.name]

    def freeze(self, *, request_id: str | None = None) -> RunningStats:
        """Stop updates; normalize with the running statistics (no-op if already frozen)."""
        return self._mutate(mutations.set_frozen(True, time.time()), request_id, "freeze")

    def unfreeze(self, *, request_id: str | None = None) -> RunningStats:
        """Accept updates again (no-op if not frozen)."""
        return self._mutate(mutations.set_frozen(False, time.time()), request_id, "unfreeze")

    def reset(self, *, request_id: str | None = None) -> RunningStats:
        """Back to the initial statistics (keras/torch: mean 0, variance 1; cumulative: empty).

        Keeps the config, the learned shape and the frozen flag.  Step
        contributions start fresh (no run, nothing pending) and request ids
        from before are forgotten, so a rerun is applied, never taken for a
        retry.
        """
        return self._mutate(mutations.reset(time.time()), request_id, "reset")

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
        record = self._backend.require(self.name)
        cfg = record.config
        if gamma is not None and not cfg.scale:
            raise InvalidArgument(f"layer {self.name!r} has scale=False: expected no gamma", layer=self.name,
                                  field="gamma")
        if beta is not None and (not cfg.center or not cfg.norm.centered):
            why = f"{cfg.kind} norm has no offset" if not cfg.norm.centered else "it has center=False"
            raise InvalidArgument(f"layer {self.name!r} takes no beta ({why}): expected no beta", layer=self.name,
                                  field="beta")
        if training and not record.stats.frozen:
            y, moments = self._train(record, x, gamma=gamma, beta=beta, device=device)
            if not update:
                return (y, moments) if return_moments else y
            try:
                self.update(moments, request_id=request_id)
                return (y, moments) if return_moments else y
            except FrozenLayer:
                record = self._backend.require(self.name)  # frozen meanwhile: as if it had been all along
            except InvalidArgument as exc:
                if exc.field == "request_id":
                    raise
                raise InvalidArgument(f"x {np.shape(x)} does not fit the layer: {exc}", layer=self.name,
                                      field="x") from exc
        y = self._infer(record, x, gamma, beta, device)
        return (y, None) if return_moments else y

    # --- helpers ----------------------------------------------------------

    def _mutate(self, fn, request_id, what: str) -> RunningStats:
        request_id = validation.request_id(request_id)
        digest = None if request_id is None else validation.request_digest(what, None, {})
        out = self._backend.mutate([self.name], fn, request_id, digest=digest)
        return out[self.name].report()

    def _train(self, record: Record, x, **kwargs):
        """The training forward: ``ops.norm`` of the layer's kind, or tf.keras' batch
        renormalization (corrected towards the layer's renorm statistics) and virtual batches."""
        cfg = record.config
        if not cfg.renorm and cfg.virtual_batch_size is None:
            return self._call(cfg, x, **kwargs)
        try:
            if cfg.renorm:
                stats = record.stats
                return ops.batch_renorm(x, stats.renorm_mean, stats.renorm_stddev, axis=_axis_arg(cfg.axis),
                                        epsilon=cfg.epsilon, virtual_batch_size=cfg.virtual_batch_size,
                                        **cfg.renorm_clipping, **kwargs)
            return ops.batch_norm(x, axis=_axis_arg(cfg.axis), epsilon=cfg.epsilon,
                                  virtual_batch_size=cfg.virtual_batch_size, **kwargs)
        except NormsvcError as exc:
            raise self._misfit(exc, x, record.stats, ("renorm_mean", "renorm_stddev")) from None

    def _call(self, cfg: LayerConfig, x, running: RunningStats | None = None, **kwargs):
        """``ops.norm`` of this layer's kind on ``x``; its errors name this layer.

        In inference ``running`` are the layer's statistics, passed as
        ``mean`` and ``variance`` (per channel or group, shared by every
        sample): when they do not fit, it is ``x`` that does not fit the layer.
        """
        if running is not None:
            kwargs.update(mean=running.mean, variance=running.variance)
        try:
            return ops.norm(cfg.kind, x, axis=_axis_arg(cfg.axis), groups=cfg.groups, epsilon=cfg.epsilon,
                            **kwargs)
        except NormsvcError as exc:
            raise self._misfit(exc, x, running, ("mean", "variance")) from None

    def _misfit(self, exc: NormsvcError, x, stats, fields: tuple) -> NormsvcError:
        """``exc`` naming this layer; when the layer's statistics in ``fields`` did not fit, it is
        ``x`` that does not fit the layer."""
        if exc.field in fields:
            exc.field = "x"
            exc.message = (f"x of shape {np.shape(x)} does not fit layer {self.name!r}, which keeps "
                           f"statistics of shape {np.shape(stats.mean)}: {exc.message}")
        exc.layer = exc.layer or self.name
        return exc

    def _infer(self, record: Record, x, gamma, beta, device) -> np.ndarray:
        stats = record.stats
        if record.config.convention == "cumulative" and stats.count == 0:
            raise NoStatistics(
                f"cumulative layer {self.name!r} has no samples yet: push moments (or normalize with "
                "training=True) before normalizing in inference mode",
                layer=self.name,
            )
        # Before its first batch a lazily shaped layer holds 0-d initial values: they broadcast.
        return self._call(record.config, x, stats, gamma=gamma, beta=beta, device=device)[0]


def _axis_arg(axis):
    return list(axis) if isinstance(axis, tuple) else axis
