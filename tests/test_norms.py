"""normsvc.norms (the table of kinds) and ops.norm, the one entry by kind, against float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest

from normsvc import ops
from normsvc.errors import InvalidArgument
from normsvc.norms import KINDS, NORMS, norm
from normsvc.plan import plan_for
from normsvc._proto import normsvc_pb2 as pb
from reference import REFERENCES


def test_every_kind_has_a_wire_enum_and_a_named_op():
    assert KINDS == ("batch", "layer", "instance", "group", "rms")
    for kind in KINDS:
        assert pb.LayerKind.Value(f"LAYER_KIND_{kind.upper()}")
        assert callable(getattr(ops, f"{kind}_norm"))


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(InvalidArgument, match="kind='batchnorm': expected one of batch, layer") as info:
        norm("batchnorm")
    assert info.value.field == "kind"


@pytest.mark.parametrize("kind, shape, axis, groups", [
    ("batch", (4, 5, 6), -1, None),
    ("batch", (4, 6, 5), 1, None),
    ("layer", (4, 5, 6), [1, 2], None),
    ("rms", (4, 5, 6), -1, None),
    ("instance", (4, 6, 5), 1, None),
    ("group", (4, 5, 6), -1, 3),
])
def test_norm_by_kind_equals_the_reference(kind, shape, axis, groups, rng):
    x = rng.normal(3.0, 2.0, size=shape)
    kw = {"groups": groups} if groups else {}
    y, m = ops.norm(kind, x, axis=axis, epsilon=1e-3, **kw)
    ref = REFERENCES[kind](x, axis=axis, epsilon=1e-3, **kw)
    np.testing.assert_allclose(y, ref.y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(m.mean, ref.mean, rtol=1e-12)
    assert m.mean.shape == plan_for(shape, kind, _axes(axis, len(shape)), groups).stat_shape


def _axes(axis, ndim):
    return tuple(sorted(a % ndim for a in (axis if isinstance(axis, list) else [axis])))


def test_running_statistics_per_group_are_shared_by_every_sample(rng):
    # a group layer's running statistics have shape (G,): every sample uses them
    x = rng.normal(size=(3, 4, 6))
    mean, var = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, 4.0])
    y, m = ops.norm("group", x, axis=-1, groups=3, mean=mean, variance=var, epsilon=1e-3)
    assert m is None
    g = x.reshape(3, 4, 3, 2)
    want = ((g - mean[None, None, :, None]) / np.sqrt(var[None, None, :, None] + 1e-3)).reshape(x.shape)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


def test_rms_inference_uses_the_mean_square(rng):
    x = rng.normal(size=(5, 8))
    gamma = rng.normal(size=8)
    y, _ = ops.norm("rms", x, axis=-1, mean=0.5, variance=2.0, gamma=gamma, epsilon=1e-6)
    np.testing.assert_allclose(y, x / np.sqrt(2.0 + 0.25 + 1e-6) * gamma, rtol=1e-12)


def test_norm_refuses_arguments_the_kind_does_not_take(rng):
    x = rng.normal(size=(2, 4))
    with pytest.raises(InvalidArgument, match="groups=2 is only meaningful for group norm") as info:
        ops.norm("batch", x, groups=2)
    assert info.value.field == "groups"
    with pytest.raises(InvalidArgument, match="rms norm has no offset") as info:
        ops.norm("rms", x, beta=np.ones(4))
    assert info.value.field == "beta"


def test_declared_statistics_shapes():
    assert NORMS["layer"].declared_shape(-1, None) == ()
    assert NORMS["group"].declared_shape(-1, 8) == (8,)
    assert NORMS["group"].declared_shape(-1, -1) is None  # one group per channel: learned
    assert NORMS["batch"].declared_shape(-1, None) is None
    assert NORMS["batch"].stat_ndim((1, 3)) == 2 and NORMS["instance"].stat_ndim(1) == 1
