"""The README's in-process examples run as written (the client one: tests/client/test_readme.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(section: str) -> str:
    text = README.read_text()
    assert section in text, f"README.md has no {section!r} section"
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python block under {section!r}"
    return blocks[0]


def _run(code: str, cwd: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
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
