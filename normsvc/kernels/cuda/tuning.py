"""Block sizes and thresholds of the kernels and their launch plans.

The GPU build uses the values that suit an H100.  The simulator runs every
thread as a Python thread, so its build uses small blocks and thresholds that
let the tiny shapes of tests/cuda still cross every branch: several teams per
block, multi-warp teams, groups split over several blocks, tiles of columns.

Kernels read these as compile-time constants (numba freezes globals), so they
are fixed at import; the switches that may change at run time (FORCE_PATH,
FAST_LAUNCH) live on the package instead.
"""

from __future__ import annotations

import os

from numba.core import config

#: Running under the numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
SIM = bool(config.ENABLE_CUDASIM)
#: The simulator has no warp shuffles: reductions there go through shared memory
#: (NORMSVC_CUDA_SHUFFLE=0 selects that path on a GPU too, to check it there).
SHUFFLE = not SIM and os.environ.get("NORMSVC_CUDA_SHUFFLE", "1") != "0"
#: Threads per block of the rows/columns kernels (a power of two).
TPB = 64 if SIM else 256
#: Values per thread held in registers by the fused kernel.
PER = 4 if SIM else 16
#: Most threads per group in the fused kernel (a power of two, >= 32).
MAX_TEAM = 64 if SIM else 512
#: Fused blocks hold at least this many threads (several teams when groups are small).
FUSED_BLOCK = 64 if SIM else 256
#: Runs shorter than this are read column-wise (the channels-last layouts).
MIN_RUN = 32
#: Elements each block of the rows/columns kernels aims to cover.
BLOCK_ELEMS = TPB * 4 if SIM else TPB * 32
#: Blocks the row chunks of one column tile are spread over, at most.
MAX_ROW_CHUNKS = 8 if SIM else 1024

#: Threads in any block we launch (sizes the shared-memory reductions).
MAX_BLOCK = max(TPB, MAX_TEAM, FUSED_BLOCK)
#: Warps in the largest block.
MAX_WARPS = MAX_BLOCK // 32
#: CUDA's limit on gridDim.y.
MAX_GRID_Y = 65535
#: Every lane of a warp takes part in the shuffles.
FULL_MASK = 0xFFFFFFFF
