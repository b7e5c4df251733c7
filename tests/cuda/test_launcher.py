"""_Launcher's direct-launch path, against a stand-in for numba-cuda's dispatcher.

The real path needs a GPU (bench/cuda.py calls every op twice to cover it
there); this checks the plumbing everywhere: the first launch per key goes
through the dispatcher, later ones call the compiled kernel with the stream
object the dispatcher's launch configuration made (numba-cuda 0.30 launches
through cuda.core, which refuses the integer 0), and anything the stand-in
cannot find keeps the dispatcher path.
"""

import pytest

from normsvc.kernels import cuda as kc


class Dispatcher:
    """What _Launcher uses of numba-cuda's CUDADispatcher: [grid, block], typeof_pyval, overloads."""

    def __init__(self, log, compiled=True):
        self.log = log
        self.overloads = {}
        self.compiled = compiled

    def typeof_pyval(self, value):
        return type(value).__name__

    def __getitem__(self, dims):
        grid, block = dims
        log, dispatcher = self.log, self

        class Configured:
            stream = object()  # numba-cuda converts the default stream 0 into a stream object

            def __call__(self, *args):
                log.append(("dispatcher", grid, block, args, self.stream))
                if dispatcher.compiled:
                    dispatcher.overloads[tuple(dispatcher.typeof_pyval(a) for a in args)] = Kernel(log)

        return Configured()


class Kernel:
    def __init__(self, log):
        self.log = log

    def launch(self, args, grid, block, stream, sharedmem):
        self.log.append(("direct", grid, block, args, stream, sharedmem))


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(kc, "FAST_LAUNCH", True)


def test_first_launch_dispatches_then_later_ones_go_direct_with_the_dispatchers_stream(fast):
    log = []
    launch = kc._Launcher(Dispatcher(log))
    launch("f", (4, 1, 1), (256, 1, 1), 1.5, 7)
    launch("f", (8, 2, 1), (256, 1, 1), 2.5, 9)
    launch("f", (1, 1, 1), (64, 1, 1), 3.5, 1)
    assert [e[0] for e in log] == ["dispatcher", "direct", "direct"]
    stream = log[0][4]
    assert stream is not None and not isinstance(stream, int)
    assert log[1] == ("direct", (8, 2, 1), (256, 1, 1), (2.5, 9), stream, 0)
    assert log[2][1:4] == ((1, 1, 1), (64, 1, 1), (3.5, 1))


def test_each_key_compiles_through_the_dispatcher_once(fast):
    log = []
    launch = kc._Launcher(Dispatcher(log))
    for key in ("f", "d", "f", "d"):
        launch(key, (1, 1, 1), (32, 1, 1), 1.0)
    assert [e[0] for e in log] == ["dispatcher", "dispatcher", "direct", "direct"]


def test_without_a_found_overload_or_with_fast_launch_off_every_launch_dispatches(monkeypatch):
    log = []
    monkeypatch.setattr(kc, "FAST_LAUNCH", True)
    launch = kc._Launcher(Dispatcher(log, compiled=False))
    for _ in range(3):
        launch("f", (1, 1, 1), (32, 1, 1), 1.0)
    monkeypatch.setattr(kc, "FAST_LAUNCH", False)
    off = kc._Launcher(Dispatcher(log))
    for _ in range(3):
        off("f", (1, 1, 1), (32, 1, 1), 1.0)
    assert [e[0] for e in log] == ["dispatcher"] * 6
