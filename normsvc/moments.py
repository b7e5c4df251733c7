"""Moments: the value type every norm reduces to.

A ``Moments`` holds, per statistic group, the sample ``count``, the ``mean``
and ``m2`` (the sum of squared deviations from the mean).  It is the
sufficient statistic for mean and variance, and two of them merge exactly
(Chan et al.), so batches, shards or ranks can be reduced in any order.

Examples
--------
>>> import numpy as np
>>> a = Moments.from_samples(np.array([1.0, 2.0, 3.0]))
>>> b = Moments.from_samples(np.array([4.0, 5.0]))
>>> m = a.merge(b)
>>> float(m.count), float(m.mean), float(m.variance)
(5.0, 3.0, 2.0)
>>> float(m.unbiased_variance())
2.5

References
----------
Welford, B. P. (1962). Note on a method for calculating corrected sums of
squares and products. Technometrics 4(3).
Chan, T. F., Golub, G. H., LeVeque, R. J. (1979). Updating formulae and a
pairwise algorithm for computing sample variances. Stanford CS tech report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from .errors import InvalidArgument, InvalidType

__all__ = ["Moments", "merge_all"]


def _f64(value, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidType(f"Moments.{name} must be numeric, got {value!r}") from exc


@dataclass(frozen=True, eq=False)
class Moments:
    """Per-group count, mean and m2 (float64), the sufficient statistics of a batch.

    Parameters
    ----------
    count : array_like
        Samples per group; a scalar when every group has the same count.
    mean : array_like
        Per-group mean.
    m2 : array_like
        Per-group sum of squared deviations from the mean (``variance * count``).
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self):
        count, mean, m2 = _f64(self.count, "count"), _f64(self.mean, "mean"), _f64(self.m2, "m2")
        try:
            fits = np.broadcast_shapes(count.shape, mean.shape) == mean.shape
        except ValueError:
            fits = False
        if not fits:
            raise InvalidArgument(
                f"Moments.count shape {count.shape} does not broadcast to mean shape {mean.shape}"
            )
        if m2.shape != mean.shape:
            raise InvalidArgument(f"Moments.m2 shape {m2.shape} must equal mean shape {mean.shape}")
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "m2", m2)

    @classmethod
    def _trusted(cls, count: int, mean: np.ndarray, m2: np.ndarray) -> "Moments":
        """Wrap float64 arrays the kernels just produced, skipping validation (hot path)."""
        m = object.__new__(cls)
        m.__dict__.update(count=np.float64(count), mean=mean, m2=m2)
        return m

    @classmethod
    def _checked(cls, count: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> "Moments":
        """Wrap float64 arrays whose shapes the caller checked (the tensor codec), skipping validation."""
        m = object.__new__(cls)
        m.__dict__.update(count=count, mean=mean, m2=m2)
        return m

    @classmethod
    def from_variance(cls, count, mean, variance) -> "Moments":
        """Build from a count, a mean and the *biased* (population) variance."""
        count = _f64(count, "count")
        return cls(count, mean, _f64(variance, "variance") * count)

    @classmethod
    def from_samples(cls, x, axis=0) -> "Moments":
        """Reference constructor from samples with numpy (float64, two-pass)."""
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=axis)
        m2 = ((x - np.expand_dims(mean, axis)) ** 2).sum(axis=axis) if x.ndim else np.zeros(())
        n = x.size // max(mean.size, 1)
        return cls(np.float64(n), mean, m2)

    @property
    def shape(self) -> tuple:
        """Shape of the per-group statistics."""
        return self.mean.shape

    @property
    def variance(self) -> np.ndarray:
        """Biased (population) variance, ``m2 / count``; 0 for empty groups."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.count > 0, self.m2 / self.count, 0.0)

    def unbiased_variance(self) -> np.ndarray:
        """Sample variance ``m2 / (count - 1)`` (Bessel); NaN where count <= 1, as numpy's ddof=1."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.count > 1, self.m2 / (self.count - 1), np.nan)

    def merge(self, other: "Moments") -> "Moments":
        """Combine two disjoint sets of samples (Chan et al.); exact and associative."""
        if not isinstance(other, Moments):
            raise InvalidType(f"can only merge Moments with Moments, got {type(other).__name__}")
        if other.mean.shape != self.mean.shape:
            raise InvalidArgument(
                f"cannot merge Moments of shape {self.mean.shape} with shape {other.mean.shape}"
            )
        na, nb = self.count, other.count
        n = na + nb
        delta = other.mean - self.mean
        with np.errstate(divide="ignore", invalid="ignore"):
            wb = np.where(n > 0, nb / n, 0.0)
            mean = self.mean + delta * wb
            m2 = self.m2 + other.m2 + delta * delta * na * wb
        return Moments(n, mean, m2)

    def reshape(self, shape) -> "Moments":
        """The same statistics with the groups laid out in ``shape``."""
        count = self.count if self.count.ndim == 0 else self.count.reshape(shape)
        return Moments(count, self.mean.reshape(shape), self.m2.reshape(shape))

    def __repr__(self) -> str:
        return f"Moments(count={self.count!r}, mean={self.mean!r}, variance={self.variance!r})"


def merge_all(moments) -> Moments:
    """The moments of every batch in ``moments`` (a non-empty sequence), merged in order.

    The same bits as ``functools.reduce(Moments.merge, moments)``: batches
    with a scalar count each (batch norm's per-channel moments, a rank's
    contribution) merge in one compiled pass with the same operations in the
    same order; anything else merges pair by pair.
    """
    first = moments[0]
    shape = first.mean.shape
    if len(moments) > 1 and all(m.count.ndim == 0 and m.mean.shape == shape for m in moments):
        mean, m2 = np.empty(shape), np.empty(shape)
        total = _chan(np.array([m.count for m in moments]), np.concatenate([m.mean for m in moments], axis=None),
                      np.concatenate([m.m2 for m in moments], axis=None), mean.reshape(-1), m2.reshape(-1))
        return Moments._checked(np.float64(total), mean, m2)
    merged = first
    for m in moments[1:]:
        merged = merged.merge(m)
    return merged


@njit(cache=True, nogil=False, error_model="numpy")
def _chan(counts, means, m2s, out_mean, out_m2):  # pragma: no cover - compiled
    """Rows of scalar-count moments (``means``/``m2s``: the rows one after the other) merged in
    order, as repeated :meth:`Moments.merge` does (``wb = nb / n``, 0 where ``n`` is 0), element by
    element; returns the total count."""
    rows = counts.size
    # the running count before each row and each row's weight: the same for every element
    before, weight = np.empty(rows), np.empty(rows)
    total = counts[0]
    for r in range(1, rows):
        nb = counts[r]
        n = total + nb
        before[r] = total
        weight[r] = nb / n if n > 0 else 0.0
        total = n
    size = out_mean.size
    for i in range(size):
        mean, m2 = means[i], m2s[i]
        for r in range(1, rows):
            delta = means[r * size + i] - mean
            wb = weight[r]
            mean = mean + delta * wb
            m2 = m2 + m2s[r * size + i] + delta * delta * before[r] * wb
        out_mean[i] = mean
        out_m2[i] = m2
    return total
