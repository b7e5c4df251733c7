"""Without a GPU: importing normsvc costs nothing extra, the CPU path works, device='cuda' fails clearly."""

import subprocess
import sys

import numpy as np
import pytest

import normsvc


def test_import_does_not_load_numba_cuda():
    code = (
        "import sys, numpy as np, normsvc\n"
        "normsvc.batch_norm(np.ones((4, 3), np.float32))\n"
        "normsvc.batch_norm(np.ones((4, 3), np.float32), device='cpu')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('numba.cuda', 'numba_cuda')))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_device_is_a_value_error():
    with pytest.raises(ValueError, match="device='gpu': expected 'auto', 'cpu' or 'cuda'"):
        normsvc.layer_norm(np.ones((2, 3)), device="gpu")
    with pytest.raises(ValueError, match="device="):
        normsvc.moments(np.ones((2, 3)), 0, device=None)


def test_device_cpu_is_the_default_path():
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    y_auto, m_auto = normsvc.batch_norm(x)
    y_cpu, m_cpu = normsvc.batch_norm(x, device="cpu")
    np.testing.assert_array_equal(y_auto, y_cpu)
    np.testing.assert_array_equal(m_auto.mean, m_cpu.mean)


def test_device_cuda_without_gpu_raises_runtime_error():
    if normsvc.cuda_available():
        pytest.skip("this machine has a usable GPU")
    with pytest.raises(RuntimeError, match="device='cuda' needs a usable CUDA GPU"):
        normsvc.batch_norm(np.ones((4, 3), np.float32), device="cuda")
    with pytest.raises(RuntimeError, match="needs a usable CUDA GPU"):
        normsvc.moments(np.ones((4, 3)), 0, device="cuda")
