"""The README's client quickstart runs, verbatim, against a live server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from normsvc.client import Client

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Serving and the client"

pytestmark = pytest.mark.timeout(120)


def quickstart() -> str:
    """The first python block of the README's client section."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no python block under {SECTION!r}"
    return blocks[0]


def test_readme_quickstart_runs_against_a_server(server):
    code = quickstart()
    env = {**os.environ, "NORMSVC_TARGET": server.address}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "1 (64,)"
    assert lines[1] == "(64,)"
    assert lines[2].startswith("no layer named 'resnet50/bn2'")
    with Client(server.address) as client:
        stats = client.layer("resnet50/bn1").stats()
    assert stats.version == 2 and stats.num_batches == 2  # the update and the allreduce step
