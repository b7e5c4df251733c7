"""Launching a compiled kernel with as little Python work per call as numba allows."""

from __future__ import annotations

import sys

# FAST_LAUNCH is a switch on the package (tests and bench/cuda.py flip it
# there), so it is read from the package at each first launch, not imported.
_package = sys.modules[__package__]


class Launcher:
    """Launch a kernel with little Python work once it is compiled for a key.

    The first launch for a key goes through the numba dispatcher (typing and
    compiling); later ones call the compiled kernel's ``launch`` directly,
    skipping argument typing and overload lookup, with the arguments the
    dispatcher passes it: the same 3-D grid and block, and the stream object
    the launch configuration made of the default stream (numba-cuda 0.30
    launches through cuda.core, which takes a Stream, not the integer 0).
    The caller's key must determine every argument type (here: the input
    dtype and the rank of the gather's shape tuples; all arrays are 1-D and
    C-contiguous).
    """

    __slots__ = ("dispatcher", "compiled")

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self.compiled = {}  # key -> (compiled kernel, stream)

    def __call__(self, key, grid, block, *args):
        hit = self.compiled.get(key)
        if hit is not None:
            hit[0].launch(args, grid, block, hit[1], 0)
            return
        configured = self.dispatcher[grid, block]
        configured(*args)
        if _package.FAST_LAUNCH:
            try:
                types = tuple(self.dispatcher.typeof_pyval(a) for a in args)
                kernel = self.dispatcher.overloads.get(types)
                stream = configured.stream
            except Exception:  # an internal API changed: keep the dispatcher path
                kernel = None
            if kernel is not None and hasattr(kernel, "launch"):
                self.compiled[key] = (kernel, stream)


def grid(x: int, y: int = 1) -> tuple:
    """A 3-D grid or block shape, as the dispatcher and ``launch`` both take it."""
    return (int(x), int(y), 1)
