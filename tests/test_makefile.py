"""The Makefile keeps its promises: every .PHONY name has a rule."""

from __future__ import annotations

import re
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def test_every_phony_target_has_a_rule():
    text = MAKEFILE.read_text()
    phony = re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split()
    rules = set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))
    assert phony and not set(phony) - rules, f"no rule for {sorted(set(phony) - rules)}"
    assert {"test", "serve", "bench", "proto", "golden"} <= set(phony)
