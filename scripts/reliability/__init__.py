"""Reliability evidence for normsvc: one script a workload, each printing a table.

Run them from the repository root with the project installed:

    python scripts/reliability/crash.py --rounds 10     # kill -9 while clients push; restart; check
    python scripts/reliability/load.py --seconds 60     # 64 concurrent clients, exact counts, latency
    python scripts/reliability/fuzz.py --rounds 1000    # hypothesis + mutated bytes on every RPC
    python scripts/reliability/auth.py                  # every RPC x every wrong credential; TLS, mTLS
    python scripts/reliability/sigterm.py --rounds 3    # SIGTERM with calls in flight

Each script has a ``run(...)`` function that returns its figures (the bounded
tests in tests/reliability call it with small sizes) and a ``main()`` that
prints them.  docs/reliability.md records the latest full runs.
"""
