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
from ..config import DEFAULT, make_config
from ..errors import ConfigConflict, InvalidArgument, LayerNotFound
from .layer import Layer
from .records import known_shape, new_record
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

    def __init__(self, backend: Backend, url: str = ""):
        self._backend = backend
        self.url = url

    @property
    def backend(self) -> Backend:
        """Where the records live (see :mod:`normsvc.store.backend` for the contract)."""
        return self._backend

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
        return cls(open_backend(url, options), url)

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
        validation.mapping(updates, "updates", "Moments")
        request_id = validation.request_id(request_id)
        if not updates:
            return {}
        now = time.time()
        fns = {name: mutations.update(m, now) for name, m in updates.items()}
        out = self._backend.mutate(list(updates), lambda r: fns[r.name](r), request_id)
        return {name: out[name].stats for name in updates}

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
        out = self._backend.mutate(names, mutations.put(values, time.time()), request_id, create=fresh)
        return {name: out[name].stats for name in names}

    def export(self, path, layers=None, naming: str = "keras", *, dtype: str = "float64") -> list[str]:
        """Write running statistics to a safetensors file; see :mod:`normsvc.store.safetensors_io`."""
        return safetensors_io.export_stats(self, path, layers=layers, naming=naming, dtype=dtype)

    def import_(self, path, naming: str = "keras", *, layers=None) -> list[str]:
        """Load running statistics from a safetensors file, all or nothing; see :mod:`normsvc.store.safetensors_io`."""
        return safetensors_io.import_stats(self, path, naming=naming, layers=layers)
