"""Fuzz, bounded: 300 inputs over every RPC (scripts/reliability/fuzz.py runs 1000 and more)."""

from rel_util import quiet

from reliability import fuzz
from reliability.common import METHODS


def test_fuzzed_requests_get_documented_codes_and_change_nothing(tmp_path):
    result = fuzz.run(rounds=300, seconds=240, seed=1, folder=tmp_path, log=quiet)
    assert result.inputs == 300
    assert set(result.by_method) == set(METHODS)
    assert result.undocumented == []
    assert result.no_error_info == []
    assert result.state_changed == []
    assert result.crashed == [] and result.healthy_after
    assert result.codes["OK"] > 0 and result.codes["INVALID_ARGUMENT"] > 0
    assert max(result.rss_mib) - result.rss_mib[0] < 512, result.rss_mib
