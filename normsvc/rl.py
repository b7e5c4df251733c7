"""Shared observation and return normalizers for RL actor fleets (SB3 and RLlib conventions).

Many actor processes normalize their observations (and rewards) with the
statistics of *all* actors' samples, as one process running
Stable-Baselines3's ``VecNormalize`` would with all of them, while each
actor pays a round trip only every few hundred samples, as with RLlib's
``MeanStdFilter``.  Numpy only: ``import normsvc`` does not import this
module, and this module imports neither torch nor Stable-Baselines3.

What the service holds
    One ``cumulative`` batch layer per statistic (created with
    ``epsilon=1e-8``, VecNormalize's): the exact count, mean and biased
    variance of every sample any actor pushed, merged with Chan's formula in
    float64.  SB3's ``RunningMeanStd`` starts from a prior of ``epsilon =
    1e-4`` pseudo-samples with mean 0 and variance 1; that prior is merged in
    here, on the client side, so :attr:`~SharedRunningMeanStd.mean`,
    :attr:`~SharedRunningMeanStd.var` and :attr:`~SharedRunningMeanStd.count`
    are the numbers SB3's RunningMeanStd holds after the same samples, while
    the layer itself keeps plain population statistics (what ``export``,
    ``normsvc layers show`` and other tools read).

What an actor uses (buffering)
    :meth:`~SharedRunningMeanStd.update` accumulates a batch locally (float64
    sums shifted by the first pending sample, so offsets cost no precision).
    Every ``push_every`` samples, or on the first update ``push_interval``
    seconds after the last push, the pending moments of every statistic on
    the same schedule (an observation and a return normalizer built with
    ``push_with=``) go to the service in ONE UpdateStats request
    (``update_many``), and its answer, the global statistics just after the
    push with every other actor's pushes so far, becomes the actor's global
    snapshot.  Statistics and :meth:`~SharedRunningMeanStd.normalize` use::

        prior (epsilon, 0, 1)  (+)  global snapshot (last push or pull)  (+)  own samples not pushed yet

    so an actor never misses its own samples: alone it gets SB3's numbers
    whatever ``push_every`` (SB3 updates, then normalizes with the batch
    included), and with others it lags only by their samples since its
    last push or :meth:`~SharedRunningMeanStd.pull`.

What a learner reads
    :meth:`~SharedRunningMeanStd.pull` (one GetLayer request for every
    statistic on the schedule) then :meth:`~SharedRunningMeanStd.snapshot`:
    mean, var and count at one version of the layer, with nothing of its
    own pending (a learner does not update).

Numbers
    Equal to SB3's up to float64 rounding: the merges happen in another
    order (the tests allow a relative 1e-10 on mean and var, and one float32
    ulp on normalized values, which are float32 like VecNormalize's).  SB3
    averages a float32 batch in float32 (``np.mean`` of the batch); this
    module accumulates everything in float64, so on float32 observations
    the two differ by float32 rounding, about 1e-7 relative, and this module
    is the exact one (the layer matches numpy float64 over all samples).

Failures
    A push that fails raises from the call that triggered it
    (:meth:`~SharedRunningMeanStd.update` or :meth:`~SharedRunningMeanStd.flush`)
    and loses nothing: its request is sent again first, with the same
    request id, at the next push, so it is applied once whatever happened to
    the first try (a retry of an applied request is answered, never applied
    twice; a refused one, e.g. to a frozen layer, is applied once the layer
    takes updates again).  :meth:`~SharedRunningMeanStd.discard_pending`
    drops what was not pushed.  Nothing received from the network is ever
    unpickled: statistics travel as tensors, state as safetensors.

One :class:`SharedRunningMeanStd` belongs to one thread of one process (an
actor), as SB3's and RLlib's do.

Examples
--------
>>> import numpy as np, normsvc
>>> store = normsvc.Store.open("memory://")  # or normsvc.Client("host:50051"), or "host:50051"
>>> obs_rms = SharedRunningMeanStd(store, "demo/obs", (2,), push_every=4)
>>> _ = obs_rms.update(np.array([[1.0, 10.0], [3.0, 30.0]]))  # pending: no request yet
>>> obs_rms.pushes, obs_rms.pending
(0, 2.0)
>>> obs_rms.mean.round(4), obs_rms.var.round(3)                 # SB3's numbers, prior included
(array([ 1.9999, 19.999 ]), array([  1.   , 100.015]))
>>> _ = obs_rms.update(np.array([[5.0, 50.0], [7.0, 70.0]]))    # 4 samples: one push
>>> obs_rms.pushes, obs_rms.pending, obs_rms.version
(1, 0.0, 1)
>>> store.layer("demo/obs").stats().mean                        # the service: exact, no prior
array([ 4., 40.])
>>> obs_rms.normalize(np.array([[4.0, 40.0], [9.0, 10.0]]))     # float32, as VecNormalize's
array([[ 4.4718901e-05,  4.4719010e-05],
       [ 2.2360456e+00, -1.3415592e+00]], dtype=float32)
>>> ret = SharedReturnNormalizer(store, "demo/ret", num_envs=2, gamma=0.9, push_with=obs_rms)
>>> ret.step(np.array([1.0, 2.0]), dones=np.array([False, True]))  # VecNormalize's reward path
array([1.9994003, 3.9988005], dtype=float32)
>>> ret.returns                                                    # reset where done
array([1., 0.])

References
----------
Chan, T. F., Golub, G. H., LeVeque, R. J. (1979). Updating formulae and a
pairwise algorithm for computing sample variances.
Raffin, A. et al. (2021). Stable-Baselines3: ``common/running_mean_std.py``,
``common/vec_env/vec_normalize.py``.
Liang, E. et al. (2018). RLlib: ``utils/filter.py`` (``MeanStdFilter``: local
buffer, periodic sync with the driver).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
from numba import njit

from .config import DEFAULT, make_config
from .errors import InvalidArgument, InvalidType
from .moments import Moments

__all__ = [
    "SharedRunningMeanStd",
    "SharedReturnNormalizer",
    "RmsState",
    "DEFAULT_PUSH_EVERY",
    "DEFAULT_PUSH_INTERVAL",
    "LAYER_EPSILON",
]

#: Samples (of any one statistic) an actor accumulates before it pushes.
DEFAULT_PUSH_EVERY = 4096
#: Seconds after a push when the next update pushes whatever is pending.
DEFAULT_PUSH_INTERVAL = 1.0
#: The epsilon the layers are created with: VecNormalize's (the layer's own
#: ``normalize`` is not used here, but reads the right value if someone does).
LAYER_EPSILON = 1e-8
#: The safetensors metadata layout that ``import_`` reads (normsvc.store.safetensors_io, format 1).
_FILE_FORMAT = 1
_REAL = frozenset("fiub")


@dataclass(frozen=True, eq=False)
class RmsState:
    """Mean, variance and count as SB3's ``RunningMeanStd`` names them, at one ``version`` of the layer.

    ``count`` includes the prior pseudo-count, as SB3's does;
    ``version`` is the layer's version of the global statistics used.
    """

    mean: np.ndarray
    var: np.ndarray
    count: float
    version: int = 0


# --- the per-step arithmetic ----------------------------------------------------------
# An actor calls update and normalize every environment step: as numpy expressions they cost
# some 25 array operations (~50 us on a 2-core VM); compiled, one call each.  Same IEEE
# operations in the same order as the numpy formulas they replace (no fastmath).


@njit(cache=True, error_model="numpy")
def _accumulate(x, shift, s1, s2, first):  # pragma: no cover - compiled
    """Add the rows of ``x`` (N, D) to the shifted sums; ``first``: shift by the first row.
    False, with nothing changed, when a value is not finite or its square overflows."""
    n, d = x.shape
    t1, t2 = np.zeros(d), np.zeros(d)
    for i in range(n):
        for j in range(d):
            v = np.float64(x[i, j]) - (np.float64(x[0, j]) if first else shift[j])
            t1[j] += v
            t2[j] += v * v
    for j in range(d):
        if not math.isfinite(t2[j]):  # a NaN or Inf in x, or a square past float64, reaches t2
            return False
    for j in range(d):
        if first:
            shift[j] = x[0, j]
        s1[j] += t1[j]
        s2[j] += t2[j]
    return True


@njit(cache=True, error_model="numpy")
def _combine(count, mean, m2, n_p, shift, s1, s2, epsilon, out):  # pragma: no cover - compiled
    """``out[0], out[1], out[2]`` = mean, var and sqrt(var + epsilon) of (count, mean, m2) merged
    (Chan) with the pending samples (n_p, shifted sums); returns the merged count."""
    n = count + n_p
    w = n_p / n if n > 0 else 0.0
    k = count * n_p / n if n > 0 else 0.0
    for j in range(mean.size):
        if n_p > 0:
            a = s1[j] / n_p
            delta = (shift[j] + a) - mean[j]
            mu = mean[j] + delta * w
            q = m2[j] + (s2[j] - s1[j] * a) + delta * delta * k
        else:
            mu, q = mean[j], m2[j]
        var = max(q / n, 0.0)
        out[0, j] = mu
        out[1, j] = var
        out[2, j] = math.sqrt(var + epsilon)
    return n


@njit(cache=True, error_model="numpy")
def _scale(x, mean, std, clip, out):  # pragma: no cover - compiled
    """``out = clip((x - mean) / std, -clip, clip)`` (x and out: (N, D)); clip=inf does not clip."""
    n, d = x.shape
    for i in range(n):
        for j in range(d):
            y = (np.float64(x[i, j]) - mean[j]) / std[j]
            out[i, j] = min(max(y, -clip), clip)


@njit(cache=True, error_model="numpy")
def _discount(returns, rewards, gamma, out):  # pragma: no cover - compiled
    """VecNormalize's ``returns * gamma + rewards`` into ``out``; False if a value is not finite."""
    for i in range(returns.size):
        v = returns[i] * gamma + np.float64(rewards[i])
        if not math.isfinite(v):
            return False
        out[i] = v
    return True


_ZERO = np.zeros(1)
#: The epsilon of VecNormalize's ``sqrt(var + epsilon)``: the one computed with every change.
_VEC_EPSILON = 1e-8


# --- argument checks ---------------------------------------------------------------


def _shape(value) -> tuple:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value,)
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        shape = tuple(value)
    except TypeError:
        raise InvalidArgument(f"shape={value!r}: expected a tuple of positive ints (() for scalars)",
                              field="shape") from None
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise InvalidArgument(f"shape={value!r}: expected a tuple of positive ints (() for scalars)",
                              field="shape")
    return tuple(int(s) for s in shape)


def _number(value, field: str, *, low: float = 0.0, strict: bool = False, high: float = math.inf) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidArgument(f"{field}={value!r}: expected a number", field=field)
    value = float(value)
    below = value <= low if strict else value < low
    if not math.isfinite(value) or below or value > high:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise InvalidArgument(f"{field}={value!r}: expected a finite number {bound}"
                              + (f" and <= {high:g}" if high < math.inf else ""), field=field)
    return value


def _optional_positive(value, field: str) -> float | None:
    return None if value is None else _number(value, field, strict=True)


def _batch_text(shape: tuple) -> str:
    """``(N,)``, ``(N, 4)``: how a batch of samples of ``shape`` looks."""
    return f"(N, {', '.join(map(str, shape))})" if shape else "(N,)"


def _positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgument(f"{field}={value!r}: expected a positive int", field=field)
    return int(value)


def _real(x: np.ndarray, what: str) -> None:
    if x.dtype.kind not in _REAL:
        raise InvalidType(f"{what} has dtype {x.dtype}: expected real numbers (float, int or bool)")


def _blocking(result, what: str):
    """``result`` of a target's call, refusing the coroutine an AsyncClient would give."""
    if inspect.isawaitable(result):
        if hasattr(result, "close"):
            result.close()
        raise InvalidType(f"{what}: the target returned an awaitable: expected a Store, a blocking "
                          "normsvc.Client or a server address (an AsyncClient cannot push from a step loop)",
                          field="target")
    return result


def _connect(target):
    """(target, owned): a Store or Client as given, or a Client this module opens (and closes) for an address."""
    if isinstance(target, str):
        from .client import Client

        return Client(target), True
    missing = [m for m in ("update_many", "describe", "create_layer", "import_")
               if not callable(getattr(target, m, None))]
    if missing:
        raise InvalidType(f"target is a {type(target).__name__} (no {', '.join(missing)}): expected a "
                          "normsvc.Store, a normsvc.Client or a server address 'host:port'", field="target")
    return target, False


# --- the push schedule ---------------------------------------------------------------


class _Schedule:
    """When an actor pushes, and the one request that pushes all its statistics together."""

    def __init__(self, target, owned: bool, push_every: int, push_interval: float | None):
        self.target = target
        self.owned = owned
        self.push_every = push_every
        self.push_interval = push_interval
        self.members: list[SharedRunningMeanStd] = []
        self.deadline = math.inf
        self.restart_clock()
        #: (request_id, updates) of a push whose answer never came: sent again first, as a retry.
        self.unacked = None
        self.pushes = 0

    def restart_clock(self) -> None:
        if self.push_interval is not None:
            self.deadline = time.monotonic() + self.push_interval

    def flush(self) -> None:
        if self.unacked is not None:
            self._send(*self.unacked)
        updates = {m.name: m._take() for m in self.members if m._n or m._unacked is not None}
        if updates:
            self.unacked = (uuid.uuid4().hex, updates)
            self._send(*self.unacked)
        self.restart_clock()

    def _send(self, request_id: str, updates: dict) -> None:
        answer = _blocking(self.target.update_many(updates, request_id=request_id), "update_many")
        self.unacked = None
        self.pushes += 1
        for m in self.members:
            if m.name in updates:
                m._unacked = None
                m._set_global(answer[m.name])

    def pull(self) -> None:
        infos = _blocking(self.target.describe([m.name for m in self.members]), "describe")
        by_name = {info.name: info for info in infos}
        for m in self.members:
            m._set_global(by_name[m.name].stats)

    def discard(self) -> None:
        self.unacked = None
        for m in self.members:
            m._unacked = None
            m._clear_pending()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.owned:
                self.owned = False
                self.target.close()


# --- the running mean and variance -----------------------------------------------------


class SharedRunningMeanStd:
    """SB3's ``RunningMeanStd`` over the samples of every actor, kept in a normsvc service.

    Parameters
    ----------
    target : Store, Client or str
        Where the statistics live: an in-process :class:`normsvc.Store`, a
        blocking :class:`normsvc.Client`, or a server address ``host:port``
        (a Client is then opened, and closed by :meth:`close`).  May be None
        with ``push_with`` (its target is used).
    name : str
        The layer's name in the service (all actors use the same one).
    shape : tuple of int
        Shape of one observation (``()`` for scalars, as SB3's ``shape``).
        Batches passed to :meth:`update` are ``(N, *shape)``.  Scalar
        statistics live in a layer of shape ``(1,)``.
    epsilon : float
        SB3's initial pseudo-count (``RunningMeanStd(epsilon=1e-4)``): the
        weight of the prior mean 0, variance 1.  Not the ``epsilon`` of
        :meth:`normalize`, which VecNormalize also calls epsilon (1e-8).
    push_every : int, optional
        Push once this many samples are pending (default
        :data:`DEFAULT_PUSH_EVERY`; 1 pushes every update, as a strictly
        global SB3 would).
    push_interval : float or None, optional
        Or on the first update this many seconds after the last push
        (default :data:`DEFAULT_PUSH_INTERVAL`; None: never by time).
    push_with : SharedRunningMeanStd, optional
        Share that statistic's schedule, target and requests: one
        ``update_many`` pushes both (observations and returns of one actor).
        ``push_every`` and ``push_interval`` are then that schedule's, and
        ``push_every`` counts the samples of the statistic that made the
        schedule; this one pushes on its own only at twice that many.
    create : bool
        Create the layer when missing (a cumulative batch layer of this
        shape; ConfigConflict if the name holds another layer).  False: it
        must exist, be cumulative and have this shape (a learner that only
        reads).

    Construction takes two round trips (create, then read the statistics).

    Attributes
    ----------
    name, shape, epsilon
        As given.
    """

    def __init__(self, target, name: str, shape=(), *, epsilon: float = 1e-4, push_every: int | None = None,
                 push_interval=DEFAULT, push_with=None, create: bool = True):
        if not isinstance(name, str):
            raise InvalidArgument(f"name={name!r}: expected a layer name (str)", field="name")
        self.name = name
        self.shape = _shape(shape)
        self.epsilon = _number(epsilon, "epsilon", strict=True)
        if not isinstance(create, bool):
            raise InvalidArgument(f"create={create!r}: expected True or False", field="create")
        self._size = math.prod(self.shape)
        self._layer_shape = self.shape if self.shape else (1,)
        axis = tuple(range(-len(self.shape), 0)) if len(self.shape) > 1 else -1
        self._config = make_config(kind="batch", axis=axis, num_features=self._layer_shape,
                                   convention="cumulative", epsilon=LAYER_EPSILON)
        if push_with is not None:
            schedule = self._joined(push_with, target, push_every, push_interval)
        else:
            client, owned = _connect(target)
            every = DEFAULT_PUSH_EVERY if push_every is None else _positive_int(push_every, "push_every")
            interval = DEFAULT_PUSH_INTERVAL if push_interval is DEFAULT else push_interval
            schedule = _Schedule(client, owned, every, _optional_positive(interval, "push_interval"))
        self._schedule = schedule
        self._clear_pending()
        self._unacked: Moments | None = None
        try:
            self._set_global(self._open(create))
        except BaseException:
            if push_with is None and schedule.owned:
                schedule.target.close()
            raise
        #: Pending samples at which an update pushes: the schedule's own count for the statistic that made
        #: it; twice that for those that joined, which ride along with its pushes (an owner that is not
        #: updated any more still leaves them a bound).
        self._push_at = schedule.push_every * (2 if schedule.members else 1)
        schedule.members.append(self)

    def _joined(self, other, target, push_every, push_interval) -> _Schedule:
        if not isinstance(other, SharedRunningMeanStd):
            raise InvalidType(f"push_with is a {type(other).__name__}: expected a SharedRunningMeanStd",
                              field="push_with")
        schedule = other._schedule
        if target is not None and target is not schedule.target and not (
                isinstance(target, str) and schedule.owned and target == schedule.target.target):
            raise InvalidArgument("target differs from push_with's: statistics pushed together live on one "
                                  "target (pass target=None)", field="target")
        if push_every is not None or push_interval is not DEFAULT:
            raise InvalidArgument("push_every and push_interval come from push_with's schedule: leave them out",
                                  field="push_every" if push_every is not None else "push_interval")
        if any(m.name == self.name for m in schedule.members):
            raise InvalidArgument(f"{self.name!r} is already pushed on this schedule: expected another layer "
                                  "name", field="name")
        return schedule

    def _open(self, create: bool):
        target = self._schedule.target
        if create:
            c = self._config
            _blocking(target.create_layer(self.name, kind=c.kind, axis=c.axis, num_features=c.num_features,
                                          convention=c.convention, epsilon=c.epsilon), "create_layer")
        info = _blocking(target.describe([self.name]), "describe")[0]
        config, stats = info.config, info.stats
        shape = None if stats is None else np.shape(stats.mean)
        if config.kind != "batch" or config.convention != "cumulative" or shape != self._layer_shape:
            raise InvalidArgument(
                f"layer {self.name!r} is a {config.convention} {config.kind} layer with statistics of shape "
                f"{shape}: expected a cumulative batch layer of shape {self._layer_shape} (create it with "
                "create=True, or use another name)", layer=self.name, field="name")
        return stats

    # --- state ---------------------------------------------------------------------
    # _g: (count, mean, m2) of prior (+) the layer's statistics, flat float64, set by each push or pull.
    # _n, _shift, _s1, _s2: the samples not pushed yet, as sums of (x - shift) and (x - shift)**2.
    # _unacked: Moments pushed without an answer yet (counted until the answer comes).
    # _view: (count, out) of all of them, computed once per change: out[0], out[1], out[2] are the
    #   flat mean, var and sqrt(var + 1e-8) (VecNormalize's epsilon), read-only, a fresh array each time
    #   (what a caller holds never changes).

    def _clear_pending(self) -> None:
        self._n = 0
        self._shift, self._s1, self._s2 = np.zeros(self._size), np.zeros(self._size), np.zeros(self._size)
        self._view = self._std = None

    def _set_global(self, stats) -> None:
        """Take the layer's exact statistics and merge SB3's prior into them (SB3's own formula)."""
        n = float(stats.count)
        mean = np.asarray(stats.mean, dtype=np.float64).reshape(-1)
        m2 = np.asarray(stats.variance, dtype=np.float64).reshape(-1) * n
        eps = self.epsilon
        total = eps + n
        w = n / total
        self._g = (total, mean * w, (eps + m2) + mean * mean * (eps * w))
        self._version = int(stats.version)
        self._view = self._std = None

    def _pending_moments(self) -> Moments | None:
        """What this actor has not had acknowledged: the unacked push, then the pending samples (flat)."""
        mine = None
        if self._n:
            a = self._s1 / self._n
            mine = Moments(np.float64(self._n), self._shift + a, np.maximum(self._s2 - self._s1 * a, 0.0))
        if self._unacked is None:
            return mine
        unacked = self._unacked.reshape((self._size,))
        return unacked if mine is None else unacked.merge(mine)

    def _take(self) -> Moments:
        """The moments to push now (they stay in the statistics as unacknowledged until answered)."""
        m = self._pending_moments().reshape(self._layer_shape)
        self._unacked = m
        self._clear_pending()
        return m

    def _stats(self) -> tuple:
        """(count, out): prior (+) global (+) own samples not acknowledged (see the comment above)."""
        view = self._view
        if view is not None:
            return view
        count, mean, m2 = self._g
        if self._unacked is None:  # the hot path: the pending sums as they are
            n_p, shift, s1, s2 = self._n, self._shift, self._s1, self._s2
        else:
            p = self._pending_moments()
            n_p, shift, s1, s2 = float(p.count), p.mean, np.zeros(self._size), p.m2
        out = np.empty((3, self._size))
        total = _combine(count, mean, m2, float(n_p), shift, s1, s2, _VEC_EPSILON, out)
        out.flags.writeable = False
        self._view = view = (total, out)
        return view

    @property
    def mean(self) -> np.ndarray:
        """Mean (float64, read-only) of all samples with the prior, as SB3's ``RunningMeanStd.mean``."""
        return self._stats()[1][0].reshape(self.shape)

    @property
    def var(self) -> np.ndarray:
        """Biased variance (float64, read-only) with the prior, as SB3's ``RunningMeanStd.var``."""
        return self._stats()[1][1].reshape(self.shape)

    @property
    def count(self) -> float:
        """Samples seen plus the prior's ``epsilon``, as SB3's ``RunningMeanStd.count``."""
        return float(self._stats()[0])

    @property
    def version(self) -> int:
        """The layer's version in the global statistics used (last push or pull)."""
        return self._version

    @property
    def pending(self) -> float:
        """Samples of this actor the service has not acknowledged yet."""
        return float(self._n + (0 if self._unacked is None else self._unacked.count))

    @property
    def pushes(self) -> int:
        """UpdateStats requests this actor's schedule has had answered."""
        return self._schedule.pushes

    @property
    def target(self):
        """The Store or Client the statistics live on."""
        return self._schedule.target

    # --- the actor's calls -----------------------------------------------------------

    def update(self, batch) -> "SharedRunningMeanStd":
        """Add a batch of samples ``(N, *shape)`` (SB3's ``update(arr)``); may push (see the module).

        Raises InvalidArgument (and changes nothing) for another shape or a
        non-finite value; any error of a push it triggers.
        """
        x = batch if type(batch) is np.ndarray else np.asarray(batch)
        if x.shape[1:] != self.shape or not x.ndim:
            raise InvalidArgument(f"batch of shape {x.shape}: expected {_batch_text(self.shape)}, N samples "
                                  f"of shape {self.shape}", layer=self.name, field="batch")
        n = x.shape[0]
        if not n:
            return self
        if x.dtype.kind not in _REAL:
            _real(x, "batch")
        if not _accumulate(x if x.ndim == 2 else x.reshape(n, self._size), self._shift, self._s1, self._s2,
                           not self._n):
            raise InvalidArgument("batch holds NaN or infinite values (or values too large to square): "
                                  "expected finite observations", layer=self.name, field="batch")
        self._n += n
        self._view = self._std = None
        schedule = self._schedule
        if self._n >= self._push_at or time.monotonic() >= schedule.deadline:
            schedule.flush()
        return self

    def _check_obs(self, x: np.ndarray, what: str) -> None:
        k = len(self.shape)
        if x.ndim < k or x.shape[x.ndim - k:] != self.shape:
            raise InvalidArgument(f"{what} of shape {x.shape}: expected shape {self.shape} or (..., "
                                  f"{', '.join(map(str, self.shape))})", layer=self.name, field=what)
        if x.dtype.kind not in _REAL:
            _real(x, what)

    def _sqrt_var(self, epsilon) -> np.ndarray:
        """``sqrt(var + epsilon)``, flat."""
        out = (self._view or self._stats())[1]
        if epsilon == _VEC_EPSILON:
            return out[2]
        cached = self._std
        if cached is None or cached[0] != epsilon:
            self._std = cached = (epsilon, np.sqrt(out[1] + _number(epsilon, "epsilon")))
        return cached[1]

    @staticmethod
    def _scaled(x: np.ndarray, mean: np.ndarray, std: np.ndarray, clip, dtype) -> np.ndarray:
        if clip is None:
            clip = math.inf
        elif not (type(clip) is float and clip > 0):
            clip = _number(clip, "clip", strict=True)
        if dtype is not np.float32:
            try:
                dtype = np.dtype(np.float64 if dtype is None else dtype)
            except TypeError:
                raise InvalidType(f"dtype={dtype!r}: expected a floating dtype (or None: float64)",
                                  field="dtype") from None
            if dtype.kind != "f":
                raise InvalidType(f"dtype={dtype}: expected a floating dtype (or None: float64)", field="dtype")
        out = np.empty(x.shape, dtype=dtype)
        if x.ndim == 2 and x.shape[1] == mean.size:
            _scale(x, mean, std, clip, out)
        else:
            k = mean.size
            _scale(x.reshape(-1, k), mean, std, clip, out.reshape(-1, k))
        return out

    def normalize(self, obs, clip: float | None = 10.0, epsilon: float = 1e-8, *, dtype=np.float32) -> np.ndarray:
        """``clip((obs - mean) / sqrt(var + epsilon), -clip, clip)``, as VecNormalize's ``normalize_obs``.

        ``obs`` is one observation or a batch (trailing axes ``shape``);
        computed in float64, returned as ``dtype`` (float32, as VecNormalize;
        None: float64).  ``clip=None`` does not clip.
        """
        x = obs if type(obs) is np.ndarray else np.asarray(obs)
        self._check_obs(x, "obs")
        std = self._sqrt_var(epsilon)
        return self._scaled(x, self._view[1][0], std, clip, dtype)

    def unnormalize(self, obs, epsilon: float = 1e-8, *, dtype=None) -> np.ndarray:
        """``obs * sqrt(var + epsilon) + mean``, as VecNormalize's ``unnormalize_obs`` (float64 unless ``dtype``)."""
        x = obs if type(obs) is np.ndarray else np.asarray(obs)
        self._check_obs(x, "obs")
        std = self._sqrt_var(epsilon).reshape(self.shape)
        y = x * std + self._view[1][0].reshape(self.shape)
        return y if dtype is None else y.astype(dtype, copy=False)

    def flush(self) -> None:
        """Push what is pending now, for every statistic on this schedule (one request; none if nothing is)."""
        self._schedule.flush()

    def pull(self) -> RmsState:
        """Read the global statistics of every statistic on this schedule (one request); returns :meth:`snapshot`."""
        self._schedule.pull()
        return self.snapshot()

    def snapshot(self) -> RmsState:
        """Mean, var and count as used now (copies), with the layer's version."""
        count, out = self._stats()
        return RmsState(out[0].reshape(self.shape).copy(), out[1].reshape(self.shape).copy(), float(count),
                        self._version)

    def discard_pending(self) -> None:
        """Drop every sample not acknowledged yet, of every statistic on this schedule (e.g. after a push
        was refused for good)."""
        self._schedule.discard()

    def close(self) -> None:
        """Push what is pending; close the Client if it was opened here for an address (then for every
        statistic on this schedule)."""
        self._schedule.close()

    def __enter__(self) -> "SharedRunningMeanStd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SharedRunningMeanStd({self.name!r}, shape={self.shape}, count={self.count:g}, "
                f"version={self._version}, pending={self.pending:g})")

    # --- state import and export ------------------------------------------------------

    def to_sb3(self, rms=None):
        """Copy mean, var and count into SB3's ``RunningMeanStd`` ``rms`` (e.g. ``vec_normalize.obs_rms``)
        and return it; without ``rms``, an :class:`RmsState` (the same attribute names)."""
        state = self.snapshot()
        if rms is None:
            return state
        have = np.shape(getattr(rms, "mean", None))
        if have != self.shape:
            raise InvalidArgument(f"rms.mean has shape {have}: expected {self.shape}", field="rms")
        rms.mean, rms.var, rms.count = state.mean, state.var, state.count
        return rms

    def from_sb3(self, rms) -> RmsState:
        """Set the service's statistics from SB3's ``RunningMeanStd`` (or anything with ``mean``, ``var``,
        ``count``; e.g. ``vec_normalize.obs_rms`` of a saved VecNormalize); see :meth:`load_state`."""
        try:
            mean, var, count = rms.mean, rms.var, rms.count
        except AttributeError:
            raise InvalidType(f"rms is a {type(rms).__name__}: expected an object with mean, var and count "
                              "(SB3's RunningMeanStd)", field="rms") from None
        return self.load_state(mean, var, count)

    def load_state(self, mean, var, count) -> RmsState:
        """Set the service's statistics so that this object's mean, var and count are these (SB3's).

        SB3's state is its prior merged with the data; the prior (``epsilon``
        pseudo-samples, mean 0, variance 1) is taken out again (Chan's merge
        inverted) and the layer gets the data's count, mean and variance in
        one import (safetensors, one transaction, version + 1).  The count
        stored is ``count - epsilon``, rounded to a whole number of samples
        when it is one up to float rounding; ``count`` must therefore come
        from a RunningMeanStd with this ``epsilon`` (``count == epsilon``:
        no samples).  Pending samples of the schedule are pushed first, so
        the loaded state replaces them too.  Over a Client this is an
        ImportStats call: with ``--tokens`` it needs a token of the admin
        role (a learner restoring a checkpoint, not every actor).  Returns
        :meth:`snapshot`.
        """
        mean = self._state_array(mean, "mean")
        var = self._state_array(var, "var")
        if (var < 0).any():
            raise InvalidArgument("var has negative values: expected variances >= 0", layer=self.name, field="var")
        count = _number(count, "count")
        eps = self.epsilon
        n = count - eps
        if n < -1e-9 * max(eps, 1.0):
            raise InvalidArgument(f"count={count!r} is below epsilon={eps!r}, the prior pseudo-count every SB3 "
                                  "count includes: expected a count >= epsilon from a RunningMeanStd with this "
                                  "epsilon", layer=self.name, field="count")
        if abs(n - round(n)) <= 1e-9 * max(1.0, n):
            n = float(round(n))
        if n > 0:
            data_mean = mean * (count / n)
            data_m2 = var * count - eps - data_mean * data_mean * (eps * n / count)
            data_var = np.maximum(data_m2, 0.0) / n
        else:
            n, data_mean, data_var = 0.0, np.zeros(self._size), np.zeros(self._size)
        self._schedule.flush()
        self._import(n, data_mean.reshape(self._layer_shape), data_var.reshape(self._layer_shape))
        info = _blocking(self.target.describe([self.name]), "describe")[0]
        self._set_global(info.stats)
        return self.snapshot()

    def _state_array(self, value, field: str) -> np.ndarray:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidType(f"{field}={value!r}: expected an array of numbers", field=field) from None
        if arr.shape != self.shape:
            raise InvalidArgument(f"{field} has shape {arr.shape}: expected {self.shape}", layer=self.name,
                                  field=field)
        if not np.isfinite(arr).all():
            raise InvalidArgument(f"{field} holds NaN or infinite values: expected finite numbers",
                                  layer=self.name, field=field)
        return arr.reshape(-1)

    def _import(self, count: float, mean: np.ndarray, var: np.ndarray) -> None:
        """Write the layer's statistics through ``import_`` (a Store and a Client both have it)."""
        from safetensors.numpy import save_file

        meta = {"format": _FILE_FORMAT, "naming": "keras",
                "layers": {self.name: {"config": self._config.to_dict(), "count": count, "num_batches": 0}}}
        tensors = {f"{self.name}/moving_mean": np.ascontiguousarray(mean),
                   f"{self.name}/moving_variance": np.ascontiguousarray(var)}
        with tempfile.TemporaryDirectory(prefix="normsvc-rl-") as tmp:
            path = os.path.join(tmp, "state.safetensors")
            save_file(tensors, path, metadata={"normsvc": json.dumps(meta)})
            _blocking(self.target.import_(path, layers=[self.name]), "import_")


# --- returns -------------------------------------------------------------------------


class SharedReturnNormalizer:
    """VecNormalize's reward normalization with shared statistics of the discounted returns.

    Per environment it keeps the discounted return ``returns = returns *
    gamma + reward`` (reset to 0 where an episode ends); the running
    variance of those returns over every actor (``ret_rms``, a scalar
    :class:`SharedRunningMeanStd`) scales the rewards:
    ``clip(reward / sqrt(ret_rms.var + epsilon), -clip_reward, clip_reward)``.
    :meth:`step` does what ``VecNormalize.step_wait`` does to rewards.

    Parameters
    ----------
    target, name
        As :class:`SharedRunningMeanStd` (the layer of the returns).
    num_envs : int
        Environments this actor steps at once (the length of ``rewards``).
    gamma : float
        Discount factor, in [0, 1] (VecNormalize's default 0.99).
    clip_reward : float or None
        Bound of the normalized reward (10.0; None: no clipping).
    epsilon : float
        Added to the variance before the square root (1e-8).
    rms_epsilon : float
        The prior pseudo-count of ``ret_rms`` (SB3's 1e-4).
    push_every, push_interval, push_with, create
        As :class:`SharedRunningMeanStd`; ``push_with=obs_rms`` pushes the
        returns in the same request as the observations.
    """

    def __init__(self, target, name: str, num_envs: int, *, gamma: float = 0.99, clip_reward: float | None = 10.0,
                 epsilon: float = 1e-8, rms_epsilon: float = 1e-4, push_every: int | None = None,
                 push_interval=DEFAULT, push_with=None, create: bool = True):
        self.num_envs = _positive_int(num_envs, "num_envs")
        self.gamma = _number(gamma, "gamma", high=1.0)
        self.clip_reward = _optional_positive(clip_reward, "clip_reward")
        self.epsilon = _number(epsilon, "epsilon")
        self.ret_rms = SharedRunningMeanStd(target, name, (), epsilon=rms_epsilon, push_every=push_every,
                                            push_interval=push_interval, push_with=push_with, create=create)
        #: The discounted return of each environment (float64), as VecNormalize's ``returns``.
        self.returns = np.zeros(self.num_envs)

    def _rewards(self, rewards, what: str = "rewards") -> np.ndarray:
        r = rewards if type(rewards) is np.ndarray else np.asarray(rewards)
        if r.shape != (self.num_envs,):
            raise InvalidArgument(f"{what} of shape {r.shape}: expected ({self.num_envs},), one per environment",
                                  layer=self.ret_rms.name, field=what)
        if r.dtype.kind not in _REAL:
            _real(r, what)
        return r

    def update(self, rewards) -> "SharedReturnNormalizer":
        """Discount ``rewards`` into :attr:`returns` and add the returns to ``ret_rms`` (VecNormalize's
        ``_update_reward``)."""
        self._update(self._rewards(rewards))
        return self

    def _update(self, r: np.ndarray) -> None:
        returns = np.empty(self.num_envs)
        if not _discount(self.returns, r, self.gamma, returns):
            raise InvalidArgument("rewards hold NaN or infinite values (or the returns overflow): expected "
                                  "finite rewards", layer=self.ret_rms.name, field="rewards")
        self.ret_rms.update(returns)
        self.returns = returns

    def normalize(self, rewards, *, dtype=np.float32) -> np.ndarray:
        """``clip(rewards / sqrt(ret_rms.var + epsilon))`` as ``dtype`` (float32, VecNormalize's; None: float64)."""
        r = rewards if type(rewards) is np.ndarray else np.asarray(rewards)
        if r.dtype.kind not in _REAL:
            _real(r, "rewards")
        return self._normalize(r, dtype)

    def _normalize(self, r: np.ndarray, dtype) -> np.ndarray:
        std = self.ret_rms._sqrt_var(self.epsilon)
        return self.ret_rms._scaled(r, _ZERO, std, self.clip_reward, dtype)  # r - 0.0 is r, bit for bit

    def unnormalize(self, rewards, *, dtype=None) -> np.ndarray:
        """``rewards * sqrt(ret_rms.var + epsilon)`` (VecNormalize's ``unnormalize_reward``)."""
        r = rewards if type(rewards) is np.ndarray else np.asarray(rewards)
        if r.dtype.kind not in _REAL:
            _real(r, "rewards")
        y = r * self.ret_rms._sqrt_var(self.epsilon)[0]
        return y if dtype is None else y.astype(dtype, copy=False)

    def _dones(self, dones) -> np.ndarray:
        d = dones if type(dones) is np.ndarray else np.asarray(dones)
        if d.shape != (self.num_envs,) or d.dtype.kind not in "bi":
            raise InvalidArgument(f"dones of shape {d.shape} and dtype {d.dtype}: expected ({self.num_envs},) "
                                  "booleans", layer=self.ret_rms.name, field="dones")
        return d if d.dtype.kind == "b" else d.astype(bool)

    def reset(self, dones=None) -> None:
        """Zero the returns of the environments where ``dones`` is true (None: all, as ``VecNormalize.reset``)."""
        if dones is None:
            self.returns = np.zeros(self.num_envs)
        else:
            self.returns[self._dones(dones)] = 0.0

    def step(self, rewards, dones, *, training: bool = True) -> np.ndarray:
        """What ``VecNormalize.step_wait`` does to rewards: update (when ``training``), normalize, then
        reset the returns where ``dones``.  Returns the normalized rewards (float32)."""
        r, d = self._rewards(rewards), self._dones(dones)
        if training:
            self._update(r)
        out = self._normalize(r, np.float32)
        if d.any():
            self.returns[d] = 0.0
        return out

    # The schedule's calls, on ret_rms.
    def flush(self) -> None:
        """Push what is pending (see :meth:`SharedRunningMeanStd.flush`)."""
        self.ret_rms.flush()

    def pull(self) -> RmsState:
        """Read the global statistics (see :meth:`SharedRunningMeanStd.pull`)."""
        return self.ret_rms.pull()

    def close(self) -> None:
        """Push what is pending (see :meth:`SharedRunningMeanStd.close`)."""
        self.ret_rms.close()

    def to_sb3(self, rms=None):
        """``ret_rms`` into SB3's RunningMeanStd (e.g. ``vec_normalize.ret_rms``); see
        :meth:`SharedRunningMeanStd.to_sb3`."""
        return self.ret_rms.to_sb3(rms)

    def from_sb3(self, rms) -> RmsState:
        """Set ``ret_rms`` from SB3's (e.g. ``vec_normalize.ret_rms``); see :meth:`SharedRunningMeanStd.load_state`."""
        return self.ret_rms.from_sb3(rms)

    def __enter__(self) -> "SharedReturnNormalizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedReturnNormalizer({self.ret_rms.name!r}, num_envs={self.num_envs}, gamma={self.gamma})"
