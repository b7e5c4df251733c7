"""`normsvc precompile` fills numba's disk cache with everything a server then needs."""

import os
import subprocess
import sys
import textwrap

# A server process over the precompiled cache: the first requests (tests/first_requests.py) through a
# real gRPC server and client (sqlite store), then every jitted function's cache statistics.
SERVER_WORK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from first_requests import make_first_requests
    from normsvc import Client
    from normsvc.server import serve
    from normsvc.kernels import cpu
    from normsvc import running
    from normsvc.wire import tensors as tensor_codec, packed
    from normsvc.store import steps, validation
    from numba.core.registry import CPUDispatcher

    server = serve("sqlite:///" + {db!r}, host="127.0.0.1", port=0)
    try:
        with Client(server.address) as client:
            make_first_requests(client)
    finally:
        server.stop(0)
    hits = misses = 0
    for module in (cpu, running, tensor_codec, packed, steps, validation):
        for name, f in vars(module).items():
            if isinstance(f, CPUDispatcher):
                misses += sum(f.stats.cache_misses.values())
                hits += sum(f.stats.cache_hits.values())
                if f.stats.cache_misses:
                    print("compiled", name, dict(f.stats.cache_misses))
    print("hits", hits, "misses", misses)
    """
)


def test_a_server_after_precompile_compiles_nothing(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "normsvc.cli", "precompile"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled in" in done.stdout and str(tmp_path / "cache") in done.stdout
    work = SERVER_WORK.format(db=str(tmp_path / "stats.db"), tests=os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", work], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1].split()
    hits, misses = int(last[1]), int(last[3])
    assert misses == 0, run.stdout
    assert hits >= 5, run.stdout  # the kernels, the update fold and the moments check came from the cache
