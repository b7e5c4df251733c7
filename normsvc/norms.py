"""The norm kinds, in one table: what ``axis`` means, which axes reduce, the affine layout, the wording.

Every layer of the house reads this table (the plan, the ops, the layer
config, the store's validation of pushed moments, the wire's enum), so adding
a kind touches this file and the proto's ``LayerKind`` enum.

A norm reduces x to moments per statistic group, then applies
``y = (x - mean) * rsqrt(var + eps) * gamma + beta`` (rms: no centering, no
beta).  What differs between kinds is only which axes the statistics keep
and which the affine parameters span:

==========  =============================  ====================  =================
kind        ``axis`` names                 statistics per        gamma/beta per
==========  =============================  ====================  =================
batch       the kept feature axes          feature               feature
layer       the normalized axes            other axes' position  normalized element
rms         the normalized axes            other axes' position  normalized element
instance    the channel axis (0 = batch)   sample and channel    channel
group       the channel axis (0 = batch)   sample and group      channel
==========  =============================  ====================  =================

Running statistics average away the *sample axes* of a batch's moments (the
leading ``sample_ndim`` axes: the batch axis of instance/group norm, every
position of layer/rms norm) and keep the rest.

Examples
--------
>>> NORMS["group"].roles(4, (1,), 8)
({0, 1}, {1, 2}, (1, 8))
>>> NORMS["layer"].stat_ndim(-1), NORMS["batch"].stat_ndim((1, 3))
(0, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidArgument

__all__ = ["Norm", "NORMS", "KINDS", "norm", "DEFAULT_GROUPS"]

#: Keras' GroupNormalization default.
DEFAULT_GROUPS = 32


@dataclass(frozen=True)
class Norm:
    """One kind of normalization.

    Attributes
    ----------
    kind : str
        Its name (the ``kind`` argument everywhere, ``LAYER_KIND_<KIND>`` on the wire).
    axis_role : {"features", "normalized", "channel"}
        What ``axis`` names: the kept feature axes (int or list), the
        normalized axes (int or list), or the one channel axis (an int, with
        axis 0 the batch axis).
    centered : bool
        Whether the mean is subtracted (and a beta added); False for rms.
    grouped : bool
        Whether the kind takes ``groups`` (group norm).
    sample_ndim : int or None
        Leading axes of the batch moments that running statistics average
        away; None: all of them (one running value for the whole layer).
    affine : str
        What gamma and beta hold, for messages; ``{axes}`` is filled in.
    moments : str
        What the moments of one batch look like, for messages.
    """

    kind: str
    axis_role: str
    centered: bool
    grouped: bool
    sample_ndim: int | None
    affine: str
    moments: str

    def roles(self, ndim: int, axes: tuple, groups: int | None = None):
        """``(stat axes, affine axes, split)`` of :func:`normsvc.plan.plan_from_roles`.

        ``axes`` are validated non-negative axes; ``groups`` is resolved.
        """
        axes = set(axes)
        if self.axis_role == "features":
            return axes, axes, None
        if self.axis_role == "normalized":
            return set(range(ndim)) - axes, axes, None
        (ch,) = axes
        if self.grouped:
            return {0, ch}, {ch, ch + 1}, (ch, groups)
        return {0, ch}, {ch}, None

    def stat_ndim(self, axis) -> int:
        """Rank of the running statistics of a layer with this ``axis``."""
        if self.axis_role == "features":
            return len(axis) if isinstance(axis, (tuple, list)) else 1
        return 0 if self.sample_ndim is None else 1

    def declared_shape(self, axis, groups: int | None) -> tuple | None:
        """The running statistics' shape known from the config alone, or None (learned from data)."""
        if self.sample_ndim is None:
            return ()
        if self.grouped and groups not in (None, -1):
            return (groups,)
        return None


NORMS = {
    n.kind: n
    for n in (
        Norm("batch", "features", True, False, 0,
             "one value per feature along axis {axes}",
             "one value per feature (the kept axes)"),
        Norm("layer", "normalized", True, False, None,
             "one value per element of the normalized axes {axes}",
             "any non-empty shape (per position, as ops.layer_norm returns)"),
        Norm("instance", "channel", True, False, 1,
             "one value per channel along axis {axes}",
             "shape (N, C): per sample and channel, as ops.instance_norm returns"),
        Norm("group", "channel", True, True, 1,
             "one value per channel along axis {axes}",
             "shape (N, G): per sample and group, as ops.group_norm returns"),
        Norm("rms", "normalized", False, False, None,
             "one value per element of the normalized axes {axes}",
             "any non-empty shape (per position, as ops.rms_norm returns)"),
    )
}
#: The kinds, in the order of the proto's LayerKind enum.
KINDS = tuple(NORMS)


def norm(kind) -> Norm:
    """The table entry of ``kind``, or InvalidArgument naming the kinds there are."""
    entry = NORMS.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise InvalidArgument(f"kind={kind!r}: expected one of {', '.join(KINDS)}", field="kind")
    return entry
