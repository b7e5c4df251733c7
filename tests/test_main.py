"""``python -m normsvc`` is the ``normsvc`` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _run(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["layers", "--help"], ["no-such-command"]])
def test_python_m_normsvc_is_the_normsvc_command(args):
    script = shutil.which("normsvc") or str(Path(sys.executable).with_name("normsvc"))
    module, command = _run([sys.executable, "-m", "normsvc", *args]), _run([script, *args])
    assert (module.returncode, module.stdout, module.stderr) == (command.returncode, command.stdout, command.stderr)
    assert module.stdout.startswith("usage: normsvc") or module.stderr.startswith("usage: normsvc")
