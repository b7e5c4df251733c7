"""Many writers on one layer: threads on every backend, processes on one sqlite file.

Counts, batch counts and versions must come out exact: no update lost, none
applied twice.  Child processes start with ``sys.executable`` (never fork:
numba's threading layers are not fork-safe).
"""

import subprocess
import sys
import textwrap
import threading

import numpy as np

from normsvc import Moments, Store

THREADS, PER_THREAD = 8, 500


def _unit_batch(c=16):
    return Moments(4.0, np.ones(c), np.full(c, 4.0))


def test_threads_on_one_layer(store):
    layer = store.create_layer("bn", momentum=0.5)
    m = _unit_batch()
    errors = []
    start = threading.Barrier(THREADS)

    def work():
        try:
            start.wait()
            for _ in range(PER_THREAD):
                layer.update(m)
        except BaseException as exc:  # reported below: a thread's exception would vanish otherwise
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = layer.stats()
    n = THREADS * PER_THREAD
    assert (s.count, s.num_batches, s.version) == (4.0 * n, n, n)
    np.testing.assert_allclose(s.mean, np.ones(16))


def test_threads_with_update_many_and_retries(store):
    names = ["a", "b", "c"]
    for n in names:
        store.create_layer(n, convention="cumulative")
    errors = []

    def work(k):
        try:
            for i in range(100):
                rid = f"{k}-{i}"
                store.update_many({n: _unit_batch(4) for n in names}, request_id=rid)
                store.update_many({n: _unit_batch(4) for n in names}, request_id=rid)  # a retry
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for n in names:
        s = store.layer(n).stats()
        assert (s.count, s.num_batches, s.version) == (1600.0, 400, 400)


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from normsvc import Moments, Store

    url, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store.open(url)
    layer = store.layer("bn")
    m = Moments(4.0, np.ones(16), np.full(16, 4.0))
    for i in range(n):
        layer.update(m, request_id=f"{tag}-{i}")
        if i % 50 == 0:  # and retries, which must not count
            layer.update(m, request_id=f"{tag}-{i}")
    store.close()
""")


def test_two_processes_on_one_sqlite_file(sqlite_url):
    with Store.open(sqlite_url) as store:
        store.create_layer("bn", convention="cumulative")
    per_process = 500
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, sqlite_url, tag, str(per_process)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for tag in ("p0", "p1")
    ]
    # and this process writes from two threads for as long as the children run
    local_updates = [0, 0]
    with Store.open(sqlite_url) as store:
        layer = store.layer("bn")

        def local(k):
            while any(p.poll() is None for p in procs) or local_updates[k] < 20:
                layer.update(_unit_batch(), request_id=f"local{k}-{local_updates[k]}")
                local_updates[k] += 1

        threads = [threading.Thread(target=local, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
        for t in threads:
            t.join()
        s = layer.stats()
    n = 2 * per_process + sum(local_updates)
    assert (s.count, s.num_batches, s.version) == (4.0 * n, n, n)
    np.testing.assert_allclose(s.variance, np.ones(16))
