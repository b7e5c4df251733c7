"""Bearer tokens, roles and layer-name prefixes.

A tokens file (JSON) lists who may do what::

    {"tokens": [
      {"name": "trainer", "token": "s3cret", "role": "write", "prefixes": ["resnet50/"]},
      {"name": "ops", "token": "0ther", "role": "admin"}
    ]}

``prefixes`` defaults to ``[""]`` (every layer).  A prefix is matched
character by character; one that ends with ``/`` is a namespace: since a
layer name has no empty, ``.`` or ``..`` part
(:func:`~normsvc.store.validation.validate_name`), ``team/`` covers exactly
the names whose first part is ``team``, and ``team/../other/x`` is no name
at all.  A prefix without the final ``/`` also covers longer parts (``team``
covers ``team-b/x``).  A prefix that no valid name can start with
(``/team/``, ``team//``, ``../``) is refused when the file is loaded.  Roles
nest, read < write < admin:

=====  =================================================================
read   GetLayer, ListLayers, WatchLayer, ExportStats, Normalize without an
       update of the running statistics
write  + CreateLayer, UpdateStats, AllReduceMoments (and its stream, checked
       on every message), ResetStats, Normalize with update
admin  + DeleteLayer, Freeze, Unfreeze, ImportStats
=====  =================================================================

Clients send ``authorization: Bearer <token>``.  No or an unknown token is
UNAUTHENTICATED; a token whose role is too low or whose prefixes do not cover
every layer the request names is PERMISSION_DENIED.  Requests that name no
layer (ListLayers, ExportStats and ImportStats without names) need the
request's prefix to lie under one of the token's prefixes: ExportStats's
``prefix``, ImportStats's ``add_prefix`` (the layers an import writes are
``add_prefix`` + the names in the file); without one they need a token for
every layer (prefix "").  The health and reflection services stay open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from .._proto import normsvc_pb2 as pb
from ..errors import InvalidArgument, PermissionDenied, Unauthenticated
from ..store.validation import validate_name

__all__ = ["ROLES", "Principal", "TokenTable", "RULES", "authorize"]

ROLES = ("read", "write", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}
SERVICE = "/normsvc.v1.NormService/"


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to, its role and the layer-name prefixes it may touch."""

    name: str
    role: str
    prefixes: tuple

    def covers(self, layer: str) -> bool:
        return any(layer.startswith(p) for p in self.prefixes)


class TokenTable:
    """Tokens -> :class:`Principal`, compared by SHA-256 digest in constant time."""

    def __init__(self, principals: dict):
        self._by_digest = {_digest(token): p for token, p in principals.items()}

    @classmethod
    def load(cls, path) -> "TokenTable":
        """Parse a tokens file; errors name the entry and what was expected."""
        text = Path(path).read_text()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"tokens file {path}: not JSON ({exc})") from None
        entries = doc.get("tokens") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise InvalidArgument(f'tokens file {path}: expected {{"tokens": [{{"token": ..., "role": ...}}, ...]}}')
        principals = {}
        for i, e in enumerate(entries):
            where = f"tokens file {path}, entry {i}"
            if not isinstance(e, dict) or not isinstance(e.get("token"), str) or not e["token"]:
                raise InvalidArgument(f"{where}: expected an object with a non-empty string 'token'")
            if e.get("role") not in ROLES:
                raise InvalidArgument(f"{where}: role {e.get('role')!r}, expected one of {', '.join(ROLES)}")
            prefixes = e.get("prefixes", [""])
            if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes) or not prefixes:
                raise InvalidArgument(f"{where}: 'prefixes' must be a non-empty list of strings")
            for p in prefixes:
                _check_prefix(p, where)
            if e["token"] in principals:
                raise InvalidArgument(f"{where}: the same token appears twice")
            principals[e["token"]] = Principal(str(e.get("name", f"token{i}")), e["role"], tuple(prefixes))
        return cls(principals)

    def lookup(self, token: str) -> Principal | None:
        digest = _digest(token)
        found = None
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def _check_prefix(prefix: str, where: str) -> None:
    """InvalidArgument unless some valid layer name starts with ``prefix`` ("" covers every name)."""
    try:
        if prefix:
            validate_name(prefix + "x")
    except InvalidArgument:
        raise InvalidArgument(f"{where}: prefix {prefix!r} begins no valid layer name: expected '' or the start "
                              "of one, e.g. 'team/' (no leading or doubled '/', no '.' or '..' part)") from None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, or None."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("authorization header is not 'Bearer <token>'")
    return None


# --- what each RPC needs: (role, request -> names touched, or a prefix rule) ---

def _names(field):
    return lambda r: list(getattr(r, field))


def _name(field):
    return lambda r: [getattr(r, field)]


def _entries(field):
    return lambda r: [e.layer for e in getattr(r, field)]


def _normalize_role(mode: int, update: bool) -> str:
    return "write" if mode == pb.MODE_TRAINING and update else "read"


class _Prefix:
    """A request that names a prefix (or everything) rather than layers."""

    def __init__(self, get):
        self.get = get


#: method -> (role or role(request), names(request) or _Prefix)
RULES = {
    "CreateLayer": ("write", _name("name")),
    "GetLayer": ("read", _names("names")),
    "ListLayers": ("read", _Prefix(lambda r: r.prefix)),
    "DeleteLayer": ("admin", _name("name")),
    "ResetStats": ("write", _name("name")),
    "UpdateStats": ("write", _entries("updates")),
    "AllReduceMoments": ("write", _entries("moments")),
    "AllReduceMomentsStream": ("write", _entries("moments")),  # every message
    "WatchLayer": ("read", _names("names")),
    "Normalize": (lambda r: _normalize_role(r.mode, not r.HasField("update") or r.update), _name("layer")),
    "NormalizeStream": (
        lambda h: _normalize_role(h.mode, not h.HasField("update") or h.update),
        _name("layer"),
    ),
    "Freeze": ("admin", _name("name")),
    "Unfreeze": ("admin", _name("name")),
    "ExportStats": ("read", lambda r: list(r.names) if r.names else _Prefix(lambda r: r.prefix)),
    "ImportStats": ("admin", lambda r: [r.add_prefix + n for n in r.names] if r.names
                    else _Prefix(lambda r: r.add_prefix)),
}


def authorize(principal: Principal, method: str, request) -> None:
    """Raise PermissionDenied unless ``principal`` may call ``method`` with ``request``.

    For NormalizeStream ``request`` is the stream's header.
    """
    role, target = RULES[method]
    if callable(role):
        role = role(request)
    if _RANK[principal.role] < _RANK[role]:
        raise PermissionDenied(
            f"{method} needs role {role!r} or higher; token {principal.name!r} has role {principal.role!r}"
        )
    if callable(target) and not isinstance(target, _Prefix):
        target = target(request)
    if isinstance(target, _Prefix):
        prefix = target.get(request)
        if not any(prefix.startswith(p) for p in principal.prefixes):
            what = f"prefix {prefix!r}" if prefix else "every layer"
            raise PermissionDenied(
                f"{method} over {what} is outside token {principal.name!r}'s layer prefixes "
                f"{list(principal.prefixes)}: name layers or a prefix under one of them"
            )
        return
    for name in target:
        if not principal.covers(name):
            raise PermissionDenied(
                f"{method} on layer {name!r}: token {principal.name!r} may only touch layers under "
                f"{list(principal.prefixes)}"
            )


def authenticate(tokens: TokenTable, metadata) -> Principal:
    """The principal of the call's bearer token; UNAUTHENTICATED if none or unknown."""
    token = bearer_token(metadata)
    if token is None:
        raise Unauthenticated("no credentials: send metadata 'authorization: Bearer <token>'")
    principal = tokens.lookup(token)
    if principal is None:
        raise Unauthenticated("unknown token: expected a token listed in the server's tokens file")
    return principal


def method_name(full_method: str) -> str | None:
    """``/normsvc.v1.NormService/GetLayer`` -> ``GetLayer``; None for other services."""
    if full_method.startswith(SERVICE):
        return full_method[len(SERVICE):]
    return None


def each_authorized(principal: Principal, method: str, request_iterator):
    """The messages of a request stream whose every message is authorized on its own
    (AllReduceMomentsStream: each names its layers); raises at the first that is not."""
    for request in request_iterator:
        authorize(principal, method, request)
        yield request


def stream_header(request_iterator):
    """NormalizeStream: peek at the first message (the header) for authorization.

    Returns ``(header or None, iterator over all messages)``.
    """
    first = next(request_iterator, None)
    if first is None:
        return None, iter(())

    def chained():
        yield first
        yield from request_iterator

    if first.WhichOneof("part") != "header":
        raise InvalidArgument("NormalizeStream: the first message must be a header", field="header")
    return first.header, chained()
