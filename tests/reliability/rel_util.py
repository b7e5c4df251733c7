"""The reliability tests run bounded versions of scripts/reliability/ (the scripts hold the workloads).

Importing this module makes the ``reliability`` package (scripts/reliability)
importable; the tests call each script's ``run(...)`` with small sizes and
check the figures the full runs in docs/reliability.md report.
"""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = str(Path(__file__).resolve().parents[2] / "scripts")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)


def quiet(*args, **kwargs) -> None:
    """The scripts' progress lines, dropped."""
