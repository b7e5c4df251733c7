"""SIGTERM with calls in flight, bounded: one round (scripts/reliability/sigterm.py runs three)."""

import collections
import threading

import numpy as np
from rel_util import quiet

from reliability import sigterm


def test_calls_accepted_before_sigterm_finish(tmp_path):
    [r] = sigterm.run(rounds=1, seconds=0.5, grace=3.0, folder=tmp_path, log=quiet)
    assert r.exit_code == 0 and r.exit_after < r.grace + 30
    assert r.acked == r.applied > 0  # every acknowledged update, and no update that was not acknowledged
    assert r.writer_errors["latest"] < r.grace / 2  # refused at the signal, not held and failed at the end
    assert r.allreduce_violations == [] and r.allreduce_ok_steps == r.allreduce_applied > 0
    assert r.stream == "OK"  # a NormalizeStream sending chunks across the signal
    assert set(r.watch_ends) == {"UNAVAILABLE"} and r.watch_disorder == 0
    assert r.lone_untouched  # a rank left waiting withdraws its moments
    assert r.accepted_then_failed == 0 and r.ok


def test_a_call_refused_by_a_server_shutting_down_is_retried_not_cancelled():
    from normsvc import Client, Moments
    from normsvc.server import serve

    seen = collections.Counter()
    for _ in range(8):  # about a quarter of the callers see CANCELLED per round: 8 rounds of 8 callers
        server = serve("memory://", port=0)
        try:
            with Client(server.address) as client:
                client.create_layer("bn", num_features=4)
            errors = collections.Counter()
            started = threading.Barrier(9, timeout=30)

            def caller():
                with Client(server.address, timeout=1.0) as client:
                    layer = client.layer("bn")
                    m = Moments(np.float64(4), np.zeros(4), np.ones(4))
                    started.wait()
                    for _ in range(100_000):
                        try:
                            layer.update(m)
                        except Exception as exc:  # noqa: BLE001 - counted by type
                            errors[type(exc).__name__] += 1
                            return

            threads = [threading.Thread(target=caller) for _ in range(8)]
            for t in threads:
                t.start()
            started.wait()
            threading.Event().wait(0.3)
            server.stop(grace=0.25)  # well inside the callers' 1 s deadline: a call the grace holds
            for t in threads:        # ends CANCELLED (and is retried), not at its own deadline
                t.join(30)
        finally:
            server.stop(grace=0)
        seen.update(errors)
        if seen["Cancelled"]:
            break
    assert set(seen) == {"Unavailable"}, dict(seen)  # the server went away: Unavailable after the retries
