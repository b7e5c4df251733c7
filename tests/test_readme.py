"""The README's python examples run as written: the in-process ones, and the client
quickstart against a real in-process server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(section: str) -> str:
    """The first python block of the README's ``section``."""
    text = README.read_text()
    assert section in text, f"README.md has no {section!r} section"
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python block under {section!r}"
    return blocks[0]


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
