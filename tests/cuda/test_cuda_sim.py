"""The CUDA kernels against the float64 references, under the numba CUDA simulator.

Run in its own process (see conftest.py):

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda

The simulator runs every thread as a Python thread, so shapes are tiny; the
simulator build of normsvc.kernels.cuda uses small blocks and thresholds
(TPB, PER, MAX_TEAM, BLOCK_ELEMS) so that these shapes still cross every
branch: several teams per block, multi-warp teams, groups split over several
blocks that meet through the float64 accumulators, tiles of columns.  The
simulator has no warp shuffles: the shuffle reductions are checked on the GPU
by bench/cuda.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import normsvc
from normsvc.errors import InvalidType
from normsvc.kernels import cuda as K
from reference import BFLOAT16, REFERENCES, assert_stats_close, assert_y_close, ref_moments, ref_normalize

pytestmark = pytest.mark.skipif(not normsvc.cuda_available(), reason="no CUDA GPU and no simulator")

DTYPES = (np.float16, np.float32, np.float64)

# (kind, layout) -> (shape, kwargs): channels-last and channels-first (layer/rms:
# the last axis, and a middle axis, which needs the one-transpose path).
CASES = {
    ("batch", "last"): ((3, 4, 5, 6), dict(axis=-1)),
    ("batch", "first"): ((3, 6, 4, 5), dict(axis=1)),
    ("layer", "last"): ((6, 40), dict(axis=-1)),
    ("layer", "first"): ((3, 7, 5), dict(axis=1)),
    ("instance", "last"): ((2, 4, 5, 6), dict(axis=-1)),
    ("instance", "first"): ((2, 6, 4, 5), dict(axis=1)),
    ("group", "last"): ((2, 4, 5, 8), dict(axis=-1, groups=4)),
    ("group", "first"): ((2, 8, 4, 5), dict(axis=1, groups=2)),
    ("rms", "last"): ((5, 33), dict(axis=-1)),
    ("rms", "first"): ((3, 7, 5), dict(axis=1)),
}


@pytest.fixture(autouse=True)
def _natural_path():
    K.FORCE_PATH = None
    yield
    K.FORCE_PATH = None


def _affine(kind, shape, kw, rng):
    ax = kw["axis"] % len(shape)
    n = shape[ax]
    out = {"gamma": rng.uniform(0.5, 1.5, n)}
    if kind != "rms":
        out["beta"] = rng.standard_normal(n)
    return out


def _call(kind, x, **kw):
    return getattr(normsvc, f"{kind}_norm")(x, **kw)


def _check(kind, x_host, y, m, kw, dtype):
    ref = REFERENCES[kind](x_host, **kw)
    assert isinstance(y, type(cuda.device_array(1))), type(y)
    assert y.shape == x_host.shape and y.dtype == np.dtype(dtype)
    assert_y_close(y.copy_to_host(), ref, dtype)
    assert isinstance(m.mean, np.ndarray) and isinstance(m.m2, np.ndarray)
    assert_stats_close(m.mean, m.variance, x_host, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind,layout", sorted(CASES))
def test_norm_matches_reference(kind, layout, dtype, rng):
    shape, kw = CASES[kind, layout]
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    kw = dict(kw, **_affine(kind, shape, kw, rng))
    y, m = _call(kind, cuda.to_device(x), **kw)
    _check(kind, x, y, m, kw, dtype)


# Shapes large enough (for the simulator build) that every launch plan splits
# groups over several blocks: rows -> Sb or Sf > 1, columns -> R > 1.
PATH_CASES = {
    "batch-last": ("batch", (8, 6, 6, 4), dict(axis=-1)),
    "batch-first": ("batch", (8, 4, 6, 6), dict(axis=1)),
    "layer-long": ("layer", (3, 600), dict(axis=-1)),
    "group-last": ("group", (2, 6, 6, 8), dict(axis=-1, groups=2)),
    "group-first": ("group", (2, 8, 6, 6), dict(axis=1, groups=4)),
    "instance-first": ("instance", (2, 3, 7, 9), dict(axis=1)),
}


@pytest.mark.parametrize("path", ["fused", "rows", "columns"])
@pytest.mark.parametrize("case", sorted(PATH_CASES))
def test_every_launch_plan(case, path, rng):
    """Each plan where it applies, twice: the finishing blocks must leave the scratch zeroed."""
    kind, shape, kw = PATH_CASES[case]
    K.FORCE_PATH = path
    kw = dict(kw, **_affine(kind, shape, kw, rng))
    for _ in range(2):
        x = (rng.standard_normal(shape) * 3 - 1).astype(np.float32)
        y, m = _call(kind, cuda.to_device(x), **kw)
        _check(kind, x, y, m, kw, np.float32)


@pytest.mark.parametrize("n", [20, 100, 250])
def test_fused_team_sizes(n, rng):
    """One warp, and multi-warp teams (two reductions stages), several teams per block."""
    K.FORCE_PATH = "fused"
    x = rng.standard_normal((5, n)).astype(np.float32)
    y, m = normsvc.layer_norm(cuda.to_device(x))
    _check("layer", x, y, m, dict(axis=-1), np.float32)


@pytest.mark.parametrize("path", [None, "rows", "columns"])
def test_large_mean_keeps_variance(path, rng):
    """|mean| = 1e4 * std in float32: variance to 1e-5 relative (shifted float64 sums)."""
    K.FORCE_PATH = path
    x = (1e4 + rng.standard_normal((64, 3))).astype(np.float32)
    y, m = normsvc.batch_norm(cuda.to_device(x), epsilon=0.0)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(m.variance, x64.var(axis=0), rtol=1e-5)
    np.testing.assert_allclose(m.mean, x64.mean(axis=0), rtol=1e-12)
    want = (x64 - x64.mean(axis=0)) / x64.std(axis=0)
    np.testing.assert_allclose(y.copy_to_host(), want, atol=2e-5)


@pytest.mark.parametrize("kind,layout", [("batch", "last"), ("group", "first"), ("layer", "first")])
def test_inference_mode(kind, layout, rng):
    shape, kw = CASES[kind, layout]
    x = rng.standard_normal(shape).astype(np.float32)
    stats = REFERENCES[kind](rng.standard_normal(shape), **kw)
    mean, variance = stats.mean, stats.variance
    kw = dict(kw, **_affine(kind, shape, kw, rng))
    y, m = _call(kind, cuda.to_device(x), mean=mean, variance=variance, **kw)
    assert m is None
    assert_y_close(y.copy_to_host(), REFERENCES[kind](x, mean=mean, variance=variance, **kw), np.float32)


def test_moments_op(rng):
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    m = normsvc.moments(cuda.to_device(x), [0, 2], keepdims=True)
    mu, var = ref_moments(x, [0, 2], keepdims=True)
    assert m.mean.dtype == np.float64 and m.mean.shape == (1, 5, 1)
    np.testing.assert_allclose(m.mean, mu, atol=1e-6)
    np.testing.assert_allclose(m.variance, var, atol=1e-6)


def test_normalize_op(rng):
    x = rng.standard_normal((4, 3, 5))
    mean, var = rng.standard_normal((3, 1)), rng.uniform(0.5, 2, (1, 5))
    scale, offset = rng.uniform(0.5, 2, 5), rng.standard_normal((4, 1, 1))
    y = normsvc.normalize(cuda.to_device(x), mean, var, scale=scale, offset=offset, epsilon=1e-3)
    ref = ref_normalize(x, mean, var, offset=offset, scale=scale, epsilon=1e-3)
    assert_y_close(y.copy_to_host(), ref, np.float64)


@pytest.mark.parametrize("kind", ["numba", "torch"])
def test_normalize_op_takes_statistics_on_the_device(rng, kind):
    if kind == "numba":
        dev = cuda.to_device
    else:  # a real GPU run (NORMSVC_TEST_GPU=1) with torch's CUDA build
        torch = pytest.importorskip("torch")
        if K.SIM or not torch.cuda.is_available():
            pytest.skip("needs torch with a CUDA device")
        dev = lambda a: torch.as_tensor(a, device="cuda")  # noqa: E731
    x = rng.standard_normal((4, 3, 5))
    mean, var = rng.standard_normal((3, 1)), rng.uniform(0.5, 2, (1, 5))
    scale, offset = rng.uniform(0.5, 2, 5), rng.standard_normal((4, 1, 1))
    y = normsvc.normalize(cuda.to_device(x), dev(mean), dev(var), scale=dev(scale), offset=dev(offset), epsilon=1e-3)
    ref = ref_normalize(x, mean, var, offset=offset, scale=scale, epsilon=1e-3)
    assert_y_close(y.copy_to_host(), ref, np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_host_array_on_device_cuda_returns_numpy(dtype, rng):
    x = rng.standard_normal((3, 8, 5)).astype(dtype)
    y, m = normsvc.group_norm(x, groups=4, axis=1, device="cuda")
    assert type(y) is np.ndarray and y.dtype == np.dtype(dtype)
    y_cpu, m_cpu = normsvc.group_norm(x, groups=4, axis=1, device="cpu")
    ref = REFERENCES["group"](x, groups=4, axis=1)
    assert_y_close(y, ref, dtype)
    np.testing.assert_allclose(m.mean, m_cpu.mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,layout", sorted(CASES))
def test_bfloat16_host_array_on_device_cuda(kind, layout, rng):
    """bfloat16 data reach the kernels as their uint16 bits: widened on load, rounded back on store."""
    shape, kw = CASES[kind, layout]
    x = (rng.standard_normal(shape) * 2 + 3).astype(BFLOAT16)
    kw = dict(kw, **_affine(kind, shape, kw, rng))
    y, m = _call(kind, x, device="cuda", **kw)
    assert type(y) is np.ndarray and y.dtype == BFLOAT16 and y.shape == shape
    ref = REFERENCES[kind](x.astype(np.float64), **kw)
    assert_y_close(y, ref, BFLOAT16)
    assert_stats_close(m.mean, m.variance, x, ref, BFLOAT16)
    y_cpu, _ = _call(kind, x, device="cpu", **kw)  # the CPU path: within one bfloat16 rounding of it
    np.testing.assert_allclose(y.astype(np.float64), y_cpu.astype(np.float64), rtol=8e-3, atol=8e-3)


def test_bfloat16_rounding_matches_ml_dtypes():
    """The kernels' float32 -> bfloat16 store rounds as ml_dtypes (and torch) do: to nearest, ties to
    even, overflow to inf, NaN kept; and the load widens exactly."""
    from normsvc.kernels.cuda import group

    _, store = group.codec(np.float32, True)

    @cuda.jit
    def roundtrip(x, bits, back):
        i = cuda.grid(1)
        if i < x.size:
            store(bits, i, x[i])
            back[i] = group._bf16_to_float(bits[i])

    rng = np.random.default_rng(7)
    ties = (np.arange(-64, 64, dtype=np.int64).astype(np.uint32) << 16) | 0x8000  # exactly halfway
    specials = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40, -1e-40,
                         np.finfo(np.float32).max, np.finfo(np.float32).tiny], np.float32)
    x = np.concatenate([specials, ties.view(np.float32), (rng.standard_normal(500) * 10.0 ** rng.integers(
        -30, 30, 500)).astype(np.float32), rng.integers(0, 2**32, 300, dtype=np.uint64).astype(np.uint32).view(
        np.float32)])
    bits = cuda.device_array(x.size, np.uint16)
    back = cuda.device_array(x.size, np.float32)
    roundtrip[-(-x.size // 64), 64](cuda.to_device(x), bits, back)
    want = x.astype(BFLOAT16)
    got = bits.copy_to_host().view(BFLOAT16)
    nan = np.isnan(want.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
    np.testing.assert_array_equal(back.copy_to_host()[~nan], want.astype(np.float32)[~nan])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bfloat16_torch_tensor_in_and_out(layout, rng):
    """A torch bfloat16 CUDA tensor (array interface "<V2") comes back as one, written in place of a
    fresh tensor; a real GPU run (NORMSVC_TEST_GPU=1) only."""
    torch = pytest.importorskip("torch")
    if K.SIM or not torch.cuda.is_available():
        pytest.skip("needs torch with a CUDA device")
    xh = (rng.standard_normal((4, 6, 5, 3)) * 2 + 3).astype(np.float32)
    x = torch.as_tensor(xh, device="cuda").to(torch.bfloat16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    gamma, beta = rng.uniform(0.5, 1.5, 6), rng.standard_normal(6)
    y, m = normsvc.batch_norm(x, axis=1, gamma=gamma, beta=beta)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.device == x.device
    x64 = x.float().cpu().numpy().astype(np.float64)
    ref = REFERENCES["batch"](x64, axis=1, gamma=gamma, beta=beta)
    assert_y_close(y.float().cpu().numpy(), ref, BFLOAT16)
    assert_stats_close(m.mean, m.variance, x64, ref, BFLOAT16)


def test_bfloat16_array_of_a_foreign_type_is_refused(rng):
    """A bfloat16 CUDA array ("<V2") of a type that is neither torch's nor CuPy's cannot come back as its own
    type: refused with InvalidType naming x, and nothing written; a real GPU run (NORMSVC_TEST_GPU=1) only
    (the simulator has no foreign CUDA arrays)."""
    if K.SIM:
        pytest.skip("the simulator has no __cuda_array_interface__ inputs")
    bits = (rng.standard_normal((4, 6)) + 3).astype(BFLOAT16).view(np.uint16)
    d = cuda.to_device(bits)

    class Foreign:  # a third-party CUDA array: bfloat16 data behind the array interface
        def __init__(self, arr):
            self.arr = arr
            self.__cuda_array_interface__ = dict(arr.__cuda_array_interface__, typestr="<V2")

    with pytest.raises(InvalidType, match=r"x is a bfloat16 CUDA array of type Foreign: expected a torch or "
                                          r"CuPy array") as err:
        normsvc.batch_norm(Foreign(d), axis=1)
    assert err.value.field == "x"
    np.testing.assert_array_equal(d.copy_to_host(), bits)


@pytest.mark.parametrize("layout", ["fortran", "strided", "transposed"])
def test_non_contiguous_device_input(layout, rng):
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    if layout == "fortran":
        d = cuda.to_device(np.asfortranarray(x))
    elif layout == "strided":
        d = cuda.to_device(np.zeros((12, 4, 10), np.float32))
        d[::2, :, ::2] = x
        d = d[::2, :, ::2]
    else:
        base = cuda.to_device(np.ascontiguousarray(x.transpose(2, 0, 1)))
        if K.SIM:
            d = base.transpose((1, 2, 0))
        else:  # numba-cuda's DeviceNDArray.transpose takes 2-D arrays only: the same view, built directly
            from numba.cuda.cudadrv.devicearray import DeviceNDArray

            st = base.strides
            d = DeviceNDArray(x.shape, (st[1], st[2], st[0]), base.dtype, gpu_data=base.gpu_data)
    assert not d.is_c_contiguous()
    y, m = normsvc.instance_norm(d, axis=1)
    _check("instance", x, y, m, dict(axis=1), np.float32)


def test_device_gamma_and_beta(rng):
    x = rng.standard_normal((5, 6)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 6), rng.standard_normal(6)
    y, m = normsvc.layer_norm(cuda.to_device(x), gamma=cuda.to_device(gamma), beta=cuda.to_device(beta))
    _check("layer", x, y, m, dict(axis=-1, gamma=gamma, beta=beta), np.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_epsilon_zero_constant_group_matches_cpu():
    x = np.ones((3, 4), np.float32)
    y, m = normsvc.layer_norm(cuda.to_device(x), epsilon=0.0)
    y_cpu, _ = normsvc.layer_norm(x, epsilon=0.0)
    np.testing.assert_array_equal(np.isnan(y.copy_to_host()), np.isnan(y_cpu))
    np.testing.assert_array_equal(m.variance, 0.0)


def test_errors():
    d = cuda.to_device(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="device='cpu'"):
        normsvc.batch_norm(d, device="cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        normsvc.batch_norm(d, device="tpu")
    with pytest.raises(TypeError, match="dtype int32"):
        normsvc.batch_norm(cuda.to_device(np.ones((2, 3), np.int32)))
    with pytest.raises(ValueError, match="groups=2 does not divide"):
        normsvc.group_norm(cuda.to_device(np.ones((2, 3), np.float32)), groups=2)
