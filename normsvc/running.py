"""Running statistics and the conventions that update them.

A layer's running statistics are a per-feature ``mean`` and ``variance``
plus how many samples (``count``) and batches (``num_batches``) went into
them.  Each training step reduces its batch to one :class:`BatchStatistics`
per feature and folds it in with one of three conventions:

``keras``
    ``moving = moving * m + batch * (1 - m)`` with the *biased* batch
    variance; starts at mean 0, variance 1 (Keras ``BatchNormalization``,
    default ``m = 0.99``).
``torch``
    ``running = (1 - m) * running + m * batch`` with the *unbiased* batch
    variance ``var * n / (n - 1)``; starts at mean 0, variance 1 (PyTorch
    ``BatchNorm``, default ``m = 0.1``).  ``m = None`` is torch's cumulative
    moving average: ``m = 1 / num_batches``, so every batch weighs the same
    (and the initial 0 / 1 are forgotten after the first batch).
``cumulative``
    The exact Chan merge of every sample ever pushed: the pooled population
    mean and (biased) variance, what a "precise BN" recompute wants.  Unlike
    torch's ``momentum=None`` it counts the spread between batch means, and
    batches weigh by their sample count.  Starts empty (count 0).

Batch renormalization (``renorm``, keras convention only, as tf.keras'
``BatchNormalization(renorm=True)``) keeps three more per-feature values:
``moving_stddev``, the moving average of the batch's ``sqrt(var + eps)``
with ``m`` (``variance`` is then ``max(moving_stddev**2 - eps, 0)``), and
``renorm_mean`` / ``renorm_stddev``, the moving averages of the batch mean
and ``sqrt(var + eps)`` with ``renorm_momentum``, which the training
forward corrects towards (:func:`normsvc.ops.batch_renorm`).  They start at
1, 0 and 1.

Everything here is a pure function on float64 numpy arrays; the store
(:mod:`normsvc.store`) keeps the values and makes the updates atomic.

Examples
--------
>>> import numpy as np
>>> from normsvc.moments import Moments
>>> b = batch_statistics(Moments.from_samples(np.array([[1.0], [3.0]])), sample_ndim=0)
>>> b.mean, b.variance, b.count
(array([2.]), array([1.]), 2.0)
>>> s = initial_state("keras", (1,))
>>> s = apply_update(s, b, convention="keras", momentum=0.9)
>>> s.mean, s.variance, s.num_batches
(array([0.2]), array([1.]), 1)
>>> s = apply_update(initial_state("torch", (1,)), b, convention="torch", momentum=0.1)
>>> s.mean, s.variance  # running_var takes the unbiased batch variance, 2.0
(array([0.2]), array([1.1]))

References
----------
Chan, T. F., Golub, G. H., LeVeque, R. J. (1979). Updating formulae and a
pairwise algorithm for computing sample variances.
Wu, Y., Johnson, J. (2021). Rethinking "Batch" in BatchNorm. arXiv:2105.07576
(precise BN: population statistics instead of moving averages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields as dataclass_fields

import numpy as np
from numba import njit

from .errors import InvalidArgument
from .moments import Moments

__all__ = [
    "CONVENTIONS",
    "DEFAULTS",
    "RunningStats",
    "BatchStatistics",
    "batch_statistics",
    "initial_state",
    "apply_update",
    "fold",
]

CONVENTIONS = ("keras", "torch", "cumulative")

#: Per-convention defaults for (momentum, epsilon), as the frameworks ship them.
#: ``cumulative`` has no momentum and takes Keras' epsilon.
DEFAULTS = {
    "keras": (0.99, 1e-3),
    "torch": (0.1, 1e-5),
    "cumulative": (None, 1e-3),
}


@dataclass(frozen=True, eq=False)
class RunningStats:
    """A layer's running statistics at one version.

    Every RunningStats a Store, its layers or a Client hand out holds arrays
    the caller owns: writable (``torch.from_numpy(stats.mean)`` shares them
    without a warning) and shared with nothing, so writing to them changes
    neither the stored statistics nor what any other caller receives.

    Attributes
    ----------
    mean, variance : ndarray of float64
        Per-feature running mean and variance (the torch convention keeps the
        unbiased running variance, as ``running_var``; keras and cumulative the
        biased one).  A layer whose shape is learned from its first batch holds
        0-d arrays until then: the initial values, which broadcast to any shape.
    count : float
        Samples folded in since creation or the last reset (sum of the batch counts).
    num_batches : int
        Batches folded in (torch's ``num_batches_tracked``).
    version : int
        Grows by one with every mutation of the layer; 0 when created.
    frozen : bool
        A frozen layer takes no updates and normalizes with these statistics.
    updated_at : float
        Unix time (seconds) of the last mutation.
    run : str
        The run whose step contributions the layer follows ("" before any).
    last_step : int or None
        The last step of ``run`` applied: a contribution to step ``s`` has
        been applied once ``last_step >= s`` (None: no step yet).
    moving_stddev, renorm_mean, renorm_stddev : ndarray of float64 or None
        Batch renormalization's statistics (see above); None for a layer
        without renorm.
    """

    mean: np.ndarray
    variance: np.ndarray
    count: float = 0.0
    num_batches: int = 0
    version: int = 0
    frozen: bool = False
    updated_at: float = 0.0
    run: str = ""
    last_step: int | None = None
    moving_stddev: np.ndarray | None = None
    renorm_mean: np.ndarray | None = None
    renorm_stddev: np.ndarray | None = None

    @property
    def renorm(self) -> tuple | None:
        """``(moving_stddev, renorm_mean, renorm_stddev)``, or None without renorm."""
        return None if self.renorm_mean is None else (self.moving_stddev, self.renorm_mean, self.renorm_stddev)

    def __eq__(self, other) -> bool:
        if not isinstance(other, RunningStats):
            return NotImplemented
        same = lambda a, b: a.shape == b.shape and np.array_equal(a, b)
        mine, theirs = self.renorm, other.renorm
        if (mine is None) != (theirs is None) or (mine is not None and not all(map(same, mine, theirs))):
            return False
        return (
            same(self.mean, other.mean)
            and same(self.variance, other.variance)
            and (self.count, self.num_batches, self.version, self.frozen, self.updated_at, self.run, self.last_step)
            == (other.count, other.num_batches, other.version, other.frozen, other.updated_at, other.run,
                other.last_step)
        )

    __hash__ = None

    def evolve(self, **changes) -> "RunningStats":
        """``dataclasses.replace(self, **changes)`` at a fraction of its cost (the store's hot paths
        build one per layer and call); the arrays are shared, not copied."""
        if not changes.keys() <= _FIELDS:
            raise TypeError(f"RunningStats has no field {sorted(changes.keys() - _FIELDS)}")
        new = object.__new__(RunningStats)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    def copy(self) -> "RunningStats":
        """The same statistics with arrays of their own (every other field as it is).

        What a backend that keeps arrays in memory hands out, once per call:
        a copy of the two arrays and nothing else (``dataclasses.replace``
        would cost several times the copy of a few thousand channels).
        """
        new = object.__new__(RunningStats)
        fields = new.__dict__
        fields.update(self.__dict__)
        fields["mean"], fields["variance"] = self.mean.copy(), self.variance.copy()
        if self.renorm_mean is not None:
            fields["moving_stddev"] = self.moving_stddev.copy()
            fields["renorm_mean"], fields["renorm_stddev"] = self.renorm_mean.copy(), self.renorm_stddev.copy()
        return new


_FIELDS = frozenset(f.name for f in dataclass_fields(RunningStats))


@dataclass(frozen=True, eq=False)
class BatchStatistics:
    """One batch reduced to per-feature statistics.

    Attributes
    ----------
    mean : ndarray
        Per-feature mean (equal to the pooled mean of the batch).
    variance : ndarray
        Per-feature *within-unit* biased variance: the mean over the batch's
        units (instances, groups of one sample) of each unit's variance.  For
        batch norm there is one unit, the batch, and this is the batch variance.
    count : float
        Samples in the batch per feature.
    unit_count : float
        Samples per unit: the ``n`` of torch's unbiased ``var * n / (n - 1)``.
    pooled_m2 : ndarray
        Sum of squared deviations from ``mean`` over all samples of the batch
        (within-unit plus between-unit spread), for the cumulative merge.
    """

    mean: np.ndarray
    variance: np.ndarray
    count: float
    unit_count: float
    pooled_m2: np.ndarray

    def unbiased_variance(self) -> np.ndarray:
        n = self.unit_count
        return self.variance * (n / (n - 1.0))


def batch_statistics(moments: Moments, sample_ndim: int, *, pool: bool = False) -> BatchStatistics:
    """Reduce per-unit ``moments`` over their leading ``sample_ndim`` axes.

    Instance and group norm produce moments per (sample, channel or group);
    the running statistics are per channel or group, so the units of one
    batch are averaged as torch's ``InstanceNorm(track_running_stats=True)``
    does: the mean of the unit means and the mean of the unit variances.
    ``pool=True`` instead treats the whole batch as one unit (pooled
    variance, Bessel count = all samples): RMS norm wants that, since its
    running mean square ``variance + mean**2`` must be the batch's mean of
    ``x**2``, spread between samples included.
    ``moments.count`` must be one scalar (every unit the same size), which is
    what the ops produce; callers validate that.

    >>> m = Moments.from_samples(np.array([[[0.0], [2.0]], [[4.0], [6.0]]]), axis=1)
    >>> b = batch_statistics(m, sample_ndim=1)   # two units of two samples
    >>> b.mean, b.variance, b.count, b.unit_count, b.pooled_m2
    (array([3.]), array([1.]), 4.0, 2.0, array([20.]))
    """
    k = float(moments.count)
    mean, m2 = moments.mean, moments.m2
    if sample_ndim == 0:
        return BatchStatistics(mean.copy(), m2 / k, k, k, m2.copy())
    axes = tuple(range(sample_ndim))
    units = math.prod(mean.shape[:sample_ndim])
    pooled_mean = mean.mean(axis=axes)
    within = m2.sum(axis=axes)
    between = k * ((mean - pooled_mean) ** 2).sum(axis=axes)
    n, pooled = k * units, within + between
    if pool:
        return BatchStatistics(pooled_mean, pooled / n, n, n, pooled)
    return BatchStatistics(pooled_mean, within / n, n, k, pooled)


def initial_state(convention: str, shape: tuple = (), *, renorm: bool = False) -> RunningStats:
    """Statistics before any batch: mean 0 and variance 1 (keras, torch), or empty (cumulative);
    with ``renorm``, moving_stddev 1, renorm_mean 0 and renorm_stddev 1 (tf.keras' initial values)."""
    mean = np.zeros(shape)
    variance = np.zeros(shape) if convention == "cumulative" else np.ones(shape)
    if renorm:
        return RunningStats(mean, variance, moving_stddev=np.ones(shape), renorm_mean=np.zeros(shape),
                            renorm_stddev=np.ones(shape))
    return RunningStats(mean, variance)


def apply_update(
    state: RunningStats, batch: BatchStatistics, *, convention: str, momentum: float | None,
    renorm: tuple | None = None,
) -> RunningStats:
    """Fold one batch into ``state`` (whose mean/variance must have the batch's shape).

    ``renorm`` is ``(renorm_momentum, epsilon)`` for a layer with batch
    renormalization (keras convention).  Returns new statistics with
    ``count`` and ``num_batches`` advanced; version, frozen and updated_at
    are left for the caller.
    """
    mean, var = state.mean, state.variance
    num_batches = state.num_batches + 1
    if renorm is not None:
        return _renorm_update(state, batch, momentum, *renorm)
    if convention == "keras":
        m = momentum
        new_mean = mean * m + batch.mean * (1.0 - m)
        new_var = var * m + batch.variance * (1.0 - m)
    elif convention == "torch":
        m = 1.0 / num_batches if momentum is None else momentum
        new_mean = (1.0 - m) * mean + m * batch.mean
        new_var = (1.0 - m) * var + m * batch.unbiased_variance()
    elif convention == "cumulative":
        merged = Moments(state.count, mean, var * state.count).merge(
            Moments(batch.count, batch.mean, batch.pooled_m2)
        )
        new_mean, new_var = merged.mean, merged.variance
    else:
        raise InvalidArgument(f"convention={convention!r}: expected one of {', '.join(CONVENTIONS)}")
    return RunningStats(
        np.asarray(new_mean, dtype=np.float64),
        np.asarray(new_var, dtype=np.float64),
        state.count + batch.count,
        num_batches,
        state.version,
        state.frozen,
        state.updated_at,
    )


def _renorm_update(state: RunningStats, batch: BatchStatistics, m: float, rm: float, eps: float) -> RunningStats:
    """tf.keras' renorm update: the moving mean and stddev with ``m``, the renorm averages with
    ``rm``, and the moving variance derived from the moving stddev."""
    stddev = np.sqrt(batch.variance + eps)
    moving_stddev = state.moving_stddev * m + stddev * (1.0 - m)
    return RunningStats(
        np.asarray(state.mean * m + batch.mean * (1.0 - m), dtype=np.float64),
        np.maximum(moving_stddev * moving_stddev - eps, 0.0),
        state.count + batch.count,
        state.num_batches + 1,
        state.version,
        state.frozen,
        state.updated_at,
        moving_stddev=np.asarray(moving_stddev, dtype=np.float64),
        renorm_mean=np.asarray(state.renorm_mean * rm + batch.mean * (1.0 - rm), dtype=np.float64),
        renorm_stddev=np.asarray(state.renorm_stddev * rm + stddev * (1.0 - rm), dtype=np.float64),
    )


_CODES = {"keras": 0, "torch": 1, "cumulative": 2}


@njit(cache=True, nogil=False, error_model="numpy")
def _fold(mean, var, bmean, bm2, k, n0, code, m, out_mean, out_var):  # pragma: no cover - compiled
    """apply_update for sample_ndim 0, element by element in the same operation order; False
    as soon as an input is not finite, an m2 is negative or a result overflows."""
    for i in range(mean.size):
        bm, m2 = bmean[i], bm2[i]
        if not (math.isfinite(bm) and math.isfinite(m2) and m2 >= 0.0):
            return False
        bv = m2 / k
        if code == 0:
            nm = mean[i] * m + bm * (1.0 - m)
            nv = var[i] * m + bv * (1.0 - m)
        elif code == 1:
            nm = (1.0 - m) * mean[i] + m * bm
            nv = (1.0 - m) * var[i] + m * (bv * (k / (k - 1.0)))
        else:
            n = n0 + k
            wb = k / n
            delta = bm - mean[i]
            nm = mean[i] + delta * wb
            nv = (var[i] * n0 + m2 + delta * delta * n0 * wb) / n
        if not (math.isfinite(nm) and math.isfinite(nv)):
            return False
        out_mean[i] = nm
        out_var[i] = nv
    return True


def _flat(a: np.ndarray) -> np.ndarray:
    return a if a.ndim == 1 else a.reshape(-1)


def fold(state: RunningStats, moments: Moments, *, convention: str, momentum: float | None) -> RunningStats | None:
    """``apply_update(state, batch_statistics(moments, 0), ...)`` in one compiled pass, or None.

    The hot path of a batch-norm update: ``moments`` has a scalar count and
    the shape of ``state``.  Gives the same numbers as :func:`apply_update`
    (the same operations in the same order), and None, without computing the
    rest, when the moments are not valid (a count <= 0 or not finite, a
    count <= 1 under the torch convention, a NaN/Inf mean or m2, a negative
    m2, another shape) or the result overflows: callers then take the
    general path, which names the problem.
    """
    mean, var = state.mean, state.variance
    count = moments.count
    if count.ndim or moments.mean.shape != mean.shape or not mean.size or state.renorm_mean is not None:
        return None
    k = float(count)
    if not (0.0 < k < math.inf) or (convention == "torch" and k <= 1.0):
        return None
    num_batches = state.num_batches + 1
    if convention == "keras":
        m = momentum
    elif convention == "torch":
        m = 1.0 / num_batches if momentum is None else momentum
    else:
        m = 0.0
    new_mean, new_var = np.empty(mean.shape), np.empty(mean.shape)
    ok = _fold(_flat(mean), _flat(var), _flat(moments.mean), _flat(moments.m2), k, float(state.count),
               _CODES[convention], float(m), _flat(new_mean), _flat(new_var))
    if not ok:
        return None
    return state.evolve(mean=new_mean, variance=new_var, count=state.count + k, num_batches=num_batches)
