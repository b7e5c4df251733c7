"""Auth: every RPC x every wrong credential, TLS and mutual TLS (scripts/reliability/auth.py, the whole matrix)."""

import shutil

from rel_util import quiet

from reliability import auth
from reliability.common import METHODS


def test_no_call_is_wrongly_allowed(tmp_path):
    result = auth.run(rounds=1, seed=1, folder=tmp_path, with_tls=shutil.which("openssl") is not None, log=quiet)
    assert result.methods == set(METHODS)
    assert result.wrongly_allowed == []
    assert result.wrongly_refused == []
    assert result.state_changed == []
    assert result.control_failed == []
    assert result.transport_failures == []
    assert result.calls >= len(METHODS) * (len(auth.IDENTITIES) + 1)
