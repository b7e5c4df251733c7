"""Load, bounded: 16 clients for 5 s with WatchLayer streams (scripts/reliability/load.py runs 64 for 60 s)."""

from rel_util import quiet

from reliability import load


def test_concurrent_clients_get_no_errors_and_exact_counts(tmp_path):
    result = load.run(seconds=5, clients=16, watchers=2, processes=2, seed=1, folder=tmp_path, log=quiet)
    assert result.errors == {}, result.error_samples
    assert result.count_mismatches == []
    assert result.updates > 0 and result.calls > result.updates
    for watch in result.watch:
        assert watch["error"] is None and (watch["disorder"], watch["gaps"], watch["behind"]) == (0, 0, 0), watch
    assert set(result.latency) == {"all", *(kind for kind, _ in load.MIX)}
    assert result.rss_mib["start"] > 0 and result.rss_mib["end"] > 0
