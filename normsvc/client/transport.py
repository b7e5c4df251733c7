"""How a client reaches the server: target, credentials, channel options, deadlines and retries.

Both drivers (:mod:`.sync`, :mod:`.aio`) hold one :class:`Transport` and ask
it for the :class:`Attempts` of every call, so the policy lives here once:

* every call has a deadline (``timeout``, default 30 s) that covers its retries;
* UNAVAILABLE is retried with exponential backoff and jitter (:class:`Retry`),
  and so is CANCELLED, which this client never causes on a call it retries (a
  server shutting down cancels calls it had not started).  That is safe
  because every mutation carries a ``request_id`` that the retry reuses, and
  the server applies a request id once;
* every other status ends the call at once, as the matching
  :mod:`normsvc.errors` class (:func:`normsvc.wire.status.from_rpc_error`).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from .._proto import normsvc_pb2_grpc as pb_grpc
from ..errors import InvalidArgument
from ..config import DEFAULT
from ..wire import framing
from ..wire.status import from_rpc_error

__all__ = [
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "CHANNEL_OPTIONS",
    "RAW_METHODS",
    "Retry",
    "channel_credentials",
    "bearer_metadata",
    "Transport",
    "Connection",
    "Attempts",
]

DEFAULT_TARGET = "127.0.0.1:50051"
#: Seconds every call may take, retries included, unless the client says otherwise.
DEFAULT_TIMEOUT = 30.0
#: The server's default message limit (``normsvc serve --max-message-mb 64``).
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20

#: Channel options of every client: message sizes are the server's to limit.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]

#: Methods whose requests the client serializes itself -> the response deserializer (see :mod:`normsvc.wire.framing`).
RAW_METHODS = {"Normalize": framing.normalize_response}


#: What a retry may cure: the server out of reach, or one that cancelled the call while shutting down.
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@dataclass(frozen=True)
class Retry:
    """How UNAVAILABLE (and CANCELLED) is retried: at most ``attempts`` tries in all, with the
    n-th retry after a random delay in ``[b/2, b]``,
    ``b = min(max_backoff, initial_backoff * multiplier**(n-1))``, and only
    when the try still has at least that delay's time before the call's
    deadline: a try started in the deadline's last milliseconds would end in
    DEADLINE_EXCEEDED and hide the error that made the call retry (the last
    try's error is raised instead).  ``Retry(attempts=1)`` turns retries off.
    """

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.attempts < 1:
            raise InvalidArgument(f"Retry(attempts={self.attempts}): expected at least 1 attempt")

    def delay(self, failed: int, deadline: float | None) -> float | None:
        """Seconds to wait after ``failed`` failed attempts, or None to give up."""
        if failed >= self.attempts:
            return None
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (failed - 1))
        delay = random.uniform(cap / 2, cap)
        if deadline is not None and time.monotonic() + 2 * delay >= deadline:
            return None  # the try would have less time than its delay, or none
        return delay


def _pem(value, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        with open(value, "rb") as f:
            return f.read()
    except (OSError, TypeError) as exc:
        raise InvalidArgument(f"tls {what}: expected PEM bytes or a path to a PEM file, got {value!r} ({exc})") from None


def channel_credentials(tls) -> tuple[grpc.ChannelCredentials | None, list]:
    """``tls=`` of a client -> (channel credentials or None, channel options).

    ``None``/``False``: plaintext.  ``True``: TLS with the system's root
    certificates.  PEM bytes or a path: TLS trusting that CA bundle.  A
    mapping with ``root`` (CA bundle), ``cert`` and ``key`` (a client
    certificate, for mutual TLS) and ``server_name`` (the name the server's
    certificate carries, when it is not the target's host); each PEM bytes or
    a path.  A ``grpc.ChannelCredentials`` is used as it is.
    """
    if tls is None or tls is False:
        return None, []
    if isinstance(tls, grpc.ChannelCredentials):
        return tls, []
    if tls is True:
        return grpc.ssl_channel_credentials(), []
    if isinstance(tls, (bytes, str, os.PathLike)):
        return grpc.ssl_channel_credentials(root_certificates=_pem(tls, "root")), []
    if isinstance(tls, Mapping):
        unknown = set(tls) - {"root", "cert", "key", "server_name"}
        if unknown:
            raise InvalidArgument(f"tls has keys {sorted(unknown)}: expected root, cert, key, server_name")
        if ("cert" in tls) != ("key" in tls):
            raise InvalidArgument("tls: a client certificate needs both 'cert' and 'key' (mutual TLS)")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_pem(tls["root"], "root") if tls.get("root") is not None else None,
            private_key=_pem(tls["key"], "key") if "key" in tls else None,
            certificate_chain=_pem(tls["cert"], "cert") if "cert" in tls else None,
        )
        options = [("grpc.ssl_target_name_override", tls["server_name"])] if tls.get("server_name") else []
        return creds, options
    raise InvalidArgument(
        f"tls={tls!r}: expected None, True, a CA bundle (PEM bytes or path), a mapping with "
        "root/cert/key/server_name, or grpc.ChannelCredentials"
    )


def bearer_metadata(token) -> tuple | None:
    """``token=`` of a client -> the call metadata that carries it (None: no token)."""
    if token is None:
        return None
    if not isinstance(token, str) or not token or token != token.strip():
        raise InvalidArgument("token: expected a non-empty string without surrounding spaces")
    return (("authorization", f"Bearer {token}"),)


class Transport:
    """A client's connection settings and call policy, validated before any I/O.

    The arguments are those of :class:`~normsvc.client.Client` (which see).
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls=None,
                 timeout: float | None = DEFAULT_TIMEOUT, retry: Retry | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        if not isinstance(target, str) or not target:
            raise InvalidArgument(f"target={target!r}: expected 'host:port'")
        if timeout is not None and not timeout > 0:
            raise InvalidArgument(f"timeout={timeout!r}: expected None or seconds > 0")
        self.target = target
        self.timeout = timeout
        self.retry = retry or Retry()
        self.max_message_bytes = int(max_message_bytes)
        self.metadata = bearer_metadata(token)
        self.credentials, options = channel_credentials(tls)
        self.options = CHANNEL_OPTIONS + options

    def connect(self, channels) -> "Connection":
        """A channel to the target; ``channels`` is ``grpc`` (blocking) or ``grpc.aio``."""
        if self.credentials is None:
            return Connection(channels.insecure_channel(self.target, options=self.options))
        return Connection(channels.secure_channel(self.target, self.credentials, options=self.options))

    def attempts(self, method: str, timeout=DEFAULT) -> "Attempts":
        """The tries of one call of ``method``: ``timeout`` seconds in all (DEFAULT: the client's)."""
        timeout = self.timeout if timeout is DEFAULT else timeout
        return Attempts(self, method, None if timeout is None else time.monotonic() + timeout)


class Connection:
    """A channel (blocking or ``grpc.aio``) with its NormService stub and the :data:`RAW_METHODS`."""

    def __init__(self, channel):
        self.channel = channel
        self.stub = pb_grpc.NormServiceStub(channel)
        self.raw = {name: channel.unary_unary(f"/normsvc.v1.NormService/{name}", response_deserializer=parse)
                    for name, parse in RAW_METHODS.items()}

    def method(self, name: str, raw: bool = False):
        """The callable of RPC ``name``: bytes in and parsed out when ``raw``, messages otherwise."""
        return self.raw[name] if raw else getattr(self.stub, name)


class Attempts:
    """The tries of one call, or of one watch's reconnects, before a deadline (no I/O here).

    A driver calls with :meth:`options`, and on a ``grpc.RpcError`` waits
    :meth:`retry_after` seconds and tries again; that raises the error as a
    :class:`~normsvc.errors.NormsvcError` once there is no next try.
    """

    def __init__(self, transport: Transport, method: str, deadline: float | None):
        self.transport = transport
        self.method = method
        self.deadline = deadline
        self.failed = 0

    def options(self) -> dict:
        """Keyword arguments of the next try: the time left and the metadata."""
        timeout = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)
        return {"timeout": timeout, "metadata": self.transport.metadata}

    def retry_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait after ``error`` before the next try; raises when there is none."""
        self.failed += 1
        unavailable = error.code() in _RETRIED
        delay = self.transport.retry.delay(self.failed, self.deadline) if unavailable else None
        if delay is None:
            where = f"{self.method} on {self.transport.target}"
            if unavailable and self.failed > 1:
                where += f" (gave up after {self.failed} attempts)"
            raise from_rpc_error(error, context=where) from None
        return delay

    def progressed(self) -> None:
        """A stream delivered a message: its next failure counts as the first again."""
        self.failed = 0
