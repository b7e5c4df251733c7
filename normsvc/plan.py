"""The reduction plan: (shape, kind, axis, groups) -> one canonical 5-D view.

Every norm reduces some axes of ``x`` to per-group moments and then applies
``y = (x - mean) * rsqrt(var + eps) * gamma + beta``.  Each axis plays one of
four roles:

====  =================================  ======================
role  statistics vary along it            gamma/beta vary along it
====  =================================  ======================
A     yes                                no
C     yes                                yes
D     no (reduced)                       yes
R     no (reduced)                       no
====  =================================  ======================

After merging adjacent axes of the same role, any norm becomes a C-contiguous
view ``x[A, B, C, D, E]`` with statistics per ``(a, c)``, affine parameters per
``(c, d)``, reduced over ``b, d, e`` (R axes land in B or E).  Axis patterns
that do not fit that order are transposed once into it (the rare case).

====================================  =====  =====  ===  =====  =====
norm, layout                          A      B      C    D      E
====================================  =====  =====  ===  =====  =====
batch, channels-last (N,H,W,C)        1      N*H*W  C    1      1
batch, channels-first (N,C,H,W)       1      N      C    1      H*W
layer over last axis (M, K)           M      1      1    K      1
instance, channels-last               N      H*W    C    1      1
instance, channels-first              N      1      C    1      H*W
group G, channels-last                N      H*W    G    C/G    1
group G, channels-first               N      1      G    C/G    H*W
====================================  =====  =====  ===  =====  =====

Group norm first splits the channel axis into (G, C/G): a free reshape.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgument, InvalidType
from .norms import KINDS, norm

__all__ = ["Plan", "KINDS", "normalize_axes", "plan_for", "plan_for_moments", "plan_from_roles"]

MAX_RANK = 8

_SLOTS = {"A": (0,), "R": (1, 4), "C": (2,), "D": (3,)}
_CANONICAL = {"A": 0, "R": 1, "C": 2, "D": 3}


def _prod(values) -> int:
    return functools.reduce(operator.mul, values, 1)


def normalize_axes(axis, ndim: int, *, name: str = "axis") -> tuple[int, ...]:
    """Validate an int or a list of ints against a rank; return sorted non-negative axes."""
    items = [axis] if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) else axis
    try:
        items = list(items)
    except TypeError:
        raise InvalidType(f"{name} must be an int or a list of ints, got {axis!r}", field=name) from None
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise InvalidType(f"{name} must be an int or a list of ints, got {axis!r}", field=name)
        if not -ndim <= a < ndim:
            raise InvalidArgument(
                f"{name}={axis!r} is out of range for an input of rank {ndim}: "
                f"expected values in [{-ndim}, {ndim - 1}]",
                field=name,
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise InvalidArgument(f"{name}={axis!r} names the same axis twice for an input of rank {ndim}", field=name)
    return tuple(sorted(out))


@dataclass(frozen=True)
class Plan:
    """How one input shape maps onto the canonical view ``x[A, B, C, D, E]``.

    ``expanded`` is the input shape after any group split; ``perm`` the
    transpose (over expanded axes) that brings it into canonical order, or
    None; ``stat_axes`` and ``affine_axes`` are expanded-axis indices in
    canonical order (A then C, and C then D).
    """

    shape: tuple
    expanded: tuple
    perm: tuple | None
    view: tuple
    stat_axes: tuple
    affine_axes: tuple

    @functools.cached_property
    def count(self) -> int:
        """Elements reduced into each statistic group."""
        return self.view[1] * self.view[3] * self.view[4]

    @functools.cached_property
    def stat_shape(self) -> tuple:
        """Per-group statistics shape, in the input's axis order."""
        return tuple(self.expanded[i] for i in sorted(self.stat_axes))

    @functools.cached_property
    def _stats_in_order(self) -> bool:
        return list(self.stat_axes) == sorted(self.stat_axes)

    def to_view(self, x: np.ndarray) -> np.ndarray:
        """The C-contiguous 5-D view of ``x`` (a copy only when a transpose is needed)."""
        if self.perm is not None:
            x = np.ascontiguousarray(x.reshape(self.expanded).transpose(self.perm))
        else:
            x = np.ascontiguousarray(x)
        return x.reshape(self.view)

    def from_view(self, y: np.ndarray) -> np.ndarray:
        """Undo :meth:`to_view` for an output laid out like the view."""
        if self.perm is None:
            return y.reshape(self.shape)
        permuted = tuple(self.expanded[i] for i in self.perm)
        return y.reshape(permuted).transpose(np.argsort(self.perm)).reshape(self.shape)

    def stats_from_view(self, s: np.ndarray) -> np.ndarray:
        """Per-(a, c) statistics -> ``stat_shape`` in the input's axis order."""
        if self._stats_in_order:
            return s.reshape(self.stat_shape)
        s = s.reshape(tuple(self.expanded[i] for i in self.stat_axes))
        # not ascontiguousarray: it turns the 0-d stats of a full reduction into shape (1,)
        return np.asarray(s.transpose(np.argsort(self.stat_axes)), order="C")

    def table(self, values: np.ndarray, axes: tuple, rows: int, cols: int) -> np.ndarray:
        """Collapse ``values`` (broadcastable to ``expanded``) to a (rows, cols) table over ``axes``.

        Only the entries along ``axes`` are read (index 0 elsewhere), so a
        broadcast view of the full shape costs nothing.
        """
        v = np.broadcast_to(values, self.expanded)
        kept = sorted(axes)
        v = v[tuple(slice(None) if i in axes else 0 for i in range(len(self.expanded)))]
        if list(axes) != kept:
            v = v.transpose([kept.index(a) for a in axes])
        return np.ascontiguousarray(v, dtype=np.float64).reshape(rows, cols)

    def expand(self, values: np.ndarray, axes: tuple) -> np.ndarray:
        """Lay out an array over ``axes`` (input order, any split axis merged) to broadcast to ``expanded``."""
        shape = [1] * len(self.expanded)
        for a in axes:
            shape[a] = self.expanded[a]
        return values.reshape(shape)


def plan_from_roles(shape: tuple, stat: set, affine: set, *, split: tuple | None = None) -> Plan:
    """Build a plan from per-axis roles.

    ``stat`` and ``affine`` are sets of axis indices into ``shape`` (or into the
    expanded shape when ``split=(axis, groups)`` splits one axis in two).
    """
    shape = tuple(int(s) for s in shape)
    expanded = shape
    if split is not None:
        ch, g = split
        expanded = shape[:ch] + (g, shape[ch] // g) + shape[ch + 1 :]
    roles = []
    for i in range(len(expanded)):
        s, a = i in stat, i in affine
        roles.append("C" if s and a else "A" if s else "D" if a else "R")
    # Size-1 axes take no memory and can play any role: leave them out of the layout.
    live = [i for i in range(len(expanded)) if expanded[i] != 1]
    slots = _assign(roles, live)
    perm = None
    if slots is None:
        perm = tuple(sorted(range(len(expanded)), key=lambda i: (_CANONICAL[roles[i]], i)))
        slots = _assign([roles[i] for i in perm], [k for k, i in enumerate(perm) if expanded[i] != 1])
        order = perm
    else:
        order = tuple(range(len(expanded)))
    view = [1, 1, 1, 1, 1]
    for k, slot in slots.items():
        view[slot] *= expanded[order[k]]
    stat_axes = tuple(i for i in order if roles[i] == "A") + tuple(i for i in order if roles[i] == "C")
    affine_axes = tuple(i for i in order if roles[i] == "C") + tuple(i for i in order if roles[i] == "D")
    return Plan(shape, expanded, perm, tuple(view), stat_axes, affine_axes)


def _assign(roles: list, live: list) -> dict | None:
    """Greedy slot assignment of axes (in memory order) to A,B,C,D,E; None if impossible."""
    slots, pointer = {}, 0
    for k in live:
        slot = next((s for s in _SLOTS[roles[k]] if s >= pointer), None)
        if slot is None:
            return None
        slots[k] = pointer = slot
    return slots


@functools.lru_cache(maxsize=4096)
def plan_for(shape: tuple, kind: str, axis, groups: int | None = None) -> Plan:
    """The plan of a named norm (``axis`` already validated and non-negative).

    What ``axis`` means depends on the kind (see :mod:`normsvc.norms`);
    ``groups`` has already been resolved and validated.
    """
    stat, affine, split = norm(kind).roles(len(shape), tuple(axis), groups)
    return plan_from_roles(shape, stat, affine, split=split)


@functools.lru_cache(maxsize=4096)
def plan_for_moments(shape: tuple, axes: tuple) -> Plan:
    """The plan of :func:`normsvc.ops.moments`: reduce ``axes``, no affine parameters."""
    return plan_from_roles(shape, set(range(len(shape))) - set(axes), set())
