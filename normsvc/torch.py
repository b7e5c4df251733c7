"""PyTorch integration: BatchNorm modules whose statistics live in normsvc.

:func:`convert` swaps every ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` of a
model for a :class:`BatchNorm` backed by a :class:`normsvc.Client` (or an
in-process :class:`normsvc.Store`), in the spirit of
``nn.SyncBatchNorm.convert_sync_batchnorm``.  Two modes:

``mode="sync"`` (synchronized batch statistics, SyncBatchNorm without NCCL)
    Training: ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the
    mean and biased variance of the batches of ALL ranks, from one
    AllReduceMoments per layer and forward (messages on one open stream per
    reducing thread, :meth:`normsvc.Client.allreduce_stream`, which
    :func:`close` ends: the training thread, and on CUDA also autograd's
    thread for the device, where the backward runs); the running statistics take
    one update per step (torch convention: unbiased with the global count)
    and the module's buffers are set from the answer.  The backward is exact:
    a second reduction of ``sum(dy)`` and ``sum(dy * x_hat)`` across
    ranks, as torch's SyncBatchNorm does, so outputs, input gradients and the
    running statistics equal those of one process on the concatenated batch
    (parameter gradients too, once DDP has averaged them).  Works on CPU.
``mode="shared"`` (shared running statistics, DDP without SyncBatchNorm)
    Training: plain BatchNorm with this rank's batch statistics.  The batch
    moments of every converted layer go to the service as ONE step
    contribution per training forward of the converted model, sent by a
    background thread (the training thread does not wait for the network);
    the service merges the ranks' contributions of a step and applies ONE
    update, as one process on the concatenated batch would.  Inference
    (``eval()``) normalizes with the shared running statistics, fetched once
    on entering inference after training (and after :func:`flush`).

Inference in either mode: ``y = (x - running_mean) / sqrt(running_var + eps)
* weight + bias``, computed locally, no network.

Steps are counted, never passed: in sync mode each module's count of training
forwards keys its reductions, in shared mode the converted model's count of
training forwards keys its step contributions.  Ranks must therefore run the
same training forwards (DDP requires that anyway).  The run (see
:func:`normsvc.config.default_run`) is chosen by :func:`convert`; a fresh run
lets a new training job restart its step numbers at 0.

Only per-channel statistics cross to the host and the network, never
activations: the moments are computed on the tensor's device (CPU or CUDA).

A converted module keeps its parameters, buffers (``running_mean``,
``running_var``, ``num_batches_tracked``), ``momentum`` (None included),
``eps``, ``affine`` and ``track_running_stats``, and the same ``state_dict``
keys as the original, so checkpoints load both ways with ``strict=True``.
:func:`load_running_stats` and :func:`state_dict` bring statistics from a
Store, a Client or an exported safetensors file back to module paths.

This module uses only normsvc's public API; ``import normsvc`` does not
import it (nor torch).
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .config import DEFAULT, default_run
from .errors import FailedPrecondition, InvalidArgument, InvalidType
from .moments import Moments

__all__ = ["MODES", "BatchNorm", "Binding", "convert", "binding", "flush", "close", "load_running_stats",
           "state_dict"]

#: The two ways a converted module uses the service.
MODES = ("sync", "shared")

#: Longest AllReduceMoments group the service takes; longer ones become a digest.
_MAX_GROUP = 128
_STOP = object()


# --- convert ----------------------------------------------------------------------


def convert(module: nn.Module, target, *, mode: str = "sync", prefix: str | None = None, run: str | None = None,
            rank: int | None = None, world_size: int | None = None, timeout: float | None = None,
            max_pending: int = 4) -> nn.Module:
    """Replace every BatchNorm of ``module`` by a :class:`BatchNorm` backed by ``target``.

    Parameters
    ----------
    module : torch.nn.Module
        The model (or a single BatchNorm, which is then returned replaced).
        Convert before wrapping it in DistributedDataParallel.
    target : normsvc.Client or normsvc.Store
        Where the statistics live.  Sync mode with ``world_size > 1`` needs a
        Client (the rendezvous is on the server); shared mode takes a Store
        too, e.g. ``Store.open("sqlite:///stats.db")`` on a file every rank opens.
    mode : {"sync", "shared"}
        Synchronized batch statistics, or local batch statistics with shared
        running statistics (see the module's documentation).
    prefix : str, optional
        Put before every module path to name its layer (``"resnet50/"`` names
        ``layer1.0.bn1`` ``resnet50/layer1.0.bn1``).  Required when ``module``
        is itself a BatchNorm (its path is empty).
    run : str, optional
        The run steps belong to, the same on every rank.  Default:
        :func:`normsvc.config.default_run` (``NORMSVC_RUN``, torchrun's or
        Slurm's job id) if set; else, under an initialized
        ``torch.distributed`` (rank and world size left out), a fresh id drawn
        by rank 0 and broadcast with ``broadcast_object_list``; else, with
        ``world_size == 1``, a fresh id; else ``""`` (the default run, whose
        steps a rerun would repeat: name one, or reset the layers).
    rank, world_size : int, optional
        Default: ``torch.distributed``'s when it is initialized, else 0 and 1.
    timeout : float, optional
        Seconds a synchronized reduction waits for the other ranks before
        DeadlineExceeded (default: the Client's deadline).  Also
        :attr:`Binding.timeout`.
    max_pending : int
        Shared mode: steps queued for the background thread at most; a full
        queue makes the training thread wait (back-pressure, nothing is ever
        dropped).  Keep it below the server's ``step_lag`` (default 8).

    Returns
    -------
    torch.nn.Module
        ``module``, with its BatchNorms replaced (or the new BatchNorm).

    Layers are created with the torch convention, channel axis 1 and the
    module's momentum and eps (an existing layer with that config is reused;
    another config raises ConfigConflict).  A layer that already holds
    statistics is authoritative: they are copied into the module's buffers.
    A layer that does not is given the module's buffers (by rank 0) when they
    are not the initial ones, e.g. a pretrained checkpoint.

    Raises
    ------
    InvalidArgument
        A bad argument, a module with no BatchNorm (or one already
        converted), sync mode over a Store with ``world_size > 1``.
    ConfigConflict
        A layer exists with another config.
    """
    if not isinstance(module, nn.Module):
        raise InvalidType(f"module must be a torch.nn.Module, got {type(module).__name__}", field="module")
    if mode not in MODES:
        raise InvalidArgument(f"mode={mode!r}: expected 'sync' or 'shared'", field="mode")
    kind = _target_kind(target)
    prefix = _prefix(prefix)
    from_dist = rank is None and world_size is None and _dist_on()
    rank, world_size = _rank_world(rank, world_size)
    if mode == "sync" and world_size > 1 and kind != "client":
        raise InvalidArgument(
            f"mode='sync' with world_size={world_size} needs a normsvc.Client: an in-process Store has no "
            "rendezvous for the ranks' batch moments (use a Client, or mode='shared')", field="target")
    if kind == "store" and world_size > 1 and str(getattr(target, "url", "")).startswith("memory://"):
        raise InvalidArgument(
            f"a memory:// Store is private to this process: with world_size={world_size} the other ranks "
            "never see its steps; expected a Client or a Store every rank opens (sqlite:///path)",
            field="target")
    timeout = _timeout(timeout)
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise InvalidArgument(f"max_pending={max_pending!r}: expected a positive int", field="max_pending")
    if run is not None and (not isinstance(run, str) or len(run) > 256):
        raise InvalidArgument(f"run={run!r}: expected a string of at most 256 characters", field="run")

    found = _batch_norms(module)
    layers = {path: prefix + path for path, _ in found}
    if "" in layers.values():
        raise InvalidArgument("module is itself a BatchNorm: expected a prefix to name its layer", field="prefix")

    tracked = {path: bn for path, bn in found if _tracks(bn)}
    _setup_layers(target, {layers[p]: bn for p, bn in tracked.items()}, rank)
    run = _resolve_run(run, world_size, from_dist)

    bind = Binding(target, mode=mode, run=run, rank=rank, world_size=world_size, timeout=timeout,
                   layers=sorted(layers.values()), rendezvous=kind == "client", max_pending=max_pending)
    replaced = {path: BatchNorm.from_module(bn, layer=layers[path], binding=bind) for path, bn in found}
    bind.modules = {layers[path]: new for path, new in replaced.items()}
    if "" in replaced:
        return _attached(replaced[""], bind)
    by_id = {id(bn): replaced[path] for path, bn in found}
    # every path of a module (one module may sit at several): named after its first, as named_modules() lists it
    for path, m in list(module.named_modules(remove_duplicate=False)):
        if path and id(m) in by_id:
            parent, _, child = path.rpartition(".")
            (module.get_submodule(parent) if parent else module).add_module(child, by_id[id(m)])
    return _attached(module, bind)


def _attached(module: nn.Module, bind: Binding) -> nn.Module:
    """The converted model, whose forwards delimit shared mode's steps."""
    if bind.mode == "shared":
        bind._attach(module)
    return module


def _batch_norms(module: nn.Module) -> list:
    found = []
    for path, m in module.named_modules():
        if isinstance(m, BatchNorm):
            raise InvalidArgument(
                f"module {path or type(module).__name__!r} is already backed by normsvc (layer {m.layer!r}): "
                "expected a model with plain torch BatchNorms (convert once)", field="module")
        if isinstance(m, _BatchNorm):
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
                raise InvalidArgument(
                    f"module {path!r} is a {type(m).__name__} that has not seen a batch yet: run one forward "
                    "first, so that its number of features is known", field="module")
            found.append((path, m))
    if not found:
        raise InvalidArgument(f"{type(module).__name__} holds no BatchNorm1d/2d/3d or SyncBatchNorm to convert",
                              field="module")
    return found


def _tracks(bn: _BatchNorm) -> bool:
    """Whether a BatchNorm keeps running statistics (buffers present and tracked).  Reads the buffer
    dict directly: ``bn.running_mean`` would go through ``nn.Module.__getattr__`` (per layer, per step)."""
    buffers = bn._buffers
    return bool(bn.track_running_stats) and buffers.get("running_mean") is not None \
        and buffers.get("running_var") is not None


def _target_kind(target) -> str:
    """"client" (has the AllReduceMoments rendezvous) or "store"; InvalidType for anything else."""
    client_module = sys.modules.get("normsvc.client")
    if client_module is not None and isinstance(target, client_module.AsyncClient):
        raise InvalidType("target is an AsyncClient, whose methods are coroutines: expected a normsvc.Client "
                          "(blocking) or a normsvc.Store", field="target")
    needed = ("create_layer", "update_many", "describe", "import_")
    if not all(callable(getattr(target, name, None)) for name in needed):
        raise InvalidType(f"target must be a normsvc.Client or a normsvc.Store, got {type(target).__name__}",
                          field="target")
    return "client" if callable(getattr(target, "allreduce", None)) else "store"


def _prefix(prefix) -> str:
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        raise InvalidArgument(f"prefix must be a string, got {prefix!r}", field="prefix")
    return prefix


def _dist_on() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank_world(rank, world_size) -> tuple[int, int]:
    if rank is None and world_size is None:
        if _dist_on():
            import torch.distributed as dist

            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        missing = "rank" if rank is None else "world_size"
        raise InvalidArgument(f"{missing} is missing: expected rank and world_size together (or neither, to take "
                              "torch.distributed's)", field=missing)
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{name}={value!r}: expected an int", field=name)
    if world_size < 1 or not 0 <= rank < world_size:
        field = "world_size" if world_size < 1 else "rank"
        raise InvalidArgument(f"rank={rank}, world_size={world_size}: expected 0 <= rank < world_size",
                              field=field)
    return rank, world_size


def _timeout(timeout):
    if timeout is None:
        return DEFAULT
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise InvalidArgument(f"timeout={timeout!r}: expected a positive number of seconds, or None",
                              field="timeout")
    return float(timeout)


def _resolve_run(run, world_size: int, from_dist: bool) -> str:
    """The run every rank agrees on (see :func:`convert`); collective under torch.distributed."""
    if run is None:
        run = default_run()
    if not run and from_dist:
        import torch.distributed as dist

        box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    if not run and world_size == 1:
        return uuid.uuid4().hex
    return run


def _is_initial(mean: np.ndarray, var: np.ndarray, num_batches: int) -> bool:
    return num_batches == 0 and not np.any(mean) and bool(np.all(var == 1.0))


def _setup_layers(target, modules: dict, rank: int) -> None:
    """Create (or reuse) a layer per tracked module, then reconcile statistics and buffers.

    A layer holding statistics wins (a shared layer may be ahead of this
    process); a fresh layer takes the module's buffers when they are not the
    initial ones (a checkpoint).  Only rank 0 writes them: every rank loaded
    the same checkpoint, and one writer cannot race another.
    """
    if not modules:
        return
    for name, bn in modules.items():
        target.create_layer(name, kind="batch", axis=1, convention="torch", momentum=bn.momentum, epsilon=bn.eps,
                            num_features=bn.num_features)
    infos = {info.name: info for info in target.describe(list(modules))}
    seed = {}
    for name, bn in modules.items():
        stats = infos[name].stats
        if not _is_initial(stats.mean, stats.variance, stats.num_batches):
            _copy_into(bn, stats)
            continue
        mean, var = _host(bn.running_mean), _host(bn.running_var)
        nbt = int(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0
        if rank == 0 and not _is_initial(mean, var, nbt):
            seed[name] = (mean, var, nbt)
    if seed:
        _seed(target, seed)


def _seed(target, seed: dict) -> None:
    """Write module buffers into fresh layers, through the public import (a Store's or a Client's)."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, (mean, var, nbt) in seed.items():
        tensors[f"{name}.running_mean"] = mean
        tensors[f"{name}.running_var"] = var
        tensors[f"{name}.num_batches_tracked"] = np.array(nbt, dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="normsvc-torch-") as tmp:
        path = os.path.join(tmp, "seed.safetensors")
        save_file(tensors, path)
        target.import_(path, naming="torch")


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _copy_into(bn: _BatchNorm, stats) -> None:
    """A layer's running statistics into a module's buffers (dtype and device of the buffers)."""
    mean, var = np.asarray(stats.mean), np.asarray(stats.variance)
    if mean.shape != tuple(bn.running_mean.shape):
        raise InvalidArgument(f"statistics of shape {mean.shape} for a BatchNorm of {bn.num_features} features",
                              field="stats")
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(int(stats.num_batches))


# --- the shared state of one convert() -----------------------------------------------


def _group(kind: str, layer: str) -> str:
    """The AllReduceMoments group of one layer's forward or backward reduction.

    Each layer reduces at its own step count, so each needs its own group; the
    forward and backward reductions of one step need two.
    """
    group = f"torch.{kind}/{layer}"
    if len(group) > _MAX_GROUP:
        group = f"torch.{kind}/{hashlib.sha256(layer.encode()).hexdigest()}"
    return group


class Binding:
    """What the modules of one :func:`convert` share.

    Get it with :func:`binding`.  In shared mode it owns the background
    thread that sends the step contributions (:meth:`flush`, :meth:`close`).

    Attributes
    ----------
    target : normsvc.Client or normsvc.Store
    mode : {"sync", "shared"}
    run : str
        The run every step belongs to (what :func:`convert` chose).
    rank, world_size : int
    timeout : float or normsvc.config.DEFAULT
        Seconds a synchronized reduction waits for the other ranks (DEFAULT:
        the Client's deadline); may be changed at any time.
    layers : list of str
        The layer names of the converted modules, sorted.
    modules : dict
        Layer name -> converted module.
    """

    def __init__(self, target, *, mode: str, run: str, rank: int, world_size: int, timeout, layers: list,
                 rendezvous: bool, max_pending: int = 4):
        self.target = target
        self.mode = mode
        self.run = run
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.layers = layers
        self.modules: dict = {}
        self._rendezvous = rendezvous
        self._pusher = _Pusher(self, max_pending) if mode == "shared" else None
        self._lock = threading.Lock()
        self._stale: set = set()  # shared mode: layers trained since their statistics were last fetched
        self._latest: dict = {}  # layer -> newest RunningStats heard of (shared mode)
        self._applied: dict = {}  # layer -> version copied into the module's buffers
        self._streams = None  # sync mode: a ThreadStreams over the target, made at the first reduction

    def __repr__(self) -> str:
        return (f"Binding(mode={self.mode!r}, run={self.run!r}, rank={self.rank}, world_size={self.world_size}, "
                f"layers={len(self.layers)})")

    def __deepcopy__(self, memo):
        # a copied model (an EMA copy, say) talks to the same service as the original
        return self

    def __getstate__(self):
        raise TypeError("a model converted by normsvc.torch holds a connection and cannot be pickled: save its "
                        "state_dict() instead (its keys are those of the unconverted model)")

    # --- sync mode -------------------------------------------------------------------

    def _reduce_forward(self, layer: str, moments: Moments, step: int, update: bool):
        """Global moments of one layer's step, and its running statistics after it (None without update)."""
        if self._rendezvous:
            answer = self._allreduce({layer: moments}, step=step, group=_group("fwd", layer), update_stats=update)
            return answer.moments[layer], answer.stats.get(layer)
        if not update:  # a Store: one rank, whose moments are the global ones
            return moments, None
        stats = self.target.update_many({layer: moments}, step=step, rank=0, world_size=1, run=self.run)
        return moments, stats[layer]

    def _reduce_backward(self, layer: str, sums: np.ndarray, step: int) -> np.ndarray:
        """Per-channel sums over every rank of ``sums`` (this rank's, float64): SyncBatchNorm's second reduction.

        The service reduces Moments, so each rank sends its sums as ONE
        sample: count 1, mean = the sums, m2 = 0.  Chan's merge of W such
        samples is their mean with count W, so ``mean * count`` is the sum
        over ranks: exact algebra, float64 rounding only, independent of the
        ranks' batch sizes.  ``update_stats=False`` leaves the running
        statistics alone, and the group keeps it apart from the forward's.
        """
        one = Moments(np.float64(1.0), sums, np.zeros_like(sums))
        merged = self._allreduce({layer: one}, step=step, group=_group("bwd", layer), update_stats=False).moments[layer]
        return merged.mean * merged.count

    def _allreduce(self, moments: dict, **kwargs):
        """One reduction, on this thread's stream of the Client (opened at its first reduction)."""
        streams = self._streams
        if streams is None:
            from .client.allreduce_stream import ThreadStreams  # grpc: imported by sync mode only

            with self._lock:
                if self._streams is None:
                    self._streams = ThreadStreams(self.target)
                streams = self._streams
        return streams.allreduce(moments, rank=self.rank, world_size=self.world_size, timeout=self.timeout,
                                 run=self.run, **kwargs)

    # --- shared mode -------------------------------------------------------------------

    def _attach(self, root: nn.Module) -> None:
        """Step boundaries: one training forward of ``root`` (the converted model) is one step."""
        root.register_forward_pre_hook(lambda *_: self._pusher.begin())
        root.register_forward_hook(lambda *_: self._pusher.end())

    def _heard(self, answers: Mapping) -> None:
        """Newer statistics from the service (the pusher's answers, a fetch)."""
        with self._lock:
            for name, stats in answers.items():
                old = self._latest.get(name)
                if old is None or stats.version > old.version:
                    self._latest[name] = stats

    def _apply_latest(self, names=None) -> None:
        """Copy the newest statistics heard of into the buffers of the modules behind them (no network)."""
        with self._lock:
            latest = {n: self._latest[n] for n in (self._latest if names is None else names) if n in self._latest}
        for name, stats in latest.items():
            module = self.modules.get(name)
            if module is not None and self._applied.get(name, -1) < stats.version and _tracks(module):
                _copy_into(module, stats)
                self._applied[name] = stats.version

    def _fetch(self, names=None) -> None:
        """Wait for the queued steps' answers, then ask the service for ``names``' statistics (one request)."""
        if self._pusher is not None:
            self._pusher.drain()
        tracked = sorted(n for n, m in self.modules.items() if _tracks(m))
        names = tracked if names is None else sorted(set(names) & set(tracked))
        if names:
            self._heard({info.name: info.stats for info in self.target.describe(names)})
        self._stale.difference_update(names)
        self._apply_latest()

    def _before_inference(self, layer: str) -> None:
        """Shared mode, an inference forward of ``layer``: its statistics as the service has them.

        A layer that trained, or entered inference (``eval()``), since its
        last fetch is fetched again, with every other such layer, in one
        request; otherwise its buffers take the newest answer heard of,
        without asking.  So an inference loop asks once, not per forward.
        Steps still being recorded are not closed: a frozen layer may run in
        eval mode inside a training step.
        """
        if layer in self._stale:
            self._fetch(set(self._stale))
        else:
            self._apply_latest([layer])

    def flush(self) -> None:
        """Shared mode: send the step in progress, wait for every queued step's answer, raise the
        background thread's error if there was one, and fetch the statistics into the buffers.
        Sync mode: nothing to do (the buffers are current after each step)."""
        if self._pusher is not None:
            self._pusher.close_step()
            self._fetch()

    def close(self) -> None:
        """Shared mode: flush, then stop the background thread; later training forwards raise
        FailedPrecondition, inference goes on with the last statistics.  Sync mode: end the
        reduction streams (each holds one of the server's stream slots); a later training
        forward opens another."""
        if self._streams is not None:
            self._streams.close()
        if self._pusher is None or self._pusher.closed:
            return
        try:
            self.flush()
        finally:
            self._pusher.stop()


class _Pusher:
    """Shared mode's background sender: one update_many step contribution per step, in step order.

    The training thread records each layer's batch moments (still on the
    device) and closes a step at the end of the converted model's forward;
    the thread moves them to the host, sends them, and hands the answers to
    the binding.  Its first error stops it: later steps are not sent (they
    would follow a step that is missing), and every training forward and
    flush raise that error.
    """

    def __init__(self, bind: Binding, max_pending: int):
        self.bind = bind
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.pending: dict = {}  # layer -> [(count, (2, C) tensor: mean and unbiased variance, cuda event)]
        self.step = 0
        self.inside = False  # within a forward of the converted model
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="normsvc-torch-pusher", daemon=True)
        self.thread.start()

    def check(self) -> None:
        """Raise the thread's error, or that the pusher was closed (before a training forward)."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise FailedPrecondition("normsvc.torch.close() was called on this model: its shared statistics "
                                     "take no more steps (convert a fresh model to train on)")

    def begin(self) -> None:
        if self.inside:
            self.pending = {}  # the last forward raised before its end: its step never completed
        self.inside = True

    def end(self) -> None:
        self.inside = False
        self.close_step()

    def record(self, layer: str, count: int, stats: torch.Tensor) -> None:
        if not self.inside and layer in self.pending:
            self.close_step()  # layers called outside the model's forward: a layer's second call starts a step
        event = None
        if stats.device.type == "cuda":
            host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
            host.copy_(stats, non_blocking=True)  # the thread waits on the event, not the training thread
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(stats.device))
            stats = host
        elif stats.device.type != "cpu":
            stats = stats.cpu()
        self.pending.setdefault(layer, []).append((count, stats, event))
        self.bind._stale.add(layer)

    def close_step(self) -> None:
        if not self.pending:
            return
        item, self.pending = (self.step, self.pending), {}
        self.step += 1
        if self.error is None and not self.closed:
            self.queue.put(item)  # waits only while max_pending steps are queued

    def drain(self) -> None:
        """Wait until every queued step is answered; raise the thread's error."""
        if not self.closed:
            self.queue.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put(_STOP)
            self.thread.join()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is _STOP:
                    return
                if self.error is None:
                    step, pending = item
                    updates = {layer: _merged(entries) for layer, entries in pending.items()}
                    bind = self.bind
                    answers = bind.target.update_many(updates, step=step, rank=bind.rank,
                                                      world_size=bind.world_size, run=bind.run)
                    bind._heard(answers)
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self.error = exc
            finally:
                self.queue.task_done()


def _merged(entries: list) -> Moments:
    """One layer's Moments for a step (several calls of the layer in one step merge, Chan)."""
    out = None
    for count, stats, event in entries:
        if event is not None:
            event.synchronize()
        a = stats.to(torch.float64).numpy()
        # the unbiased variance torch computed back to m2: var * (n - 1)
        m = Moments(np.float64(count), a[0], a[1] * (count - 1.0))
        out = m if out is None else out.merge(m)
    return out


# --- the module -------------------------------------------------------------------


def _per_channel(x: torch.Tensor) -> list:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float16/bfloat16 compute in float32, as torch's own batch norm does."""
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


class BatchNorm(_BatchNorm):
    """A torch BatchNorm whose statistics are synchronized or shared through normsvc.

    Made by :func:`convert` (see it, and this module's documentation, for
    the two modes).  Its parameters, buffers and ``state_dict`` keys are
    those of the BatchNorm it replaced; it accepts the inputs that one did
    (``BatchNorm2d``: 4-D, ...).

    Attributes
    ----------
    layer : str
        The layer name in the service.
    binding : Binding
        What the modules of its :func:`convert` share (target, mode, run, rank, world size).
    steps : int
        Training forwards since :func:`convert`: the step that keys sync
        mode's reductions (not saved in the state_dict).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, layer: str, binding: Binding, input_dims=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.layer = layer
        self.binding = binding
        self._input_dims = input_dims  # None: any rank >= 2, as SyncBatchNorm's
        self._steps = [0]  # a list: counting in it skips nn.Module.__setattr__ on every forward

    @property
    def steps(self) -> int:
        """Training forwards since :func:`convert` (sync mode's step key); settable to resume."""
        return self._steps[0]

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps[0] = int(value)

    @classmethod
    def from_module(cls, bn: _BatchNorm, *, layer: str, binding: Binding) -> "BatchNorm":
        """A BatchNorm that takes over ``bn``'s parameters and buffers (the same tensors)."""
        dims = next((d for kinds, d in _INPUT_DIMS if isinstance(bn, kinds)), None)
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, layer=layer,
                  binding=binding, input_dims=dims)
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new

    def _check_input_dim(self, x) -> None:
        if self._input_dims is None:
            if x.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
        elif x.dim() not in self._input_dims:
            want = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(f"expected {want} input (got {x.dim()}D input)")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer={self.layer!r}, mode={self.binding.mode!r}"

    def train(self, mode: bool = True):
        if self.training and not mode and self.binding.mode == "shared" and _tracks(self):
            self.binding._stale.add(self.layer)  # entering inference: fetch the shared statistics once
        return super().train(mode)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.binding.mode == "shared":
            self.binding._apply_latest([self.layer])  # what the service last answered, without asking it
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        tracked = _tracks(self)
        if not self.training:
            if self.running_mean is None or self.running_var is None:  # torch: batch statistics then
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            if self.binding.mode == "shared" and tracked:
                self.binding._before_inference(self.layer)
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        counter = self._steps
        step = counter[0]
        counter[0] = step + 1
        if self.binding.mode == "sync":
            return _SyncBatchNorm.apply(x, self.weight, self.bias, self, step, tracked)
        pusher = self.binding._pusher
        pusher.check()
        # parameters and buffers read from their dicts: per layer and step, nn.Module.__getattr__ is not free
        params = self._parameters
        weight, bias = params["weight"], params["bias"]
        if not tracked:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        # torch's own kernel computes the batch statistics once: with momentum 1.0 it writes this
        # batch's mean and unbiased variance into a scratch pair, which the pusher sends
        scratch = torch.zeros(2, self.num_features, dtype=self._buffers["running_mean"].dtype, device=x.device)
        y = F.batch_norm(x, scratch[0], scratch[1], weight, bias, True, 1.0, self.eps)
        pusher.record(self.layer, x.numel() // x.shape[1], scratch)
        return y


#: The input ranks each torch BatchNorm accepts (SyncBatchNorm and others: any rank >= 2).
_INPUT_DIMS = (((nn.BatchNorm1d, nn.LazyBatchNorm1d), (2, 3)), ((nn.BatchNorm2d, nn.LazyBatchNorm2d), (4,)),
               ((nn.BatchNorm3d, nn.LazyBatchNorm3d), (5,)))


class _SyncBatchNorm(torch.autograd.Function):
    """Batch norm with the batch statistics of every rank; the backward of torch's SyncBatchNorm.

    The per-channel reductions are torch's own batch-norm kernels (on any
    device): ``batch_norm_update_stats`` for this rank's mean and biased
    variance, ``native_batch_norm_backward`` for ``sum(dy)`` and
    ``sum(dy * x_hat)``; a generic ``var_mean`` or ``sum`` over the batch
    and spatial dimensions is several times slower on CPU.  Per-channel
    arithmetic (global variance, invstd, the backward's coefficients) is
    float64 on the host, where the statistics travel anyway; elementwise work
    stays on the tensor's device, in its dtype (float32 for
    float16/bfloat16).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, module: BatchNorm, step: int, update: bool):
        channels = x.shape[1]
        count = x.numel() // channels if channels else 0
        xc = x.to(_compute_dtype(x))
        if count:
            local = torch.stack(torch.batch_norm_update_stats(xc, None, None, 0.0))  # mean, biased variance
            local = local.to(device="cpu", dtype=torch.float64).numpy()
        else:  # an empty batch still takes part, as SyncBatchNorm's does
            local = np.zeros((2, channels))
        moments = Moments(np.float64(count), local[0], local[1] * count)
        merged, stats = module.binding._reduce_forward(module.layer, moments, step, update)
        total = float(merged.count)
        if total <= 1:
            raise InvalidArgument(f"layer {module.layer!r}: expected more than 1 value per channel when training, "
                                  f"got {total:g} over all ranks", layer=module.layer, field="x")
        var = merged.m2 / total
        invstd = 1.0 / np.sqrt(var + module.eps)
        stat_dtype = module.running_mean.dtype if update else (weight.dtype if weight is not None else xc.dtype)
        on_device = torch.from_numpy(np.stack([merged.mean, var])).to(device=x.device, dtype=stat_dtype)
        y = F.batch_norm(x, on_device[0], on_device[1], weight, bias, False, 0.0, module.eps)
        if stats is not None:
            _copy_into(module, stats)
        ctx.save_for_backward(x, weight)
        ctx.mean, ctx.invstd, ctx.total = merged.mean, invstd, total
        ctx.module, ctx.step, ctx.bias_dtype = module, step, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        module, dtype = ctx.module, _compute_dtype(x)
        shape = _per_channel(x)
        xc, dyc = x.to(dtype), dy.to(dtype)
        mean, invstd = torch.from_numpy(np.stack([ctx.mean, ctx.invstd])).to(device=x.device, dtype=dtype)
        # sum(dy) and sum(dy * x_hat), x_hat = (x - mean) * invstd with the GLOBAL mean and invstd.  The
        # sums do not depend on the weight, but the CUDA kernels need one to size them (None gives empty
        # sums or an error there; the CPU kernel takes None)
        w = weight.detach().to(dtype) if weight is not None else torch.ones(x.shape[1], dtype=dtype, device=x.device)
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dyc, xc, w, None, None, mean, invstd, True, module.eps, [False, True, True])
        local = torch.stack([sum_dy, sum_dy_xhat])
        if weight is not None:
            local = torch.cat([local, w[None]])
        local = local.to(device="cpu", dtype=torch.float64).numpy()  # one transfer: sums and weight
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            sums = local[:2]
            if module.binding.world_size > 1:
                sums = module.binding._reduce_backward(module.layer, np.ascontiguousarray(sums), ctx.step)
            # SyncBatchNorm's grad_x: (dy - mean(dy) - x_hat * mean(dy * x_hat)) * invstd * w, over all
            # ranks, as k1 * dy + k3 + (x - mean) * k2 (three passes over x)
            k1 = ctx.invstd * (local[2] if weight is not None else 1.0)
            k = torch.from_numpy(np.stack([k1, -k1 * sums[0] / ctx.total,
                                           -k1 * ctx.invstd * sums[1] / ctx.total])).to(device=x.device, dtype=dtype)
            # in place on one new tensor: a fresh one per pass costs page faults on large activations
            grad_x = xc - mean.view(shape)
            torch.addcmul(k[1].view(shape), grad_x, k[2].view(shape), out=grad_x)
            grad_x = grad_x.addcmul_(dyc, k[0].view(shape)).to(x.dtype)
        # parameter gradients stay local, as SyncBatchNorm's: DDP all-reduces them
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = torch.from_numpy(local[1]).to(device=weight.device, dtype=weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = torch.from_numpy(local[0]).to(device=weight.device if weight is not None else x.device,
                                                   dtype=ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None


# --- helpers on converted models ----------------------------------------------------------


def _bindings(module: nn.Module) -> list:
    if not isinstance(module, nn.Module):
        raise InvalidType(f"module must be a torch.nn.Module, got {type(module).__name__}", field="module")
    out = []
    for m in module.modules():
        if isinstance(m, BatchNorm) and all(m.binding is not b for b in out):
            out.append(m.binding)
    if not out:
        raise InvalidArgument(f"{type(module).__name__} holds no BatchNorm converted by normsvc.torch.convert: "
                              "expected a converted model", field="module")
    return out


def binding(module: nn.Module) -> Binding:
    """The :class:`Binding` of a model converted by :func:`convert` (InvalidArgument if it holds none, or several)."""
    found = _bindings(module)
    if len(found) != 1:
        raise InvalidArgument(f"{type(module).__name__} holds {len(found)} conversions: expected one (ask one of "
                              "its submodules)", field="module")
    return found[0]


def flush(module: nn.Module) -> None:
    """Shared mode: send the pending step contributions, wait for their answers and copy the shared
    running statistics into the buffers (one fetch); raises the background thread's error, if any.

    Call it before saving a checkpoint, or where every rank's statistics
    must be in (after it on every rank, and a barrier, a fetch sees them all).
    Does nothing in sync mode, whose buffers are current after each step.
    """
    for bind in _bindings(module):
        bind.flush()


def close(module: nn.Module) -> None:
    """Release what ``module``'s conversions hold on the service.

    Shared mode: flush and stop the background thread; after it, inference
    still works (with the last statistics) and training forwards raise
    FailedPrecondition.  Sync mode: end the reduction streams, each of which
    holds one of the server's stream slots; a later training forward opens
    another.
    """
    for bind in _bindings(module):
        bind.close()


# --- statistics back to module paths -----------------------------------------------------


def _running_modules(module: nn.Module) -> dict:
    if not isinstance(module, nn.Module):
        raise InvalidType(f"module must be a torch.nn.Module, got {type(module).__name__}", field="module")
    return {path: m for path, m in module.named_modules() if isinstance(m, _BatchNorm) and _tracks(m)}


def _read_file(path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise InvalidArgument(f"no file {os.fspath(path)!r} to read statistics from", field="source") from None
    except Exception as exc:  # safetensors has its own error types for malformed files
        raise InvalidArgument(f"{os.fspath(path)!r} is not a readable safetensors file: {exc}",
                              field="source") from None


_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def _file_layers(tensors: dict, prefix: str) -> dict:
    """{layer without prefix: {leaf: array}} of a torch-named file, for the names under ``prefix``."""
    out: dict = {}
    for key, value in tensors.items():
        layer, _, leaf = key.rpartition(".")
        if leaf in _LEAVES and layer.startswith(prefix):
            out.setdefault(layer[len(prefix):], {})[leaf] = value
    return out


def _source_layers(source, prefix: str, names=None) -> dict:
    """{layer without prefix: {leaf: array}} from a file path, a Store or a Client."""
    if isinstance(source, (str, os.PathLike)):
        return _file_layers(_read_file(source), prefix)
    _target_kind(source)
    if names is None:
        infos = source.describe(prefix=prefix)
    else:
        held = set(source.list_layers(prefix))
        infos = source.describe([prefix + n for n in names if prefix + n in held])
    out = {}
    for info in infos:
        if info.config.kind != "batch" or info.stats is None or np.ndim(info.stats.mean) != 1:
            continue
        s = info.stats
        out[info.name[len(prefix):]] = {"running_mean": s.mean, "running_var": s.variance,
                                        "num_batches_tracked": np.array(s.num_batches, dtype=np.int64)}
    return out


def load_running_stats(module: nn.Module, source, prefix: str | None = None, *, strict: bool = True) -> list[str]:
    """Copy running statistics into the BatchNorms of ``module`` (converted or plain torch ones).

    Parameters
    ----------
    module : torch.nn.Module
    source : normsvc.Store, normsvc.Client, or str / path
        A store or client (layer ``prefix + module path``), or a safetensors
        file exported with ``naming="torch"`` (tensors
        ``prefix + module path + ".running_mean"``, ``.running_var``,
        ``.num_batches_tracked``; leave ``prefix`` out for a file exported
        with ``strip_prefix``, or a torch state_dict saved with safetensors).
    prefix : str, optional
        What precedes the module paths in the source.
    strict : bool
        Every BatchNorm with running statistics must find its statistics,
        and (from a file) every statistic under ``prefix`` must find its
        module; otherwise InvalidArgument names them.  ``strict=False`` loads
        what matches.

    Returns
    -------
    list of str
        The module paths loaded.
    """
    prefix = _prefix(prefix)
    modules = _running_modules(module)
    found = _source_layers(source, prefix, names=list(modules))
    missing = sorted(p for p in modules if p not in found or "running_mean" not in found[p])
    unexpected = sorted(set(found) - set(modules)) if isinstance(source, (str, os.PathLike)) else []
    if strict and (missing or unexpected):
        where = repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        parts = []
        if missing:
            parts.append(f"no statistics for {[prefix + p for p in missing][:8]}")
        if unexpected:
            parts.append(f"statistics of no module: {[prefix + p for p in unexpected][:8]}")
        raise InvalidArgument(f"{where} (prefix {prefix!r}): {'; '.join(parts)}: expected one layer per "
                              "BatchNorm of the model, named prefix + module path (strict=False loads what "
                              "matches)", field="source")
    loaded = []
    for path, bn in modules.items():
        parts = found.get(path)
        if not parts or "running_mean" not in parts or "running_var" not in parts:
            continue
        mean, var = np.asarray(parts["running_mean"]), np.asarray(parts["running_var"])
        if mean.shape != tuple(bn.running_mean.shape) or var.shape != mean.shape:
            raise InvalidArgument(f"statistics {prefix + path!r} have shape {list(mean.shape)}: module {path!r} "
                                  f"has {bn.num_features} features", layer=prefix + path, field="source")
        nbt = parts.get("num_batches_tracked")
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(mean.astype(np.float64)))
            bn.running_var.copy_(torch.from_numpy(var.astype(np.float64)))
            if nbt is not None and bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(int(np.asarray(nbt).reshape(())))
        loaded.append(path)
    return loaded


def state_dict(source, prefix: str | None = None, *, dtype: torch.dtype = torch.float32) -> dict:
    """Running statistics named as a model's ``state_dict`` names them (``prefix`` removed).

    ``source`` is a Store or Client (the batch layers whose names start
    with ``prefix``) or a safetensors file exported with ``naming="torch"``.
    Means and variances come as ``dtype`` tensors (float32: a model's
    default), ``num_batches_tracked`` as int64 scalars, so::

        state = model.state_dict()
        state.update(normsvc.torch.state_dict(client, prefix="resnet50/"))
        model.load_state_dict(state, strict=True)

    loads them into a plain (unconverted) model.  Unlike
    :func:`load_running_stats` it does not check which layers the model has.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgument(f"dtype={dtype!r}: expected a floating torch.dtype", field="dtype")
    out = {}
    for layer, parts in sorted(_source_layers(source, _prefix(prefix)).items()):
        for leaf, value in sorted(parts.items()):
            t = torch.from_numpy(np.array(value))
            out[f"{layer}.{leaf}"] = t.to(torch.int64) if leaf == "num_batches_tracked" else t.to(dtype)
    return out
