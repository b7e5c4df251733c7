"""Statistics handed out are the caller's own: a check for Store and Client alike.

``handed_out(api, name, rng)`` calls every method of the shared API that
returns statistics of layer ``name`` (or the batch moments of a normalize)
and, right after each call, writes garbage into what it returned; the next
call then reads the layer again.  ``assert_owned`` checks a value: writable
arrays that ``torch.from_numpy`` takes without a warning.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from normsvc import Moments
from normsvc.running import RunningStats

__all__ = ["handed_out", "assert_owned", "arrays"]


def arrays(value) -> list[np.ndarray]:
    """The arrays a caller receives in a RunningStats or Moments."""
    if isinstance(value, RunningStats):
        return [value.mean, value.variance]
    assert isinstance(value, Moments), type(value)
    return [value.mean, value.m2] + ([value.count] if isinstance(value.count, np.ndarray) else [])


def _scribble(value) -> None:
    for a in arrays(value):
        a[...] = -1e6


def _values(stats: RunningStats) -> tuple:
    return stats.mean.tolist(), stats.variance.tolist(), stats.count, stats.num_batches, stats.version


def handed_out(api, name: str, rng) -> dict:
    """label -> what the call returned, for each call that hands out statistics of ``name``.

    After each call its result is overwritten, then the layer is read by
    another call: it must hold what the first call returned (and the
    overwritten arrays must not be that other call's).
    """
    layer = api.layer(name)
    x = rng.standard_normal((8, 4))
    moments = Moments.from_samples(x)
    calls = {
        "Layer.stats": layer.stats,
        "Layer.update": lambda: layer.update(moments),
        "update_many": lambda: api.update_many({name: moments})[name],
        "Layer.freeze": layer.freeze,
        "Layer.freeze (no change)": layer.freeze,
        "Layer.unfreeze": layer.unfreeze,
        "Layer.update with a request id": lambda: layer.update(moments, request_id="once"),
        "Layer.update, a retry": lambda: layer.update(moments, request_id="once"),
        "normalize, moments": lambda: layer.normalize(x, training=True, return_moments=True)[1],
        "Layer.reset": layer.reset,
    }
    out = {}
    for label, call in calls.items():
        value = call()
        other = layer.stats()  # another caller's view, read before the scribbling
        expected = _values(other)
        if isinstance(value, RunningStats):
            assert _values(value) == expected, label
        _scribble(value)
        assert _values(other) == expected, f"{label}: writing to the result changed another caller's arrays"
        assert _values(layer.stats()) == expected, f"{label}: writing to the result changed the store"
        out[label] = value
    return out


def assert_owned(value, label: str = "") -> None:
    """Every array of ``value`` is writable, and torch shares it without a warning."""
    torch = pytest.importorskip("torch")
    for a in arrays(value):
        assert a.flags.writeable, label
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tensor = torch.from_numpy(a)
        tensor += 1  # the caller's own array: torch may write it
