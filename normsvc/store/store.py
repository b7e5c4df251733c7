"""Store: named layers with running statistics, over a backend chosen by URL.

The store validates every argument (:mod:`normsvc.store.validation`), turns
each call into a pure change of records (:mod:`normsvc.store.mutations`) and
hands it to its backend (:mod:`normsvc.store.backend`) as one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from ..running import RunningStats
from . import mutations, safetensors_io, validation
from .backend import Backend, open_backend
from ..config import DEFAULT, LayerInfo, make_config
from ..errors import ConfigConflict, InvalidArgument, LayerNotFound
from .layer import Layer
from .records import known_shape, new_record
from .steps import DEFAULT_LAG
from .validation import validate_name

__all__ = ["Store"]


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

    def __init__(self, backend: Backend, url: str = "", *, step_lag: int = DEFAULT_LAG, on_incomplete=None):
        self._backend = backend
        self.url = url
        self.step_lag = validation.positive_int(step_lag, "step_lag")
        #: Called as ``on_incomplete(layer, run, step, ranks, world_size)`` for every step closed
        #: before all its ranks came (see :mod:`normsvc.store.steps`); the server counts them.
        self.on_incomplete = on_incomplete

    @property
    def backend(self) -> Backend:
        """Where the records live (see :mod:`normsvc.store.backend` for the contract)."""
        return self._backend

    @classmethod
    def open(cls, url: str, *, step_lag: int = DEFAULT_LAG, **options) -> "Store":
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
        step_lag : int
            A training step still open when a contribution this many steps
            ahead arrives is closed and applied with what arrived (see
            :meth:`update_many`).
        """
        return cls(open_backend(url, options), url, step_lag=step_lag)

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
        axis=DEFAULT,
        groups: int | None = None,
        epsilon: float | None = None,
        momentum=DEFAULT,
        convention: str = "keras",
        center: bool = True,
        scale: bool = True,
        num_features=None,
        renorm: bool = False,
        renorm_clipping: dict | None = None,
        renorm_momentum: float | None = None,
        virtual_batch_size: int | None = None,
    ) -> "Layer":
        """Create a layer, or return the existing one if its config is identical.

        Parameters
        ----------
        name : str
            Letters, digits and ``_ . - /`` (``/`` separates namespaces), at most 256 characters.
        kind : {"batch", "layer", "instance", "group", "rms"}
        axis : int or list of int, optional
            As in the ops: the kept feature axes (batch), the channel axis
            (instance, group), the normalized axes (layer, rms).  Left out:
            1 (PyTorch's channel dim) for batch, instance and group layers of
            the torch convention, -1 otherwise.
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
            The statistics shape (see :mod:`normsvc.config`); left out,
            it is learned from the first batch (group, layer and rms layers
            know it from their config).
        renorm, renorm_clipping, renorm_momentum : optional
            Batch renormalization as tf.keras' ``BatchNormalization`` takes
            it (kind "batch", convention "keras"): ``renorm_clipping`` a dict
            with keys among "rmin", "rmax", "dmax" (unset: no clipping),
            ``renorm_momentum`` default 0.99.  Training normalizes with
            :func:`normsvc.ops.batch_renorm`; the statistics keep renorm's
            moving averages (``RunningStats.renorm_mean`` ...).
        virtual_batch_size : int, optional
            tf.keras' ghost batches (kind "batch", convention "keras"):
            training normalizes each virtual batch with its own statistics,
            and the layer takes moments per virtual batch, shape
            ``(B / v, *features)``, averaging them as tf.keras does.

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
            renorm=renorm,
            renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum,
            virtual_batch_size=virtual_batch_size,
        )
        stored = self._backend.insert(new_record(name, config))
        differences = [] if stored.config == config else stored.config.differences(config, known_shape(stored))
        if differences:
            raise ConfigConflict(
                f"layer {name!r} exists with another config ({'; '.join(differences)}): expected the same "
                "config, or delete the layer first, or use another name",
                layer=name,
            )
        return Layer(self, name)

    def layer(self, name: str) -> "Layer":
        """A handle on an existing layer; LayerNotFound if there is none."""
        self._backend.require(validate_name(name))
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

    def describe(self, names=None, *, prefix: str = "") -> list[LayerInfo]:
        """Name, config and statistics of ``names`` (all must exist), or of every layer under ``prefix``."""
        if names is None:
            names = self.list_layers(prefix)
        elif isinstance(names, str):
            names = [names]
        records = [self._backend.require(validate_name(name)) for name in names]
        return [LayerInfo(r.name, r.config, r.report()) for r in records]

    def delete_layer(self, name: str) -> None:
        """Delete a layer, its statistics and its request ids; LayerNotFound if absent."""
        validate_name(name)
        if not self._backend.delete(name):
            raise LayerNotFound(f"no layer named {name!r} to delete", layer=name)

    # --- statistics -------------------------------------------------------

    def update_many(self, updates: Mapping, *, request_id: str | None = None, step: int | None = None,
                    rank: int | None = None, world_size: int | None = None,
                    run: str | None = None) -> dict[str, RunningStats]:
        """Push one batch's moments to several layers in one transaction.

        All layers update or none does (any invalid moments, unknown or frozen
        layer aborts the whole call).

        Without ``step``, each layer takes one update of its convention now
        (its version grows by one).  With ``step``, ``rank`` and ``world_size``
        the moments are this rank's *contribution* to a data-parallel training
        step: kept durably until all ``world_size`` ranks of that step have
        contributed, then merged in rank order and applied as ONE update with
        the global count, exactly as one process that saw the concatenated
        batch (see :mod:`normsvc.store.steps`).  The call never waits for the
        other ranks; a layer's ``RunningStats.last_step >= step`` tells that
        the step has been applied.  A step still open when a contribution
        :attr:`step_lag` steps ahead arrives is applied with what came.

        Parameters
        ----------
        updates : mapping of str to Moments
        request_id : str, optional
            An idempotency key bound to the request's content: the same id
            with the same content is a retry (nothing changes, the current
            statistics come back); with other content, AlreadyExists.
        step, rank, world_size : int, optional
            A step contribution (all three, or none).
        run : str, optional
            The run the step belongs to (with ``step``); default
            :func:`normsvc.config.default_run`.  A new run starts fresh; a
            step already applied in this run is refused, never skipped.

        Returns
        -------
        dict
            Layer name -> its RunningStats after the call.
        """
        validation.mapping(updates, "updates", "Moments")
        request_id = validation.request_id(request_id)
        key = validation.step_key(step, rank, world_size, run)
        if not updates:
            return {}
        now, closed = time.time(), {}
        if key is None:
            fn = mutations.update(updates, now)
        else:
            fn = mutations.contribute(updates, key, now, lag=self.step_lag, closed=closed)
        digest = None if request_id is None else validation.request_digest("update", key, updates)
        out = self._backend.mutate(list(updates), fn, request_id, digest=digest)
        self._report_closed(closed, key)
        return {name: out[name].report() for name in updates}

    def _report_closed(self, closed: dict, key) -> None:
        if self.on_incomplete is None:
            return
        for layer, steps in closed.items():
            for step, ranks, world_size in steps:
                self.on_incomplete(layer, key.run, step, ranks, world_size)

    def put_stats(self, stats: Mapping, *, create: Mapping | None = None,
                  request_id: str | None = None) -> dict[str, RunningStats]:
        """Write the running statistics of several layers as they are, in one transaction.

        Each layer in ``stats`` takes that ``mean``, ``variance``, ``count``
        and ``num_batches`` (the other fields of the RunningStats are not
        read); its version grows by one, its config and frozen flag stay.
        The shape must be the layer's (any of the right rank while it waits
        for its first batch).  Each layer in ``create`` that does not exist
        is created first with that config, in the same transaction: after a
        crash, either every layer is there with its statistics, or none of
        the call's changes is.

        Parameters
        ----------
        stats : mapping of str to RunningStats
            Finite values, variances >= 0, counts >= 0.
        create : mapping of str to LayerConfig or dict, optional
            Configs for layers that may not exist yet (dicts take
            ``create_layer``'s arguments and its checks); an existing layer
            keeps its own config.
        request_id : str, optional
            A layer that already applied it is left as it is.

        Returns
        -------
        dict
            Layer name -> its RunningStats after the call, for every name in
            ``stats`` and ``create``.
        """
        values = {name: validation.running_values(name, s)
                  for name, s in validation.mapping(stats, "stats", "RunningStats").items()}
        configs = {name: validation.config_from_mapping(c, name)
                   for name, c in validation.mapping(create or {}, "create", "LayerConfig").items()}
        request_id = validation.request_id(request_id)
        names = sorted(set(values) | set(configs))
        if not names:
            return {}
        fresh = {name: new_record(name, config) for name, config in configs.items()}
        digest = None if request_id is None else validation.request_digest(
            "put", None, {n: (v.mean, v.variance, v.count, v.num_batches) for n, v in values.items()})
        out = self._backend.mutate(names, mutations.put(values, time.time()), request_id, create=fresh,
                                   digest=digest)
        return {name: out[name].report() for name in names}

    def export(self, path, layers=None, naming: str = "keras", *, prefix: str | None = None,
               strip_prefix: str | bool | None = None, dtype: str = "float64") -> list[str]:
        """Write running statistics to a safetensors file; see :mod:`normsvc.store.safetensors_io`.

        Parameters
        ----------
        path : str or path
            The file to write (replaced atomically).
        layers : str or list of str, optional
            These layers (LayerNotFound for one that does not exist).
        naming : {"keras", "torch"}
            Tensor names: ``{layer}/moving_mean`` or ``{layer}.running_mean``.
        prefix : str, optional
            Instead of ``layers``: every layer whose name starts with it
            (InvalidArgument when none does).  Left out with ``layers``: every layer.
        strip_prefix : str or True, optional
            Removed from every layer name in the file (True: ``prefix``), so
            the file holds a model's statistics under the model's own names;
            InvalidArgument naming a layer that does not start with it.
        dtype : {"float64", "float32"}
            Element type of the tensors.

        Returns
        -------
        list of str
            The layers exported, named as in the store.
        """
        return safetensors_io.export_stats(self, path, layers=layers, naming=naming, prefix=prefix,
                                           strip_prefix=strip_prefix, dtype=dtype)

    def import_(self, path, naming: str = "keras", *, layers=None, add_prefix: str | None = None,
                max_layers: int | None = None) -> list[str]:
        """Load running statistics from a safetensors file, all or nothing; see :mod:`normsvc.store.safetensors_io`.

        ``path`` is the file's path, or its bytes (what ImportStats receives).
        ``layers`` (names as in the file) picks some of the file's layers;
        ``add_prefix`` is put before every name of the file (a file exported
        with ``strip_prefix`` goes back under a model's namespace).  Returns
        the layers written, named as in the store.  ``max_layers`` refuses
        (ResourceExhausted, nothing changed) an import after which the store
        would hold more layers than that.
        """
        return safetensors_io.import_stats(self, path, naming=naming, layers=layers, add_prefix=add_prefix,
                                           max_layers=max_layers)
