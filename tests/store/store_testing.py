"""Helpers for the store tests (importable: tests/store/conftest.py puts this folder on sys.path)."""

import numpy as np

from normsvc import Moments


def np_moments(x, axes) -> Moments:
    """Moments of ``x`` over ``axes`` with plain numpy (float64, two-pass): no kernels involved."""
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(np.atleast_1d(axes).tolist())
    mean = x.mean(axis=axes)
    m2 = ((x - x.mean(axis=axes, keepdims=True)) ** 2).sum(axis=axes)
    return Moments(np.float64(x.size // max(mean.size, 1)), mean, m2)


def batch_moments(rng, n=8, c=4, loc=0.0, scale=1.0) -> Moments:
    """Moments of a random (n, c) channels-last batch."""
    return np_moments(loc + scale * rng.standard_normal((n, c)), [0])
