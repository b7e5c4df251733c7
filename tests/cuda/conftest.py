"""tests/cuda: the CUDA kernels, run under the numba CUDA simulator in CI.

The simulator must be switched on before numba.cuda is first imported, so the
simulator tests run in a pytest process of their own:

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda

The main run (``python -m pytest``) does not even import test_cuda_sim.py
(numba.cuda would load without the simulator); it runs test_no_gpu.py, the
behaviour of a machine without a GPU, and test_launcher.py (both runs).  On a machine with a real GPU, set
NORMSVC_TEST_GPU=1 to run test_cuda_sim.py on the hardware instead.
"""

import os

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
GPU = os.environ.get("NORMSVC_TEST_GPU") == "1"

collect_ignore = []
if not (SIM or GPU):
    collect_ignore.append("test_cuda_sim.py")
if SIM or GPU:
    collect_ignore.append("test_no_gpu.py")
