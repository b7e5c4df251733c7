"""normsvc/client/transport.py: deadlines, retries, tokens and TLS; unit tests of the policy,
then against real servers (a flaky one from client_util, in-process ones, none at all)."""

from __future__ import annotations

import json
import shutil
import time

import grpc
import numpy as np
import pytest
from client_util import FAST_RETRY

from normsvc import Moments
from normsvc.client import Client, Retry
from normsvc.client.transport import Attempts, Transport, bearer_metadata, channel_credentials
from normsvc.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    StoreError,
    Unauthenticated,
    Unavailable,
)

pytestmark = pytest.mark.timeout(300)


class FakeRpcError(grpc.RpcError):
    """A failed call as a driver sees one, without a server."""

    def __init__(self, code: grpc.StatusCode, details: str = "failed"):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return ()


# --- the policy, without I/O ---------------------------------------------------------


def test_retry_delays_grow_and_are_capped():
    retry = Retry(attempts=10, initial_backoff=0.1, max_backoff=0.5, multiplier=2.0)
    for failed, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        delays = [retry.delay(failed, None) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays), (failed, min(delays), max(delays))
    assert retry.delay(10, None) is None  # attempts used up
    assert retry.delay(1, time.monotonic() + 0.01) is None  # never sleeps past the deadline
    # nor starts a try with less time than its delay left (it would end in DEADLINE_EXCEEDED)
    assert retry.delay(1, time.monotonic() + 0.09) is None  # a delay of 0.05 or more leaves less than it
    assert 0.05 <= retry.delay(1, time.monotonic() + 0.25) <= 0.1
    with pytest.raises(InvalidArgument, match="at least 1 attempt"):
        Retry(attempts=0)


def test_attempts_retry_unavailable_then_give_up_with_the_count():
    transport = Transport("127.0.0.1:1", retry=Retry(attempts=3, initial_backoff=0.01))
    attempts = transport.attempts("UpdateStats")
    assert 0 < attempts.options()["timeout"] <= 30 and attempts.options()["metadata"] is None
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert 0.005 <= attempts.retry_after(unavailable) <= 0.01
    assert 0.01 <= attempts.retry_after(unavailable) <= 0.02
    with pytest.raises(Unavailable) as info:
        attempts.retry_after(unavailable)
    assert str(info.value) == "UpdateStats on 127.0.0.1:1 (gave up after 3 attempts): connection refused"
    assert info.value.__suppress_context__


def test_attempts_do_not_retry_other_codes_and_progress_resets_the_count():
    transport = Transport("t:1", token="tok", timeout=None, retry=Retry(attempts=2, initial_backoff=0.01))
    attempts = transport.attempts("GetLayer", timeout=None)
    assert attempts.options() == {"timeout": None, "metadata": (("authorization", "Bearer tok"),)}
    with pytest.raises(DeadlineExceeded):
        attempts.retry_after(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED))
    watch = Attempts(transport, "WatchLayer", None)
    for _ in range(5):  # a stream that delivers between failures keeps reconnecting
        assert watch.retry_after(FakeRpcError(grpc.StatusCode.UNAVAILABLE)) > 0
        watch.progressed()


def test_explicit_timeouts_override_the_clients():
    transport = Transport("t:1", timeout=30)
    assert transport.attempts("AllReduceMoments", timeout=None).deadline is None
    assert transport.attempts("AllReduceMoments", timeout=0.5).deadline < time.monotonic() + 1


@pytest.mark.parametrize("token", ["", " padded ", 42])
def test_bad_tokens(token):
    with pytest.raises(InvalidArgument, match="token"):
        bearer_metadata(token)


def test_channel_credentials_forms(tmp_path):
    assert channel_credentials(None) == (None, []) and channel_credentials(False) == (None, [])
    creds, options = channel_credentials({"server_name": "normsvc.internal"})
    assert isinstance(creds, grpc.ChannelCredentials)
    assert options == [("grpc.ssl_target_name_override", "normsvc.internal")]
    with pytest.raises(InvalidArgument, match="expected root, cert, key, server_name"):
        channel_credentials({"ca": "x"})
    with pytest.raises(InvalidArgument, match="PEM"):
        channel_credentials(tmp_path / "missing.pem")


# --- against servers -----------------------------------------------------------------


def test_unavailable_is_retried_with_the_same_request_id(flaky):
    service = flaky(failures=2)
    with Client(f"127.0.0.1:{service.port}", retry=FAST_RETRY) as client:
        stats = client.update_many({"a": Moments.from_samples(np.ones((2, 1)))})
    assert stats["a"].version == 1
    assert len(service.request_ids) == 3
    assert len(set(service.request_ids)) == 1 and service.request_ids[0]


def test_retries_are_bounded(flaky):
    service = flaky(failures=100)
    with Client(f"127.0.0.1:{service.port}", retry=FAST_RETRY) as client:
        with pytest.raises(Unavailable, match="gave up after 4 attempts"):
            client.update_many({"a": Moments.from_samples(np.ones((2, 1)))}, request_id="mine")
    assert service.request_ids == ["mine"] * 4


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.DEADLINE_EXCEEDED])
def test_other_codes_are_not_retried(flaky, code):
    service = flaky(failures=1, code=code)
    with Client(f"127.0.0.1:{service.port}", retry=FAST_RETRY) as client:
        with pytest.raises(StoreError) as info:
            client.update_many({"a": Moments.from_samples(np.ones((2, 1)))})
    assert info.value.code == code.name and len(service.request_ids) == 1


def test_calls_survive_a_server_restart(start_server, tmp_path):
    url = f"sqlite:///{tmp_path / 'stats.db'}"
    first = start_server(url)
    port = first.port
    retry = Retry(attempts=12, initial_backoff=0.05, max_backoff=0.5)
    with Client(first.address, retry=retry) as client:
        layer = client.create_layer("bn", num_features=2)
        m = Moments.from_samples(np.ones((2, 2)))
        layer.update(m)
        watch = client.watch("bn", skip_initial=True)
        first.stop(grace=0)
        start_server(url, port=port)
        assert layer.update(m).version == 2
        assert next(watch).stats.version == 2  # the watch reconnected and resumed
        watch.cancel()


def test_unreachable_server_is_one_clear_error():
    with Client("127.0.0.1:1", retry=Retry(attempts=2, initial_backoff=0.01)) as client:
        with pytest.raises(Unavailable) as info:
            client.list_layers()
    message = str(info.value)
    assert "127.0.0.1:1" in message and "ListLayers" in message and "\n" not in message


def test_default_deadline_applies(server):
    with Client(server.address, timeout=0.3) as client:
        client.create_layer("d", num_features=1)
        with pytest.raises(DeadlineExceeded):
            client.allreduce({"d": Moments.from_samples(np.ones((2, 1)))}, step=0, rank=0, world_size=2)


def test_tokens(start_server, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [
        {"name": "reader", "token": "r-token", "role": "read"},
        {"name": "writer", "token": "w-token", "role": "write", "prefixes": ["team/"]},
    ]}))
    server = start_server(tokens=str(tokens))
    with Client(server.address) as anonymous, Client(server.address, token="r-token") as reader, \
            Client(server.address, token="w-token") as writer:
        with pytest.raises(Unauthenticated):
            anonymous.list_layers()
        with pytest.raises(Unauthenticated):
            Client(server.address, token="wrong").list_layers()
        layer = writer.create_layer("team/bn", num_features=1)
        layer.update(Moments.from_samples(np.ones((2, 1))))
        with pytest.raises(PermissionDenied):
            writer.create_layer("other/bn")
        with pytest.raises(PermissionDenied) as info:
            reader.layer("team/bn").update(Moments.from_samples(np.ones((2, 1))))
        assert isinstance(info.value, PermissionError)
        assert reader.layer("team/bn").stats().version == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_mutual_tls(start_server, tmp_path):
    from server.server_util import make_pki

    pki = make_pki(tmp_path)
    server = start_server(tls_cert=pki["server"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    tls = {"root": pki["ca"], "cert": pki["client"], "key": pki["client_key"]}
    with Client(f"localhost:{server.port}", tls=tls) as client:
        assert client.create_layer("secure", num_features=1).stats().version == 0
    with open(pki["ca"], "rb") as f:
        root = f.read()
    with Client(f"localhost:{server.port}", tls=root, retry=Retry(attempts=1), timeout=10) as client:
        with pytest.raises(StoreError):  # no client certificate
            client.list_layers()
    with pytest.raises(ValueError, match="cert.*key"):
        Client("localhost:1", tls={"root": root, "cert": pki["client"]})


def test_bad_arguments_fail_before_any_call():
    with Client("127.0.0.1:1", retry=Retry(attempts=1)) as client:
        with pytest.raises(InvalidArgument):
            client.create_layer("x", convention="nope")
        with pytest.raises(InvalidArgument):
            client.update_many([("x", None)])
        with pytest.raises(InvalidArgument):
            client.list_layers(limit=0)
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", timeout=0)
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", tls=42)
