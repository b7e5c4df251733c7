"""Shared fixtures for the whole suite (keep this file small).

``tests/`` goes on sys.path so test modules can ``import reference`` (the
float64 numpy references) without package ``__init__`` files.
"""

import pathlib
import sys
import zlib

import numpy as np
import pytest

_TESTS = str(pathlib.Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy Generator seeded from the test id: reproducible, different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
