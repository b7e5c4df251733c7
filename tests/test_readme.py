"""The README's python examples run as written: the in-process ones, and the client
quickstart against a real in-process server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(section: str, index: int = 0) -> str:
    """The python block number ``index`` (default the first) of the README's ``section``."""
    text = README.read_text()
    assert section in text, f"README.md has no {section!r} section"
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) > index, f"no python block {index} under {section!r}"
    return blocks[index]


def _run(code: str, cwd: Path, env=None, timeout=300) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_kernel_examples_run(tmp_path):
    _run(_block("## In-process kernels"), tmp_path)


def test_store_example_runs_and_prints_what_it_says(tmp_path):
    lines = _run(_block("## Running statistics"), tmp_path)
    assert lines == ["3 3 (16,)"]
    from safetensors.numpy import load_file

    names = set(load_file(tmp_path / "stats.safetensors"))
    assert {"model/bn1.running_mean", "model/bn1.running_var", "model/bn1.num_batches_tracked"} <= names


def test_renorm_example_runs_and_prints_what_it_says(tmp_path):
    # it continues the store example (its `store` and `np`)
    lines = _run(_block("## Running statistics") + _block("## Running statistics", 1), tmp_path)
    assert lines == ["3 3 (16,)", "(16,)"]


@pytest.mark.timeout(120)
def test_client_quickstart_runs_against_a_server(start_server, tmp_path):
    from normsvc.client import Client

    server = start_server()
    env = {**os.environ, "NORMSVC_TARGET": server.address}
    lines = _run(_block("## Serving and the client"), tmp_path, env=env, timeout=90)
    assert lines[0] == "1 (64,)"
    assert lines[1] == "(64,)"
    assert lines[2].startswith("no layer named 'resnet50/bn2'")
    with Client(server.address) as client:
        stats = client.layer("resnet50/bn1").stats()
    assert stats.version == 2 and stats.num_batches == 2  # the update and the allreduce step


def _torch_running(batches, momentum=0.1):
    """torch BatchNorm's running statistics in numpy: one update per batch, unbiased with its count."""
    mean, var = 0.0, 1.0
    for n, bm, bv in batches:
        mean, var = (1 - momentum) * mean + momentum * bm, (1 - momentum) * var + momentum * bv * n / (n - 1)
    return mean, var


def _keras_running(batches, momentum):
    mean, var = 0.0, 1.0
    for _, bm, bv in batches:
        mean, var = mean * momentum + bm * (1 - momentum), var * momentum + bv * (1 - momentum)
    return mean, var


def _concatenated_steps(make, world, steps, axes):
    """(count, mean, biased variance) of each step's concatenated batches, in numpy float64."""
    rngs = [np.random.default_rng(rank) for rank in range(world)]
    out = []
    for _ in range(steps):
        x = np.concatenate([make(rngs[rank], rank) for rank in range(world)]).astype(np.float64)
        out.append((x.size / x.shape[1], x.mean(axis=axes), x.var(axis=axes)))
    return out


@pytest.mark.timeout(180)
def test_data_parallel_step_contributions_example(start_server, tmp_path):
    """Four spawned worker processes push step contributions: one update per step, as one process would."""
    from normsvc.client import Client

    server = start_server(f"sqlite:///{tmp_path / 'stats.db'}")
    script = tmp_path / "dp_steps.py"
    script.write_text(_block("## Data-parallel training", 0))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=150,
                          env={**os.environ, "NORMSVC_TARGET": server.address})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True 9 10 5120.0"]
    make = lambda rng, rank: rng.normal(rank, 1.0 + rank, size=(8, 16, 4, 4)).astype(np.float32)
    mean, var = _torch_running(_concatenated_steps(make, 4, 10, (0, 2, 3)))
    with Client(server.address) as client:
        stats = client.layer("dp/bn1").stats()
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(stats.variance, var, rtol=1e-9)


@pytest.mark.timeout(120)
def test_data_parallel_allreduce_example(start_server, tmp_path):
    """Four ranks (threads) get the moments of all their batches; the running statistics take each step once."""
    from normsvc.client import Client

    server = start_server()
    lines = _run(_block("## Data-parallel training", 1), tmp_path, env={**os.environ, "NORMSVC_TARGET": server.address},
                 timeout=90)
    assert lines == ["2 3 192.0"]
    make = lambda rng, rank: rng.normal(rank, 1.0, size=(16, 32)).astype(np.float32)
    mean, var = _keras_running(_concatenated_steps(make, 4, 3, (0,)), 0.9)
    with Client(server.address) as client:
        stats = client.layer("sync/bn").stats()
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-9)
    np.testing.assert_allclose(stats.variance, var, rtol=1e-9)
