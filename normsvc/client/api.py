"""The API both drivers share: the Store's methods (plus allreduce and describe) over gRPC.

Every method runs one operation of :mod:`.operations` with the driver's
:meth:`ClientApi.execute`: blocking in :class:`~normsvc.client.Client`, a
coroutine in :class:`~normsvc.client.AsyncClient`.  Layer handles are
:class:`~normsvc.client.RemoteLayer` (:mod:`.layer`).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..running import RunningStats
from ..config import DEFAULT
from . import operations
from .layer import RemoteLayer
from .results import AllReduceResult, LayerInfo
from .transport import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, DEFAULT_TIMEOUT, Retry, Transport

__all__ = ["ClientApi"]


class ClientApi:
    """Store's methods plus update_many/allreduce/describe, for any driver.

    A driver sets :attr:`channels` and defines :meth:`execute`; the
    constructor's arguments are documented on :class:`~normsvc.client.Client`.
    """

    #: ``grpc`` or ``grpc.aio``: what the driver's channel is made of.
    channels = None

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls=None,
                 timeout: float | None = DEFAULT_TIMEOUT, retry: Retry | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.transport = Transport(target, token=token, tls=tls, timeout=timeout, retry=retry,
                                   max_message_bytes=max_message_bytes)
        self.connection = self.transport.connect(self.channels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    @property
    def target(self) -> str:
        """The server's address, as given."""
        return self.transport.target

    @property
    def timeout(self) -> float | None:
        """Seconds each call may take, retries included (None: no deadline)."""
        return self.transport.timeout

    @property
    def retry(self) -> Retry:
        """How UNAVAILABLE is retried."""
        return self.transport.retry

    @property
    def max_message_bytes(self) -> int:
        """The server's message limit: Normalize requests above it use NormalizeStream."""
        return self.transport.max_message_bytes

    def execute(self, operation):  # pragma: no cover - defined by the drivers
        """Run one operation of :mod:`normsvc.client.operations` and return (or, async, await) its value."""
        raise NotImplementedError

    def _handle(self, operation):
        """``operation`` (which returns a layer's name), returning a handle on that layer."""
        return RemoteLayer(self, (yield from operation))

    def create_layer(self, name: str, *, kind: str = "batch", axis=DEFAULT, groups: int | None = None,
                     epsilon: float | None = None, momentum=DEFAULT, convention: str = "keras",
                     center: bool = True, scale: bool = True, num_features=None, renorm: bool = False,
                     renorm_clipping: dict | None = None, renorm_momentum: float | None = None,
                     virtual_batch_size: int | None = None) -> RemoteLayer:
        """Create a layer, or return the existing one if its config is identical.

        Arguments as :meth:`normsvc.store.Store.create_layer`; ConfigConflict
        if the name holds another config.
        """
        options = dict(kind=kind, axis=axis, groups=groups, epsilon=epsilon, momentum=momentum,
                       convention=convention, center=center, scale=scale, num_features=num_features,
                       renorm=renorm, renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum,
                       virtual_batch_size=virtual_batch_size)
        return self.execute(self._handle(operations.create_layer(name, options)))

    def layer(self, name: str) -> RemoteLayer:
        """A handle on an existing layer; LayerNotFound if there is none."""
        return self.execute(self._handle(operations.existing_layer(name)))

    def list_layers(self, prefix: str = "", *, after: str | None = None, limit: int | None = None) -> list[str]:
        """Sorted names of the layers starting with ``prefix`` (``after``/``limit`` page, as Store's)."""
        return self.execute(operations.list_layers(prefix, after, limit))

    def describe(self, names=None, *, prefix: str = "") -> list[LayerInfo]:
        """Name, config and statistics of ``names`` (all must exist), or of every layer under ``prefix``."""
        return self.execute(operations.describe(names, prefix))

    def delete_layer(self, name: str) -> None:
        """Delete a layer and its statistics; LayerNotFound if absent."""
        return self.execute(operations.delete_layer(name))

    def update_many(self, updates: Mapping, *, request_id: str | None = None, step: int | None = None,
                    rank: int | None = None, world_size: int | None = None,
                    run: str | None = None) -> dict[str, RunningStats]:
        """Push one batch's moments to several layers in one all-or-nothing call.

        With ``step``, ``rank`` and ``world_size`` (and ``run``, default
        :func:`normsvc.config.default_run` of this process) the moments are
        this rank's contribution to a data-parallel training step, applied
        once all ranks' are in; see :meth:`normsvc.store.Store.update_many`.
        Returns layer name -> its RunningStats after the call.
        """
        return self.execute(operations.update_many(updates, request_id, step, rank, world_size, run))

    def allreduce(self, moments: Mapping, *, step: int, rank: int, world_size: int, group: str = "",
                  update_stats: bool = True, timeout=DEFAULT, run: str | None = None) -> AllReduceResult:
        """Synchronized batch statistics (SyncBatchNorm without NCCL).

        Each of ``world_size`` ranks calls this with its own batch moments for
        the same ``(group, step)``; every rank gets the moments of all their
        data merged, and (``update_stats``) the running statistics take one
        update per step.  A rank that never comes fails the others with
        DeadlineExceeded at their deadline (``timeout``, default the client's).
        The running statistics take the step as step ``step`` of ``run``
        (default :func:`normsvc.config.default_run`): a step that run has
        already applied is refused (FailedPrecondition), never skipped.
        """
        return self.execute(operations.allreduce(moments, step, rank, world_size, group, update_stats, timeout,
                                                 run))

    def export(self, path, layers=None, naming: str = "keras", *, prefix: str | None = None,
               strip_prefix: str | bool | None = None, dtype: str = "float64") -> list[str]:
        """Write running statistics to a local safetensors file (Keras or PyTorch names).

        Arguments and result as :meth:`normsvc.store.Store.export`: ``layers``
        or every layer under ``prefix``, named in the file without
        ``strip_prefix`` (True: the prefix); returns the store's names.
        """
        return self.execute(operations.export(path, layers, naming, dtype, prefix, strip_prefix))

    def import_(self, path, naming: str = "keras", *, layers=None, add_prefix: str | None = None) -> list[str]:
        """Load running statistics from a local safetensors file into the server's store.

        As :meth:`normsvc.store.Store.import_`: ``layers`` as the file names
        them, each written to ``add_prefix + name``; returns the store's names.
        """
        return self.execute(operations.import_(path, naming, layers, add_prefix))
