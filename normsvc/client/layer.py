"""RemoteLayer: a handle on one layer of a server, for both drivers."""

from __future__ import annotations

from .._compat import deprecated_property_method
from ..moments import Moments
from ..running import RunningStats
from ..config import LayerConfig
from . import operations

__all__ = ["RemoteLayer"]


class RemoteLayer:
    """A handle on one layer of a server, as :class:`normsvc.store.Layer` is of a Store.

    It holds only the name: every call asks the server.  Each method runs one
    operation of :mod:`normsvc.client.operations` on the client that made the
    handle, so from an :class:`~normsvc.client.AsyncClient` each method
    returns an awaitable (``await layer.stats()``).
    """

    def __init__(self, client, name: str):
        self._client = client
        self.name = name

    def __repr__(self) -> str:
        return f"RemoteLayer({self.name!r})"

    @deprecated_property_method
    def config(self) -> LayerConfig:
        """The layer's configuration (with every default resolved).

        A method, as everything that asks the server is; the property spelling
        ``layer.config`` still works but warns DeprecationWarning.
        """
        return self._client.execute(operations.config(self.name))

    def stats(self) -> RunningStats:
        """The current running statistics."""
        return self._client.execute(operations.stats(self.name))

    def update(self, moments: Moments, *, request_id: str | None = None, step: int | None = None,
               rank: int | None = None, world_size: int | None = None, run: str | None = None) -> RunningStats:
        """Fold one batch's moments into the running statistics, or contribute them to a training step;
        see :meth:`normsvc.store.Layer.update`."""
        return self._client.execute(operations.update(self.name, moments, request_id, step=step, rank=rank,
                                                      world_size=world_size, run=run))

    def freeze(self, *, request_id: str | None = None) -> RunningStats:
        """Stop updates; normalize with the running statistics."""
        return self._client.execute(operations.set_state("Freeze", self.name, request_id))

    def unfreeze(self, *, request_id: str | None = None) -> RunningStats:
        """Accept updates again."""
        return self._client.execute(operations.set_state("Unfreeze", self.name, request_id))

    def reset(self, *, request_id: str | None = None) -> RunningStats:
        """Back to the initial statistics (keeps config, shape and frozen flag)."""
        return self._client.execute(operations.set_state("ResetStats", self.name, request_id))

    def normalize(self, x, *, training: bool, update: bool = True, gamma=None, beta=None,
                  request_id: str | None = None, return_moments: bool = False):
        """Normalize ``x`` on the server as this layer; see :meth:`normsvc.store.Layer.normalize`.

        Returns ``y``, or with ``return_moments=True`` ``(y, batch Moments or None)``.
        Tensors larger than one message go through NormalizeStream.
        """
        return self._client.execute(operations.normalize(
            self.name, x, training=training, update=update, gamma=gamma, beta=beta, request_id=request_id,
            max_message_bytes=self._client.max_message_bytes, return_moments=return_moments))
