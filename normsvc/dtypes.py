"""The floating types normsvc computes on: float16, float32, float64 and bfloat16.

numpy has no bfloat16 of its own; ``ml_dtypes.bfloat16`` (the type JAX and
TensorFlow use) is numpy's bfloat16 here, imported on first use.  A
``torch.bfloat16`` tensor on the CPU is viewed as one without a copy
(:func:`host_view`), since ``numpy.asarray`` refuses it.  float16 and
bfloat16 are computed in float32 and come back in their own type.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

__all__ = ["bfloat16", "is_half", "is_float", "host_view", "NAMES"]

#: The types, in words (error messages).
NAMES = "float16, float32, float64 or bfloat16"


@functools.lru_cache(maxsize=1)
def bfloat16() -> np.dtype:
    """numpy's bfloat16 (``ml_dtypes.bfloat16``)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def is_half(dtype: np.dtype) -> bool:
    """float16 or bfloat16: computed in float32."""
    return dtype == np.float16 or dtype.name == "bfloat16"


def is_float(dtype: np.dtype) -> bool:
    """One of the four types (any byte order)."""
    return (dtype.kind == "f" and dtype.itemsize in (2, 4, 8)) or (dtype.name == "bfloat16" and dtype == bfloat16())


def host_view(x):
    """``x`` with a dtype numpy reads: a CPU ``torch.bfloat16`` tensor as an ml_dtypes bfloat16 array
    sharing its memory; anything else as it is."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return x.detach().contiguous().view(torch.int16).numpy().view(bfloat16())
    return x
