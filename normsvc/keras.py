"""Keras 3 integration: BatchNormalization whose moving statistics live in normsvc.

``pip install normsvc[keras]``; set ``KERAS_BACKEND=torch`` before Keras is
imported.  ``import normsvc`` never imports this module (nor Keras).

:class:`SharedBatchNormalization` is a drop-in ``keras.layers.BatchNormalization``
(the same variables, paths and inference) whose moving statistics are shared
by every process that trains with the same service layer:

``mode="shared"``
    Each rank normalizes with its own batch statistics, as Keras does, and
    pushes its batch moments as one *step contribution*; the service merges
    the ``world_size`` contributions of a step and applies ONE Keras update
    with the global count, exactly as one process fed the concatenated batch.
``mode="sync"``
    Every rank normalizes with the moments of all ranks' batches
    (AllReduceMoments), as ``BatchNormalization(synchronized=True)`` or
    PyTorch's SyncBatchNorm; the backward pass reduces ``sum(dy)`` and
    ``sum(dy * (x - mean))`` across ranks the same way, so outputs and
    gradients are those of one process on the concatenated batch.  The
    reductions go as messages of one open stream per training thread, which
    :func:`close` ends.

Batch renormalization (``renorm=True``, Keras 3's own variables and update,
tf.keras' semantics) works in both modes; virtual ("ghost") batches
(``virtual_batch_size``, which Keras 3 lacks) as tf.keras has them, in
shared mode.  The service layer holds the same configuration, so its
Normalize, export and import agree with the Keras layer.

:func:`share` converts the BatchNormalization layers of a Sequential or
functional model; :func:`load_moving_stats` fills a model's moving statistics
from a Store, a Client or a safetensors file with Keras naming; :func:`connect`
gives a loaded model's shared layers their target.

Training calls run eagerly on the torch backend (the service is called from
the forward pass); inference, :func:`load_moving_stats` and serialization
work on any backend.

Examples
--------
Two ranks, one shared layer (``run`` is the same on every rank, new per
training run)::

    model = keras.Sequential([
        keras.Input((16,)),
        SharedBatchNormalization("127.0.0.1:50051", rank=rank, world_size=2, run=run, name="bn"),
        keras.layers.Dense(1),
    ])
    model.compile("sgd", "mse")
    model.fit(x, y, batch_size=32)                       # one step contribution per batch
    load_moving_stats(model, normsvc.Client("127.0.0.1:50051"))  # every completed step, before evaluating
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import tempfile
import threading

import keras
import numpy as np
from keras import ops

from .config import make_config, step_arguments
from .errors import FailedPrecondition, InvalidArgument, InvalidType, LayerNotFound
from .moments import Moments

__all__ = ["SharedBatchNormalization", "share", "load_moving_stats", "connect", "close"]

MODES = ("shared", "sync")
#: AllReduceMoments groups are at most this long (the server's limit).
_MAX_GROUP = 128


# --- targets ---------------------------------------------------------------------------


def _is_store(obj) -> bool:
    from .store import Store

    return isinstance(obj, Store)


def _is_service(obj) -> bool:
    """A Store or a (blocking) Client: they share the methods used here."""
    if _is_store(obj):
        return True
    from .client import Client

    return isinstance(obj, Client)


_CLIENTS: dict = {}
_CLIENTS_LOCK = threading.Lock()


def _client_for(address: str):
    """One Client per server address and process, made on first use (fork-safe: keyed by pid)."""
    key = (os.getpid(), address)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            from .client import Client

            client = _CLIENTS[key] = Client(address)
        return client


# sync mode reduces on one AllReduceMomentsStream per service and thread: id(service) -> ThreadStreams
_STREAMS: dict = {}
_STREAMS_LOCK = threading.Lock()


def _allreduce(service, moments: dict, **kwargs):
    """One reduction on this thread's stream of ``service`` (opened at the thread's first reduction)."""
    streams = _STREAMS.get(id(service))
    if streams is None or streams.target is not service:
        from .client.allreduce_stream import ThreadStreams

        with _STREAMS_LOCK:
            streams = _STREAMS.get(id(service))
            if streams is None or streams.target is not service:
                streams = _STREAMS[id(service)] = ThreadStreams(service)
    return streams.allreduce(moments, **kwargs)


def _check_target(target, mode: str | None = None, layer: str | None = None):
    """``target`` checked (for ``mode``, when given); returns it."""
    if isinstance(target, str):
        if not target:
            raise InvalidArgument("target='': expected a server address such as '127.0.0.1:50051', a Client "
                                  "or a Store", field="target")
    elif target is not None and not _is_service(target):
        raise InvalidType(f"target={target!r}: expected a server address (str), a normsvc.Client or a "
                          "normsvc.Store (an AsyncClient's coroutines cannot run inside a Keras call)",
                          field="target")
    if mode == "sync" and _is_store(target):
        whose = f"layer {layer!r} has mode='sync', which" if layer else "mode='sync'"
        raise InvalidArgument(f"{whose} needs a server (AllReduceMoments is its rendezvous): expected an "
                              "address or a Client, got a Store", field="target")
    return target


def _address(target) -> str | None:
    """What get_config keeps of a target: the address (never a token), or None for a Store."""
    if target is None or isinstance(target, str):
        return target
    return None if _is_store(target) else target.target


def _group(kind: str, name: str) -> str:
    """The AllReduceMoments group of one layer's forward or backward reduction."""
    group = f"normsvc.keras/{kind}/{name}"
    if len(group) > _MAX_GROUP:
        group = f"normsvc.keras/{kind}/sha256:{hashlib.sha256(name.encode()).hexdigest()}"
    return group


def _distributed() -> tuple[int, int]:
    """(rank, world_size) of torch.distributed when it is initialized, else (0, 1)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# --- batch renormalization and virtual batches -------------------------------------------

#: Whether this Keras' BatchNormalization has batch renormalization (older Keras 3 releases have none).
_KERAS_RENORM = "renorm" in inspect.signature(keras.layers.BatchNormalization.__init__).parameters
#: Batch renormalization's statistics: Keras 3's variable names, RunningStats' fields (in RunningStats.renorm's
#: order) and the export's leaves alike.
_RENORM = ("moving_stddev", "renorm_mean", "renorm_stddev")


def _check_extras(renorm, clipping, renorm_momentum, virtual_batch_size, mode: str) -> None:
    """tf.keras' renorm and virtual batch arguments checked as the service checks them, early."""
    if renorm and not _KERAS_RENORM:
        raise FailedPrecondition(f"renorm=True: this Keras ({keras.__version__}) has no batch renormalization "
                                 "in its BatchNormalization: expected a Keras that has it, or renorm=False",
                                 field="renorm")
    if virtual_batch_size is not None and mode == "sync":
        raise InvalidArgument(f"virtual_batch_size={virtual_batch_size!r} with mode='sync': each virtual batch "
                              "lies within one rank and is normalized with its own statistics, so there is "
                              "nothing to synchronize; expected mode='shared'", field="virtual_batch_size")
    if renorm:
        extras = dict(renorm=renorm, renorm_clipping=clipping, renorm_momentum=renorm_momentum)
    else:  # Keras keeps renorm_clipping and renorm_momentum without renorm; neither has a meaning then
        extras = dict(renorm=renorm)
    make_config(kind="batch", convention="keras", virtual_batch_size=virtual_batch_size, **extras)


# --- the layer -------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="normsvc")
class SharedBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization whose moving statistics are shared through normsvc.

    **Training** (``training=True`` on a trainable layer) with ``mode="shared"``
    returns what Keras returns: ``gamma * (x - mean(x)) / sqrt(var(x) + epsilon)
    + beta`` over this rank's batch (the variance biased, from
    ``torch.var_mean``: not ``E[x^2] - E[x]^2`` as Keras' torch backend).  Each such call is step ``s`` of this
    layer (``s`` counts its training calls from 0, :attr:`step`) and pushes the
    batch's moments as rank ``rank``'s contribution to step ``s`` of ``run``;
    once all ``world_size`` ranks contributed, the service applies ONE update
    ``moving = moving * momentum + batch * (1 - momentum)`` with the moments of
    all their batches together.  The call never waits for the other ranks.

    With ``mode="sync"`` the call waits for every rank (AllReduceMoments) and
    normalizes with the moments of all ranks' batches; its backward pass
    reduces ``sum(dy)`` and ``sum(dy * (x - mean))`` across ranks, as
    SyncBatchNorm does, so ``dx`` is exact.  (``gamma``'s and ``beta``'s
    gradients stay per rank: averaging them is the data-parallel trainer's
    gradient all-reduce, as for every other weight.)

    **Batch renormalization** (``renorm=True``, Ioffe 2017, as Keras 3's and
    tf.keras' ``BatchNormalization(renorm=True)``): training corrects the
    normalized batch towards the renorm moving averages, ``y = ((x - mean) / s
    * r + d) * gamma + beta`` with ``s = sqrt(var + epsilon)``, ``r = clip(s /
    max(renorm_stddev, sqrt(epsilon)), rmin, rmax)`` and ``d = clip((mean -
    renorm_mean) / max(renorm_stddev, sqrt(epsilon)), -dmax, dmax)``, where
    ``renorm_mean`` and ``renorm_stddev`` are the layer's variables (the
    service's last answer, before this step) and ``r`` and ``d`` carry no
    gradient.  In shared mode ``mean`` and ``var`` are this rank's, in sync
    mode those of all ranks' batches (every rank then holds the same renorm
    variables, so ``r`` and ``d`` are the same everywhere).  The service layer
    takes tf.keras' renorm update: ``moving_mean`` with ``momentum``,
    ``moving_stddev`` the moving average of ``s`` and ``moving_variance =
    max(moving_stddev**2 - epsilon, 0)``, ``renorm_mean`` and
    ``renorm_stddev`` the moving averages of ``mean`` and ``s`` with
    ``renorm_momentum``.

    **Virtual batches** (``virtual_batch_size=v``, tf.keras' ghost batches;
    shared mode): the batch of ``B`` samples (a multiple of ``v``) splits into
    ``B / v`` virtual batches of ``v`` samples as tf.keras splits it (sample
    ``i`` is in virtual batch ``i % (B / v)``), each normalized with its own
    mean and variance.  The pushed moments are per virtual batch; the
    service averages the means and the variances of a step's virtual batches
    (every rank's: one process whose batch is made of them) into ONE update,
    as tf.keras does.  With renorm, ``r`` and ``d`` come from those averages.

    After each training call the moving variables (``moving_mean``,
    ``moving_variance``, and with renorm ``moving_stddev``, ``renorm_mean``,
    ``renorm_stddev``) hold the service's answer: every step applied so far.
    In sync mode that includes the call's own step; in shared mode a rank
    that is not the last of its step gets the statistics up to an earlier
    step, so its variables lag the service by the steps still open (and its
    renorm correction uses the renorm averages it holds).  :meth:`pull` (or
    :func:`load_moving_stats` with a Client) brings them up to date, e.g.
    before evaluating or saving.

    **Inference** (``training=False``, or ``trainable=False``: a frozen layer
    runs in inference mode, as Keras' does) is Keras' own:
    ``gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta``
    with the local variables; it never calls the service.

    Parameters
    ----------
    target : str, normsvc.Client, normsvc.Store or None
        Where the statistics live: a server address (one Client per address
        and process, made on first use), a Client (a token or TLS: pass the
        Client) or an in-process Store (``mode="shared"`` only).  None: none
        yet (see :func:`connect`).  ``get_config`` keeps the address only:
        never a token, and None for a Store.
    axis, momentum, epsilon, center, scale, *_initializer, *_regularizer, *_constraint
        As ``keras.layers.BatchNormalization``.  The service layer is created
        at the first training call; if it holds no statistics yet and this
        layer's moving statistics are not the initial 0 and 1 (a pretrained
        model), rank 0 writes them into it first.
    mode : {"shared", "sync"}
        Local batch statistics with shared moving statistics, or synchronized
        batch statistics (needs a Client or an address).
    rank, world_size : int, optional
        This process among the data-parallel ranks (both or neither); left
        out, those of ``torch.distributed`` when it is initialized at the
        training call, else 0 and 1.
    run : str, optional
        The training run the steps belong to, the same on every rank and new
        for each run (a rerun of steps the run already applied is refused);
        default :func:`normsvc.config.default_run`.
    layer_name : str, optional
        The service layer's name; default ``prefix`` + this layer's Keras
        path (``moving_mean.path`` without ``/moving_mean``, e.g.
        ``sequential/batch_normalization``), the name :func:`load_moving_stats`
        looks for.  Give Keras layers explicit names when several processes
        build the same model.
    prefix : str, optional
        Namespace put before the Keras path (ignored with ``layer_name``).
    renorm, renorm_clipping, renorm_momentum
        As ``keras.layers.BatchNormalization`` (batch renormalization: see
        above; ``renorm_clipping`` a dict with keys among "rmin", "rmax",
        "dmax", fixed numbers).  The service layer is created with the same.
        Needs a Keras whose BatchNormalization has ``renorm``.
    virtual_batch_size : int, optional
        tf.keras' ghost batches (see above; Keras 3 has no such argument).
        ``mode="shared"`` only, no mask, and ``axis`` must not be the batch
        axis.  Inference is unchanged.
    synchronized
        Accepted at its default for ``BatchNormalization`` configs;
        ``synchronized=True`` is refused (use ``mode="sync"``).

    Call arguments
    --------------
    inputs : tensor
    training : bool
        Training mode (batch statistics, a service call) or inference.
    mask : tensor, optional
        As Keras': masked positions count in neither the batch moments nor
        the pushed count (shared mode without virtual batches only).

    Raises
    ------
    InvalidArgument, InvalidType
        A bad argument, named.  Training calls raise what the service raises
        (e.g. FailedPrecondition for a step the run has already applied).
    """

    def __init__(self, target, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, *,
                 mode: str = "shared", rank: int | None = None, world_size: int | None = None,
                 run: str | None = None, layer_name: str | None = None, prefix: str | None = None,
                 synchronized=False, renorm=False, renorm_clipping=None, renorm_momentum=0.99,
                 virtual_batch_size=None, **kwargs):
        if mode not in MODES:
            raise InvalidArgument(f"mode={mode!r}: expected 'shared' or 'sync'", field="mode")
        if synchronized:
            raise InvalidArgument("synchronized=True: expected mode='sync', which synchronizes the batch "
                                  "statistics through normsvc on any backend", field="synchronized")
        _check_extras(renorm, renorm_clipping, renorm_momentum, virtual_batch_size, mode)
        if (rank is None) != (world_size is None):
            raise InvalidArgument(f"rank={rank!r}, world_size={world_size!r}: expected both or neither "
                                  "(neither: torch.distributed's, else 0 and 1)",
                                  field="rank" if rank is None else "world_size")
        if rank is not None or run is not None:
            step_arguments(0, 0 if rank is None else rank, 1 if world_size is None else world_size, run)
        for field, value in (("layer_name", layer_name), ("prefix", prefix)):
            if value is not None and not isinstance(value, str):
                raise InvalidType(f"{field}={value!r}: expected a string or None", field=field)
        if layer_name == "":
            raise InvalidArgument("layer_name='': expected a layer name or None", field="layer_name")
        target = _check_target(target, mode)
        if _KERAS_RENORM:
            kwargs.update(renorm=bool(renorm), renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum)
        super().__init__(axis=axis, momentum=momentum, epsilon=epsilon, center=center, scale=scale, **kwargs)
        if not _KERAS_RENORM:  # an older Keras: renorm is False (checked above)
            self.renorm, self.renorm_clipping, self.renorm_momentum = False, None, renorm_momentum
        self.virtual_batch_size = None if virtual_batch_size is None else int(virtual_batch_size)
        self.mode = mode
        self.target = target
        self.rank = rank
        self.world_size = world_size
        self.run = run
        self.layer_name = layer_name
        self.prefix = prefix
        #: The step number of the next training call (their count so far); set it to resume a run.
        self.step = 0
        #: The RunningStats of the last answer (None before the first training call).
        self.last_stats = None

    # --- service ------------------------------------------------------------------

    @property
    def target(self):
        """The address, Client or Store the statistics live in (None: none yet); settable."""
        return self._target

    @target.setter
    def target(self, value):
        self._target = _check_target(value, self.mode, self.name)
        self._created = None

    @property
    def service_name(self) -> str:
        """The service layer's name: ``layer_name``, else ``prefix`` + this layer's Keras path."""
        if self.layer_name is not None:
            return self.layer_name
        if self.moving_mean is None:
            raise FailedPrecondition(f"layer {self.name!r} is not built: its service name comes from its "
                                     "variables' path (build it, or pass layer_name)", field="layer_name")
        return (self.prefix or "") + self.moving_mean.path.rsplit("/", 1)[0]

    def _service(self):
        target = self.target
        if target is None:
            raise FailedPrecondition(f"layer {self.name!r} has no target: expected one (normsvc.keras.connect("
                                     "model, target), or layer.target = ...)", field="target")
        return _client_for(target) if isinstance(target, str) else target

    def _ensure_layer(self, service, rank: int) -> str:
        """Create the service layer on the first training call (idempotent, so every rank may).

        A layer holding statistics wins; a fresh one takes this layer's moving
        statistics when they are not the initial ones (a pretrained or
        converted model), written by rank 0 alone before its first
        contribution, so no step can be applied before them.
        """
        name = self.service_name
        key = f"{id(service)}:{name}"  # a str: Keras' attribute tracking leaves it as it is
        if self._created != key:
            extras = {}
            if self.renorm:
                extras.update(renorm=True, renorm_clipping=dict(self.renorm_clipping or {}),
                              renorm_momentum=self.renorm_momentum)
            if self.virtual_batch_size is not None:
                extras["virtual_batch_size"] = self.virtual_batch_size
            service.create_layer(name, kind="batch", axis=self.axis, num_features=int(self.moving_mean.shape[0]),
                                 convention="keras", momentum=self.momentum, epsilon=self.epsilon,
                                 center=self.center, scale=self.scale, **extras)
            if rank == 0:
                self._seed(service, name)
            self._created = key
        return name

    def _seed(self, service, name: str) -> None:
        """Write this layer's moving variables (renorm's too) into a service layer that has none yet."""
        values = {leaf: np.asarray(var.numpy(), dtype=np.float64) for leaf, var in self._moving_variables()}
        if _is_initial(values, 0):
            return
        stats = service.layer(name).stats()
        held = {"moving_mean": stats.mean, "moving_variance": stats.variance} | dict(zip(_RENORM, stats.renorm or ()))
        if not _is_initial(held, stats.num_batches):
            return
        from safetensors.numpy import save_file

        with tempfile.TemporaryDirectory(prefix="normsvc-keras-") as tmp:  # the public import, Store or Client
            path = os.path.join(tmp, "seed.safetensors")
            save_file({f"{name}/{leaf}": value for leaf, value in values.items()}, path)
            service.import_(path, naming="keras", layers=[name])

    def _moving_variables(self) -> list:
        """(export leaf, Keras variable) of every moving statistic: renorm's too when it has them."""
        pairs = [("moving_mean", self.moving_mean), ("moving_variance", self.moving_variance)]
        if self.renorm:
            pairs.extend((leaf, getattr(self, leaf)) for leaf in _RENORM)
        return pairs

    def _ranks(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size
        return _distributed()

    def _assign(self, stats) -> None:
        values = [stats.mean, stats.variance]
        if self.renorm:
            if stats.renorm is None:
                raise FailedPrecondition(f"service layer {self.service_name!r} has no renorm statistics, and layer "
                                         f"{self.name!r} has renorm=True: expected a renorm layer",
                                         layer=self.service_name)
            values.extend(stats.renorm)
        for (_, var), value in zip(self._moving_variables(), values):
            var.assign(np.asarray(value, dtype=var.dtype))
        self.last_stats = stats

    def pull(self):
        """Assign the service's current statistics to the moving variables (renorm's too); returns them."""
        service = self._service()
        stats = service.layer(self.service_name).stats()
        self._assign(stats)
        return stats

    # --- call ---------------------------------------------------------------------

    def build(self, input_shape):
        if self.virtual_batch_size is not None and len(input_shape) and self.axis % len(input_shape) == 0:
            raise InvalidArgument(f"layer {self.name!r}: axis={self.axis} is the batch axis, which "
                                  f"virtual_batch_size={self.virtual_batch_size} splits: expected a feature axis",
                                  field="axis")
        super().build(input_shape)

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        if _symbolic(inputs):  # shapes only: the output's are the inference call's, which updates nothing
            return super().call(inputs, training=False, mask=mask)
        if keras.backend.backend() != "torch":
            raise FailedPrecondition(f"SharedBatchNormalization {self.name!r} trains on the torch backend "
                                     f"(KERAS_BACKEND=torch); this is {keras.backend.backend()!r}")
        if mask is not None:
            if self.mode == "sync" or self.virtual_batch_size is not None:
                why = "mode='sync'" if self.mode == "sync" else f"virtual_batch_size={self.virtual_batch_size}"
                raise InvalidArgument(f"layer {self.name!r}: {why} takes no mask: expected mask=None", field="mask")
            if len(mask.shape) != len(inputs.shape) - 1:
                raise InvalidArgument(f"layer {self.name!r}: mask.shape={tuple(mask.shape)} with inputs.shape="
                                      f"{tuple(inputs.shape)}: expected one dimension less than the inputs",
                                      field="mask")
        if self.virtual_batch_size is not None:
            batch = int(inputs.shape[0])
            if batch == 0 or batch % self.virtual_batch_size:
                raise InvalidArgument(f"layer {self.name!r}: a batch of {batch} with virtual_batch_size="
                                      f"{self.virtual_batch_size}: expected a positive multiple of it",
                                      field="inputs")
        import torch

        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        axes = list(self._reduction_axes)
        service = self._service()
        rank, world_size = self._ranks()
        name = self._ensure_layer(service, rank)
        gamma = ops.cast(self.gamma, x.dtype) if self.scale else None
        beta = ops.cast(self.beta, x.dtype) if self.center else None
        if self.mode == "shared":
            y, stats = self._shared_forward(torch, service, name, x, axes, mask, rank, world_size, gamma, beta)
        else:
            y, stats = self._sync_forward(torch, service, name, x, axes, rank, world_size, gamma, beta)
        self._assign(stats)
        self.step += 1
        return ops.cast(y, self.compute_dtype)

    def _shared_forward(self, torch, service, name, x, axes, mask, rank, world_size, gamma, beta):
        """This rank's batch statistics (per virtual batch with virtual batches); pushes their moments."""
        if self.virtual_batch_size is None:
            mean, variance, count = _batch_moments(torch, x, axes, mask)
            pushed_mean, pushed_variance = mean, variance
            batch_mean, batch_variance = mean, variance
        else:
            xv, mean, variance, count = _virtual_moments(torch, x, self.axis, self.virtual_batch_size)
            features = x.shape[self.axis]
            pushed_mean, pushed_variance = mean.reshape(-1, features), variance.reshape(-1, features)
            # tf.keras' batch statistics with virtual batches: the averages over them
            batch_mean, batch_variance = pushed_mean.mean(dim=0), pushed_variance.mean(dim=0)
        if self.renorm:  # from the renorm averages held before this step's answer is assigned
            gamma, beta = self._renorm_affine(torch, batch_mean, batch_variance, gamma, beta)
        local = Moments.from_variance(count, pushed_mean.detach().double().cpu().numpy(),
                                      pushed_variance.detach().double().cpu().numpy())
        stats = service.update_many({name: local}, step=self.step, rank=rank, world_size=world_size,
                                    run=self.run)[name]
        if self.virtual_batch_size is None:
            y = ops.batch_normalization(x, mean, variance, axis=self.axis, offset=beta, scale=gamma,
                                        epsilon=self.epsilon)
            return y, stats
        shape = [1] * xv.ndim
        shape[self.axis % x.ndim + 1] = -1
        y = (xv - mean) * torch.rsqrt(variance + self.epsilon)
        if gamma is not None:
            y = y * gamma.reshape(shape)
        if beta is not None:
            y = y + beta.reshape(shape)
        return y.reshape(x.shape), stats

    def _renorm_affine(self, torch, mean, variance, gamma, beta):
        """``gamma`` and ``beta`` composed with batch renormalization's correction of this step.

        ``(x_hat * r + d) * gamma + beta = x_hat * (r * gamma) + (d * gamma + beta)``, with ``r`` and
        ``d`` (no gradient) from the batch statistics and the renorm variables, as Keras 3 computes them.
        """
        mean, variance = mean.detach(), variance.detach()
        floor = math.sqrt(self.epsilon)
        renorm_mean = ops.cast(self.renorm_mean, mean.dtype).detach()
        renorm_stddev = torch.clamp(ops.cast(self.renorm_stddev, mean.dtype).detach(), min=floor)
        r = torch.sqrt(variance + self.epsilon) / renorm_stddev
        d = (mean - renorm_mean) / renorm_stddev
        clipping = self.renorm_clipping or {}
        rmin, rmax, dmax = (clipping.get(key) for key in ("rmin", "rmax", "dmax"))
        if rmin is not None:
            r = torch.clamp(r, min=float(rmin))
        if rmax is not None:
            r = torch.clamp(r, max=float(rmax))
        if dmax is not None:
            d = torch.clamp(d, -float(dmax), float(dmax))
        scale = r if gamma is None else r * gamma
        offset = d if gamma is None else d * gamma
        return scale, offset if beta is None else offset + beta

    def _sync_forward(self, torch, service, name, x, axes, rank, world_size, gamma, beta):
        step, run = self.step, self.run
        count = math.prod(x.shape[a] for a in axes)
        with torch.no_grad():
            if not count:
                variance = mean = torch.zeros(x.shape[self.axis])
            elif len(axes) == x.ndim - 1:
                # torch's batch-norm statistics kernel, the channel axis moved to dim 1 (a view):
                # var_mean over the other axes took 48 ms for a 32x28x28x256 input where this takes 2
                channel = next(i for i in range(x.ndim) if i not in axes)
                mean, variance = torch.batch_norm_update_stats(x.movedim(channel, 1), None, None, 0.0)
            else:
                variance, mean = torch.var_mean(x, dim=axes, correction=0)
        local = Moments.from_variance(float(count), mean.double().cpu().numpy(), variance.double().cpu().numpy())
        result = _allreduce(service, {name: local}, step=step, rank=rank, world_size=world_size,
                            group=_group("forward", name), run=run)
        merged = result.moments[name]
        global_mean = torch.as_tensor(merged.mean, device=x.device).to(x.dtype)
        if self.renorm:  # r and d from the global moments: the same on every rank
            global_variance = torch.as_tensor(merged.variance, device=x.device).to(x.dtype)
            gamma, beta = self._renorm_affine(torch, global_mean, global_variance, gamma, beta)
        shape = [1] * x.ndim
        shape[self.axis] = -1
        mean = global_mean.reshape(shape)
        invstd = torch.as_tensor(1.0 / np.sqrt(merged.variance + self.epsilon), device=x.device)
        invstd = invstd.to(x.dtype).reshape(shape)

        def reduce_sums(sum_dy, sum_dy_xmu):
            """Means over all ranks' samples of the two backward sums (torch's SyncBatchNorm reduction)."""
            sums = torch.cat([sum_dy, sum_dy_xmu]).double().cpu().numpy()
            local = Moments(np.float64(count), sums / count if count else np.zeros_like(sums), np.zeros_like(sums))
            out = _allreduce(service, {name: local}, step=step, rank=rank, world_size=world_size,
                             group=_group("backward", name), update_stats=False, run=run).moments[name]
            means = torch.as_tensor(out.mean, device=sum_dy.device).to(sum_dy.dtype)
            return means[:sum_dy.numel()], means[sum_dy.numel():]

        x_hat = _sync_normalize()(x, mean, invstd, tuple(axes), reduce_sums)
        y = x_hat
        if gamma is not None:
            y = y * ops.reshape(gamma, shape)
        if beta is not None:
            y = y + ops.reshape(beta, shape)
        return y, result.stats[name]

    def get_config(self):
        config = super().get_config()
        # Once built, the service name is kept as it is: Keras may give a loaded model's variables
        # other paths (a loaded Sequential's lose the model's name), and the layer must stay the same.
        layer_name = self.service_name if self.layer_name is None and self.moving_mean is not None \
            else self.layer_name
        config.update(target=_address(self.target), mode=self.mode, rank=self.rank, world_size=self.world_size,
                      run=self.run, layer_name=layer_name, prefix=self.prefix,
                      virtual_batch_size=self.virtual_batch_size)
        return config


def _is_initial(values: dict, num_batches: int) -> bool:
    """Statistics no batch has changed: Keras' initial values, 0 for the means and 1 for the rest.

    ``values`` maps export leaves (``moving_mean``, ``moving_variance``, renorm's) to arrays.
    """
    zeros = ("moving_mean", "renorm_mean")
    return num_batches == 0 and all(
        not np.any(value) if leaf in zeros else bool(np.all(np.asarray(value) == 1.0))
        for leaf, value in values.items())


def _symbolic(x) -> bool:
    """A call that only computes shapes (Keras tensors; the torch backend's meta tensors)."""
    if keras.backend.is_keras_tensor(x):
        return True
    device = getattr(x, "device", None)
    return getattr(device, "type", None) == "meta"


def _batch_moments(torch, x, axes, mask):
    """Differentiable batch mean and biased variance over ``axes`` (two passes), and the sample count."""
    if mask is None:
        variance, mean = torch.var_mean(x, dim=axes, correction=0)
        return mean, variance, float(math.prod(x.shape[a] for a in axes))
    w = mask.to(x.dtype).unsqueeze(-1).expand_as(x)
    n = w.sum(dim=axes, keepdim=True)
    mean = (x * w).sum(dim=axes, keepdim=True) / n
    centered = (x - mean) * w
    variance = (centered * centered).sum(dim=axes, keepdim=True) / n
    return mean.reshape(-1), variance.reshape(-1), float(n.reshape(-1)[0])


def _virtual_moments(torch, x, axis: int, virtual_batch_size: int):
    """``x`` split into virtual batches as tf.keras splits it, and their moments.

    Returns ``(xv, mean, variance, count)``: ``xv`` of shape ``(v, B / v, ...)``
    (sample ``i`` in virtual batch ``i % (B / v)``), the differentiable mean
    and biased variance per virtual batch and feature (kept dimensions, so
    they broadcast against ``xv``), and the samples per virtual batch.
    """
    batch = x.shape[0]
    xv = x.reshape((virtual_batch_size, batch // virtual_batch_size) + tuple(x.shape[1:]))
    kept = (1, axis % x.ndim + 1)
    dims = [d for d in range(xv.ndim) if d not in kept]
    variance, mean = torch.var_mean(xv, dim=dims, correction=0, keepdim=True)
    return xv, mean, variance, float(math.prod(xv.shape[d] for d in dims))


_SYNC_NORMALIZE = None


def _sync_normalize():
    """``x_hat = (x - mean) * invstd`` with SyncBatchNorm's exact backward (built on first use: torch)."""
    global _SYNC_NORMALIZE
    if _SYNC_NORMALIZE is None:
        import torch

        class SyncNormalize(torch.autograd.Function):
            """``mean`` and ``invstd`` are the global batch moments of ``x`` and of the other ranks' inputs.

            The backward is torch's SyncBatchNorm's (torch/nn/modules/_functions.py), for the gradient
            ``g`` of ``x_hat``: ``dx = (g - mean(g) - (x - mean) * invstd**2 * mean(g * (x - mean))) * invstd``
            with both means over all ranks' samples (``reduce_sums``).
            """

            @staticmethod
            def forward(ctx, x, mean, invstd, axes, reduce_sums):
                ctx.save_for_backward(x, mean, invstd)
                ctx.axes, ctx.reduce_sums = axes, reduce_sums
                return (x - mean) * invstd

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, g):
                x, mean, invstd = ctx.saved_tensors
                xmu = x - mean
                axes = list(ctx.axes)
                mean_dy, mean_dy_xmu = ctx.reduce_sums(g.sum(dim=axes), (g * xmu).sum(dim=axes))
                mean_dy, mean_dy_xmu = mean_dy.reshape(mean.shape), mean_dy_xmu.reshape(mean.shape)
                # dx = (g - mean_dy - xmu * invstd**2 * mean_dy_xmu) * invstd, written into xmu: a new
                # activation-sized tensor per operation costs page faults on large inputs
                dx = xmu.mul_(invstd * invstd * mean_dy_xmu)
                dx = torch.sub(g, dx, out=dx).sub_(mean_dy).mul_(invstd)
                return dx, None, None, None, None

        _SYNC_NORMALIZE = SyncNormalize.apply
    return _SYNC_NORMALIZE


# --- models ------------------------------------------------------------------------------


def _all_layers(model) -> list:
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=True, recursive=True))
    found = [model]
    for layer in getattr(model, "layers", []):
        found.extend(_all_layers(layer))
    return found


def _batch_norms(model) -> list:
    return [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def _cloneable() -> tuple:
    """The model classes clone_model takes a clone_function for: Sequential and functional models."""
    try:
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover - a Keras that moved it: clone_model's own error then
        return (keras.Model,)
    return (keras.Sequential, Functional)


def share(model, target, *, mode: str = "shared", prefix: str | None = None, rank: int | None = None,
          world_size: int | None = None, run: str | None = None):
    """A copy of ``model`` whose BatchNormalization layers share their statistics through ``target``.

    Every ``keras.layers.BatchNormalization`` (a SharedBatchNormalization too,
    keeping an explicit ``layer_name``) becomes a
    :class:`SharedBatchNormalization` with the same config and these
    arguments; every other layer is cloned as ``keras.models.clone_model``
    clones it (nested models too).  The copy keeps the model's weights,
    moving statistics included.  Its shared layers are named in the service
    ``prefix`` + their Keras path, which the copy keeps from ``model``
    (``sequential/batch_normalization``), as :func:`load_moving_stats` names
    them.  At the first training call a service layer that holds statistics
    wins (the variables take them); a fresh one takes the model's moving
    statistics (rank 0 writes them; a renorm layer's renorm statistics too),
    so fine-tuning starts from them.  A ``renorm=True`` layer stays one, with
    its clipping and renorm momentum.

    Parameters
    ----------
    model : keras.Model
        A Sequential or functional model (a subclassed model cannot be
        cloned: use SharedBatchNormalization in its code instead).
    target, mode, prefix, rank, world_size, run
        As :class:`SharedBatchNormalization`.

    Returns
    -------
    keras.Model
    """
    if not isinstance(model, keras.Model):
        raise InvalidType(f"model={model!r}: expected a keras.Model (Sequential or functional)", field="model")
    target = _check_target(target, mode)
    pairs = []

    def convert(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            config = layer.get_config()  # renorm's options (and virtual_batch_size) carry over as they are
            config.pop("synchronized", None)
            for key in ("target", "mode", "rank", "world_size", "run", "prefix", "layer_name"):
                config.pop(key, None)
            new = SharedBatchNormalization(target, mode=mode, rank=rank, world_size=world_size, run=run,
                                           prefix=prefix, layer_name=getattr(layer, "layer_name", None), **config)
        else:
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    if not isinstance(model, _cloneable()):
        raise InvalidArgument(f"model {model.name!r} is a subclassed {type(model).__name__}: share() clones "
                              "Sequential and functional models; use SharedBatchNormalization in its code",
                              field="model")
    clone = keras.models.clone_model(model, clone_function=convert, recursive=True)
    for old, new in pairs:
        weights = old.get_weights()
        if weights:
            if not new.built:
                raise FailedPrecondition(f"layer {old.name!r} is built but its copy is not: expected a model "
                                         "with an Input (or build the copy and set its weights)", field="model")
            new.set_weights(weights)
    return clone


def connect(model, target) -> list:
    """Give every SharedBatchNormalization in ``model`` the ``target`` (e.g. after loading it).

    Returns the layers' service names (or Keras names for unbuilt layers).
    """
    target = _check_target(target)
    layers = [layer for layer in _all_layers(model) if isinstance(layer, SharedBatchNormalization)]
    for layer in layers:
        _check_target(target, layer.mode, layer.name)
    for layer in layers:
        layer.target = target
    return [layer.service_name if layer.built or layer.layer_name else layer.name for layer in layers]


# --- loading ------------------------------------------------------------------------------


def close(model) -> None:
    """End the reduction streams of the services ``model``'s sync-mode layers reduce through.

    Sync mode sends its AllReduceMoments as messages of one open stream per
    service and training thread (the thread where the backward runs too),
    and each open stream holds one of the server's stream slots; this ends
    them (for every model on those services).  A later training call opens
    another.  Shared mode holds none.
    """
    services = {}
    for layer in _batch_norms(model):
        if isinstance(layer, SharedBatchNormalization) and layer.mode == "sync" and layer.target is not None:
            service = layer._service()
            services[id(service)] = service
    for key, service in services.items():
        with _STREAMS_LOCK:
            streams = _STREAMS.get(key)
            if streams is None or streams.target is not service:
                continue
            del _STREAMS[key]
        streams.close()


def load_moving_stats(model, source, *, prefix: str | None = None) -> list:
    """Set the moving statistics of ``model``'s BatchNormalization layers from ``source``.

    Each layer's ``moving_mean`` and ``moving_variance`` are matched by their
    Keras ``path``: the variable ``sequential/bn/moving_mean`` takes layer
    ``prefix + "sequential/bn"`` of a Store or a Client, or tensor
    ``prefix + "sequential/bn/moving_mean"`` of a safetensors file with Keras
    naming (what ``store.export(path)`` writes).  Values are the layer's as
    stored (a torch-convention layer's variance is unbiased).

    A layer with ``renorm=True`` also takes ``moving_stddev``,
    ``renorm_mean`` and ``renorm_stddev`` when the source has them (a renorm
    layer of the service; tensors ``.../moving_stddev``, ``.../renorm_mean``
    and ``.../renorm_stddev`` of a file, all three or none).  From a source
    without them it gets ``moving_stddev = sqrt(variance + epsilon)``, so
    that its inference matches, and keeps its renorm averages.  A layer
    without renorm ignores them.

    All or nothing: every entry is found and checked before any variable
    changes.

    Parameters
    ----------
    model : keras.Layer
        A built model (or one BatchNormalization layer).
    source : normsvc.Store, normsvc.Client, str or os.PathLike
        A store, a client, or the path of a safetensors file.
    prefix : str, optional
        Put before every Keras path.

    Returns
    -------
    list of str
        The names looked up (layers of a service, layer prefixes of a file), in the model's order.

    Raises
    ------
    LayerNotFound
        No entry for a layer (the message names it and the Keras variable).
    InvalidArgument
        An entry of another shape than the variable's, without statistics,
        or with some of renorm's three tensors but not all.
    """
    if prefix is not None and not isinstance(prefix, str):
        raise InvalidType(f"prefix={prefix!r}: expected a string or None", field="prefix")
    prefix = prefix or ""
    layers = _batch_norms(model)
    unbuilt = [layer.name for layer in layers if layer.moving_mean is None]
    if unbuilt:
        raise FailedPrecondition(f"BatchNormalization layers {unbuilt} are not built: expected a built model "
                                 "(give it an Input, or call it on a batch)", field="model")
    names = [prefix + layer.moving_mean.path.rsplit("/", 1)[0] for layer in layers]
    if isinstance(source, (str, os.PathLike)):
        values = _from_file(os.fspath(source), layers, names)
    elif _is_service(source):
        values = _from_service(source, layers, names)
    else:
        raise InvalidType(f"source={source!r}: expected a normsvc.Store, a normsvc.Client or the path of a "
                          "safetensors file", field="source")
    writes = []
    for layer, name, found in zip(layers, names, values):
        renorm = getattr(layer, "renorm", False)
        if renorm and "moving_stddev" not in found:
            found = found | {"moving_stddev": np.sqrt(found["moving_variance"] + layer.epsilon)}
        for leaf in ("moving_mean", "moving_variance") + (_RENORM if renorm else ()):
            if leaf not in found:
                continue
            var = getattr(layer, leaf)
            value = found[leaf]
            if tuple(value.shape) != tuple(var.shape):
                raise InvalidArgument(f"{name!r} has {leaf} of shape {list(value.shape)}: expected "
                                      f"{list(var.shape)}, the shape of Keras variable {var.path!r}",
                                      layer=name, field="source")
            writes.append((var, value))
    for var, value in writes:
        var.assign(value.astype(var.dtype))
    return names


def _from_service(source, layers, names) -> list:
    if not names:
        return []
    try:
        infos = source.describe(names)
    except LayerNotFound as exc:
        missing = exc.layer if exc.layer in names else None
        if missing is None:
            raise
        path = layers[names.index(missing)].moving_mean.path
        raise LayerNotFound(f"no layer {missing!r} in {source!r} for the Keras variable {path!r}: expected "
                            "a layer named prefix + the variable's path without '/moving_mean'",
                            layer=missing) from None
    values = []
    for name, info in zip(names, infos):
        stats = info.stats
        if stats is None:
            raise InvalidArgument(f"layer {name!r} of {source!r} has no statistics yet: expected a layer that "
                                  "took at least one batch", layer=name, field="source")
        found = {"moving_mean": stats.mean, "moving_variance": stats.variance} | dict(zip(_RENORM, stats.renorm or ()))
        values.append({leaf: np.asarray(value, dtype=np.float64) for leaf, value in found.items()})
    return values


def _from_file(path: str, layers, names) -> list:
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="numpy")
    except FileNotFoundError:
        raise LayerNotFound(f"no safetensors file {path!r}: expected a file with Keras naming "
                            "(store.export(path))", field="source") from None
    except Exception as exc:  # safetensors raises its own error types for a file it cannot read
        raise InvalidArgument(f"{path!r} is not a readable safetensors file ({exc}): expected one with Keras "
                              "naming (store.export(path))", field="source") from None
    with handle as f:
        keys = set(f.keys())
        values = []
        for layer, name in zip(layers, names):
            found = {}
            for leaf, var in (("moving_mean", layer.moving_mean), ("moving_variance", layer.moving_variance)):
                key = f"{name}/{leaf}"
                if key not in keys:
                    raise LayerNotFound(f"no tensor {key!r} in {path!r} for the Keras variable {var.path!r}: "
                                        "expected Keras naming, prefix + the variable's path", layer=name,
                                        field="source")
                found[leaf] = np.asarray(f.get_tensor(key), dtype=np.float64)
            present = [leaf for leaf in _RENORM if f"{name}/{leaf}" in keys]
            if present and len(present) < len(_RENORM):
                missing = [f"{name}/{leaf}" for leaf in _RENORM if leaf not in present]
                raise InvalidArgument(f"{path!r} has {', '.join(f'{name}/{leaf}' for leaf in present)} but no "
                                      f"{', '.join(missing)}: expected all three of renorm's statistics, or none",
                                      layer=name, field="source")
            for leaf in present:
                found[leaf] = np.asarray(f.get_tensor(f"{name}/{leaf}"), dtype=np.float64)
            values.append(found)
    return values
