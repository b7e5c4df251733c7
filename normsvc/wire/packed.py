"""Many layers' moments and statistics in a few buffers (PackedMoments, PackedStats).

A training step pushes the moments of every BatchNorm layer of a model (53
for a ResNet-50) in one UpdateStats.  As one LayerMoments message per layer,
encoding, parsing and decoding cost a few microseconds of Python per tensor
on both sides, several times the transport of the same bytes.  The packed
form carries the names, the shapes and the sample counts as repeated
scalars and all layers' means and variances as one float64 tensor each, so
either side handles a step with a handful of numpy calls and one compiled
check, whatever the number of layers.  The answer comes back the same way.

Only moments with one sample count per layer pack (batch norm's, and every
op's output); :func:`packable` tells, and callers send the rest as
LayerMoments.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numba import njit

from .._proto import normsvc_pb2 as pb
from ..moments import Moments
from ..running import RunningStats
from .tensors import decode, tensor_error

__all__ = ["packable", "pack_moments", "unpack_moments", "pack_stats", "unpack_stats"]

#: The most axes one layer's statistics may have on the wire.
MAX_NDIM = 32
_RENORM = ("moving_stddev", "renorm_mean", "renorm_stddev")


def packable(updates: Mapping) -> bool:
    """Whether every value is a Moments with one sample count (what PackedMoments carries)."""
    return all(type(m) is Moments and m.count.ndim == 0 for m in updates.values())


def _put(array: np.ndarray, out: pb.Tensor) -> None:
    out.dtype = pb.DTYPE_FLOAT64
    out.shape[:] = (array.size,)
    out.data = array.tobytes()


def _concat(arrays) -> np.ndarray:
    """Arrays flattened and joined into one little-endian float64 array."""
    if not arrays:
        return np.empty(0, dtype="<f8")
    return np.concatenate([a.reshape(-1) for a in arrays]).astype("<f8", copy=False)


def _shape_fields(shapes, out) -> None:
    out.ndim[:] = [len(s) for s in shapes]
    out.dims[:] = [d for s in shapes for d in s]


def pack_moments(updates: Mapping[str, Moments], out: pb.PackedMoments) -> pb.PackedMoments:
    """``updates`` (all :func:`packable`) into a PackedMoments message."""
    moments = list(updates.values())
    out.layers[:] = list(updates)
    _shape_fields([m.mean.shape for m in moments], out)
    counts = [float(m.count) for m in moments]
    out.count[:] = counts
    _put(_concat([m.mean for m in moments]), out.mean)
    m2 = _concat([m.m2 for m in moments])
    per_value = np.repeat(np.array(counts), [m.mean.size for m in moments])
    # Moments.variance: m2 / count, 0 for an empty batch
    _put(np.divide(m2, per_value, out=np.zeros(m2.size), where=per_value > 0), out.variance)
    return out


def _shapes(ndim, dims, n: int, field: str) -> list[tuple]:
    """Each layer's shape from the ndim/dims fields, checked against ``n`` layers."""
    ndim, dims = list(ndim), list(dims)
    if len(ndim) != n:
        raise tensor_error(f"{field}.ndim", f"has {len(ndim)} entries: expected one per layer ({n})")
    if any(not 0 <= d <= MAX_NDIM for d in ndim):
        raise tensor_error(f"{field}.ndim", f"is {ndim}: expected ranks from 0 to {MAX_NDIM}")
    if len(dims) != sum(ndim):
        raise tensor_error(f"{field}.dims", f"has {len(dims)} entries: expected sum(ndim) = {sum(ndim)}")
    if dims and min(dims) < 0:
        raise tensor_error(f"{field}.dims", "has negative sizes: expected sizes >= 0")
    shapes, at = [], 0
    for d in ndim:
        shapes.append(tuple(dims[at:at + d]))
        at += d
    return shapes


@njit(cache=True, nogil=False)
def _valid_m2(sizes, counts, mean, variance, m2):  # pragma: no cover - compiled
    """m2 = variance * count, layer by layer; the index of the first layer whose count, means or
    variances are not finite or (counts, variances) negative, or -1 when all are fine."""
    at = 0
    for layer in range(sizes.size):
        c = counts[layer]
        if not 0.0 <= c < math.inf:
            return layer
        for i in range(at, at + sizes[layer]):
            v = variance[i]
            if not (math.isfinite(mean[i]) and 0.0 <= v < math.inf):
                return layer
            m2[i] = v * c
        at += sizes[layer]
    return -1


def unpack_moments(msg: pb.PackedMoments, *, field: str, max_elements: int | None = None) -> dict[str, Moments]:
    """Validated moments per layer from a PackedMoments message (their arrays are views of one
    buffer per field; read-only, as :func:`~normsvc.wire.tensors.decode_moments` hands out).

    Checks what :func:`~normsvc.wire.tensors.decode_moments` checks: finite
    means, counts and variances finite and >= 0, sizes that agree; errors
    name the field and the layer.
    """
    names = list(msg.layers)
    shapes = _shapes(msg.ndim, msg.dims, len(names), field)
    counts = np.array(msg.count, dtype=np.float64)
    if counts.size != len(names):
        raise tensor_error(f"{field}.count", f"has {counts.size} entries: expected one per layer ({len(names)})")
    sizes = [math.prod(s) for s in shapes]  # Python ints: huge dims fail the size check below, never overflow
    total = sum(sizes)
    arrays = {}
    for part in ("mean", "variance"):
        if not msg.HasField(part):
            raise tensor_error(f"{field}.{part}", "is missing: expected a tensor")
        a = decode(getattr(msg, part), field=f"{field}.{part}", max_elements=max_elements, finite=False)
        if a.shape != (total,):
            raise tensor_error(f"{field}.{part}", f"has shape {list(a.shape)}: expected [{total}], the "
                                                  "layers' statistics one after the other")
        arrays[part] = a if a.dtype == np.float64 else a.astype(np.float64)
    mean, variance = arrays["mean"], arrays["variance"]
    sizes = np.array(sizes, dtype=np.int64)  # each at most the tensors' checked length
    m2 = np.empty(total)
    bad = _valid_m2(sizes, counts, mean, variance, m2)
    if bad >= 0:
        _raise_invalid(names[bad], counts[bad], *(a[sizes[:bad].sum():][:sizes[bad]] for a in (mean, variance)),
                       field)
    out, at, checked = {}, 0, Moments._checked
    for name, shape, size, count in zip(names, shapes, sizes.tolist(), counts):
        end = at + size
        if len(shape) == 1:  # the usual case: a slice already has the shape
            out[name] = checked(count, mean[at:end], m2[at:end])
        else:
            out[name] = checked(count, mean[at:end].reshape(shape), m2[at:end].reshape(shape))
        at = end
    return out


def _raise_invalid(layer: str, count: float, mean: np.ndarray, variance: np.ndarray, field: str):
    if not 0.0 <= count < math.inf:
        raise tensor_error(f"{field}.count", f"is {count!r} for layer {layer!r}: expected a finite count >= 0")
    if not np.isfinite(mean).all():
        raise tensor_error(f"{field}.mean", f"has NaN or Inf values for layer {layer!r}: expected finite numbers")
    if not np.isfinite(variance).all():
        raise tensor_error(f"{field}.variance",
                           f"has NaN or Inf values for layer {layer!r}: expected finite numbers")
    raise tensor_error(f"{field}.variance", f"has negative entries for layer {layer!r}: expected variances >= 0")


def pack_stats(stats: Mapping[str, RunningStats], out: pb.PackedStats) -> pb.PackedStats:
    """The statistics of several layers (in the mapping's order) into a PackedStats message."""
    values = list(stats.values())
    out.layers[:] = list(stats)
    _shape_fields([s.mean.shape for s in values], out)
    _put(_concat([s.mean for s in values]), out.mean)
    _put(_concat([s.variance for s in values]), out.variance)
    out.count[:] = [float(s.count) for s in values]
    out.num_batches[:] = [int(s.num_batches) for s in values]
    out.version[:] = [int(s.version) for s in values]
    out.frozen[:] = [bool(s.frozen) for s in values]
    out.updated_at[:] = [float(s.updated_at) for s in values]
    out.run[:] = [s.run for s in values]
    out.last_step[:] = [-1 if s.last_step is None else int(s.last_step) for s in values]
    renorm = [s.renorm for s in values]
    if any(r is not None for r in renorm):
        out.renorm[:] = [r is not None for r in renorm]
        for i, name in enumerate(_RENORM):
            _put(_concat([r[i] for r in renorm if r is not None]), getattr(out, name))
    return out


def _floats(t: pb.Tensor, size: int, field: str) -> np.ndarray:
    """A writable float64 copy of a 1-D tensor of ``size`` values."""
    a = decode(t, field=field, finite=False)
    if a.shape != (size,):
        raise tensor_error(field, f"has shape {list(a.shape)}: expected [{size}]")
    return np.array(a, dtype=np.float64)


def unpack_stats(msg: pb.PackedStats) -> dict[str, RunningStats]:
    """Per layer :class:`RunningStats` from a PackedStats message (writable arrays the caller owns;
    each layer's are its own part of one buffer per field)."""
    names = list(msg.layers)
    n = len(names)
    shapes = _shapes(msg.ndim, msg.dims, n, "packed")
    sizes = [math.prod(s) for s in shapes]
    names_of = ("count", "num_batches", "version", "frozen", "updated_at", "run", "last_step", "renorm")
    columns = [list(getattr(msg, f)) for f in names_of]
    for field, column in zip(names_of, columns):
        if len(column) != n and not (field == "renorm" and not column):
            raise tensor_error(f"packed.{field}", f"has {len(column)} entries: expected one per layer ({n})")
    counts, num_batches, versions, frozen, updated_at, runs, last_steps, renorm = columns
    total = sum(sizes)
    mean, variance = _floats(msg.mean, total, "packed.mean"), _floats(msg.variance, total, "packed.variance")
    renorm = renorm or [False] * n  # unset: no layer has renorm
    renorm_total = sum(s for s, r in zip(sizes, renorm) if r)
    extra = [_floats(getattr(msg, f), renorm_total, f"packed.{f}") for f in _RENORM] if renorm_total else None
    out, at, extra_at = {}, 0, 0
    for i, name in enumerate(names):
        size, shape = sizes[i], shapes[i]
        s = object.__new__(RunningStats)  # what the dataclass's __init__ sets, without its per-field cost
        fields = {
            "mean": mean[at:at + size].reshape(shape), "variance": variance[at:at + size].reshape(shape),
            "count": counts[i], "num_batches": num_batches[i], "version": versions[i], "frozen": frozen[i],
            "updated_at": updated_at[i], "run": runs[i], "last_step": None if last_steps[i] < 0 else last_steps[i],
            "moving_stddev": None, "renorm_mean": None, "renorm_stddev": None,
        }
        if renorm[i]:
            for key, values in zip(_RENORM, extra):
                fields[key] = values[extra_at:extra_at + size].reshape(shape)
            extra_at += size
        s.__dict__.update(fields)
        out[name] = s
        at += size
    return out
