"""normsvc.testing: the server fixture users reuse, and the numpy moments reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from normsvc import Client, Unavailable
from normsvc.client import Retry
from normsvc.testing import reference_moments, running_server


def test_reference_moments_by_hand():
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    m = reference_moments(x, axes=0)
    assert float(m.count) == 3.0
    np.testing.assert_array_equal(m.mean, [3.0, 6.0])
    np.testing.assert_array_equal(m.m2, [8.0, 32.0])  # (4 + 0 + 4), (16 + 0 + 16)
    m = reference_moments(x, axes=[-1])
    assert float(m.count) == 2.0 and m.mean.shape == (3,)
    np.testing.assert_array_equal(m.variance, [0.25, 2.25, 6.25])


def test_running_server_serves_and_stops():
    with running_server() as server, Client(server.address) as client:
        layer = client.create_layer("bn", num_features=2)
        assert layer.update(reference_moments(np.ones((4, 2)), 0)).version == 1
    # stopped: nobody answers on that port any more
    with Client(server.address, timeout=5, retry=Retry(attempts=1)) as client:
        with pytest.raises(Unavailable):
            client.list_layers()


def test_pytest_plugin_fixtures_in_a_users_test_file(tmp_path):
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["normsvc.testing"]\n')
    (tmp_path / "test_user.py").write_text(textwrap.dedent("""
        import numpy as np
        from normsvc.testing import reference_moments

        def test_shared_stats(normsvc_client, normsvc_server):
            assert normsvc_server.address.startswith("127.0.0.1:")
            bn = normsvc_client.create_layer("bn", num_features=3, convention="torch", momentum=None)
            x = np.arange(12.0).reshape(4, 3)
            stats = bn.update(reference_moments(x, 0))
            np.testing.assert_allclose(stats.mean, x.mean(axis=0))
            np.testing.assert_allclose(stats.variance, x.var(axis=0, ddof=1))
    """))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
