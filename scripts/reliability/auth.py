"""Auth: every RPC x {no token, wrong token, read-only token, token of another prefix}; TLS and mutual TLS.

`normsvc serve --tokens FILE` with four tokens: ``reader`` (role read, every
layer), ``trainer`` (write, team-a/), ``ops`` (admin, every layer) and
``other`` (admin, but only team-b/).  Each request below targets team-a/
layers; each is sent with no token, an unknown token, the reader's token and
the other prefix's token, and then by ``ops`` (the control: it must succeed,
so the request itself is valid).  Expected: UNAUTHENTICATED without a (known)
token; PERMISSION_DENIED for the reader on anything that needs write or
admin, and for ``other`` on everything; OK for the reader on reads.  A
refused call must leave every layer as it was (compared through ``ops``).

Then the transport: a TLS server (with tokens) refuses plaintext and a client
that trusts another CA, and answers the health check with no token; a mutual
TLS server refuses a client without a certificate and one whose certificate
another CA signed, and answers the health check to a client with a good
certificate.  Certificates come from the openssl CLI.

    python scripts/reliability/auth.py --rounds 1
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `reliability` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import numpy as np

from reliability.common import (
    METHODS, ServerProcess, encode, fingerprint, healthy, machine, make_pki, parser, pb, pb_grpc, print_table,
    random_moments,
)

TOKENS = {"tokens": [
    {"name": "reader", "token": "reader-token", "role": "read"},
    {"name": "trainer", "token": "trainer-token", "role": "write", "prefixes": ["team-a/"]},
    {"name": "ops", "token": "ops-token", "role": "admin"},
    {"name": "other", "token": "other-token", "role": "admin", "prefixes": ["team-b/"]},
]}
CONTROL = "ops-token"
TIMEOUT = 20.0
FEATURES = 4


def bearer(token):
    return None if token is None else (("authorization", f"Bearer {token}"),)


#: who calls: the call's metadata
IDENTITIES = {
    "no token": None,
    "wrong token": bearer("not-a-listed-token"),
    "not Bearer": (("authorization", "Basic b3BzLXRva2VuOg=="),),
    "read-only": bearer("reader-token"),
    "other prefix": bearer("other-token"),
}


class Requests:
    """The valid requests of every RPC, built fresh for each call (steps and names move on)."""

    def __init__(self, seed: int, exported: bytes):
        self.rng = np.random.default_rng(seed)
        self.n = 0
        self.exported = exported

    def moments(self):
        return random_moments(self.rng, FEATURES)

    def x(self):
        return encode(self.rng.normal(size=(3, FEATURES)))

    def stream(self, mode, update=True):
        header = pb.NormalizeStreamHeader(layer="team-a/bn", dtype=pb.DTYPE_FLOAT64, shape=[3, FEATURES], mode=mode,
                                          update=update)
        return [pb.NormalizeStreamRequest(header=header),
                pb.NormalizeStreamRequest(chunk=self.rng.normal(size=(3, FEATURES)).tobytes())]

    def all(self):
        """(label, method, role needed, request factory), in an order the control calls can follow."""
        def n():
            self.n += 1
            return self.n

        bn = "team-a/bn"
        return [
            ("CreateLayer", "CreateLayer", "write", lambda: pb.CreateLayerRequest(name=f"team-a/new{n()}")),
            ("GetLayer", "GetLayer", "read", lambda: pb.GetLayerRequest(names=[bn])),
            ("ListLayers team-a/", "ListLayers", "read", lambda: pb.ListLayersRequest(prefix="team-a/")),
            ("ListLayers (every layer)", "ListLayers", "read", lambda: pb.ListLayersRequest(include_stats=True)),
            ("ResetStats", "ResetStats", "write", lambda: pb.ResetStatsRequest(name=bn)),
            ("UpdateStats", "UpdateStats", "write", lambda: pb.UpdateStatsRequest(
                updates=[pb.LayerMoments(layer=bn, moments=self.moments())])),
            ("UpdateStats step contribution", "UpdateStats", "write", lambda: pb.UpdateStatsRequest(
                updates=[pb.LayerMoments(layer="team-a/steps", moments=self.moments())], step=n(), rank=0,
                world_size=1, run="auth")),
            ("UpdateStats team-a/ + team-b/", "UpdateStats", "write", lambda: pb.UpdateStatsRequest(
                updates=[pb.LayerMoments(layer=bn, moments=self.moments()),
                         pb.LayerMoments(layer="team-b/bn", moments=self.moments())])),
            ("AllReduceMoments", "AllReduceMoments", "write", lambda: pb.AllReduceMomentsRequest(
                step=n(), rank=0, world_size=1, run="auth", moments=[pb.LayerMoments(layer=bn, moments=self.moments())])),
            ("AllReduceMomentsStream", "AllReduceMomentsStream", "write", lambda: [pb.AllReduceMomentsRequest(
                step=n(), rank=0, world_size=1, run="auth-stream", wait_seconds=5.0,
                moments=[pb.LayerMoments(layer="team-a/stream", moments=self.moments())])]),
            # every message is checked: the team-b/ token passes the first message and not the second
            ("AllReduceMomentsStream team-b/, then team-a/", "AllReduceMomentsStream", "write", lambda: [
                pb.AllReduceMomentsRequest(step=n(), rank=0, world_size=1, run="auth-stream", update_stats=False,
                                           moments=[pb.LayerMoments(layer="team-b/bn", moments=self.moments())]),
                pb.AllReduceMomentsRequest(step=n(), rank=0, world_size=1, run="auth-stream", update_stats=False,
                                           moments=[pb.LayerMoments(layer=bn, moments=self.moments())])]),
            ("WatchLayer", "WatchLayer", "read", lambda: pb.WatchLayerRequest(names=[bn])),
            ("Normalize training", "Normalize", "write", lambda: pb.NormalizeRequest(
                layer=bn, x=self.x(), mode=pb.MODE_TRAINING)),
            ("Normalize training, update=false", "Normalize", "read", lambda: pb.NormalizeRequest(
                layer=bn, x=self.x(), mode=pb.MODE_TRAINING, update=False)),
            ("Normalize inference", "Normalize", "read", lambda: pb.NormalizeRequest(
                layer=bn, x=self.x(), mode=pb.MODE_INFERENCE)),
            ("NormalizeStream training", "NormalizeStream", "write", lambda: self.stream(pb.MODE_TRAINING)),
            ("NormalizeStream inference", "NormalizeStream", "read", lambda: self.stream(pb.MODE_INFERENCE)),
            ("ExportStats names", "ExportStats", "read", lambda: pb.ExportStatsRequest(names=[bn])),
            ("ExportStats prefix", "ExportStats", "read", lambda: pb.ExportStatsRequest(prefix="team-a/")),
            ("ExportStats (every layer)", "ExportStats", "read", lambda: pb.ExportStatsRequest()),
            ("ImportStats add_prefix", "ImportStats", "admin", lambda: pb.ImportStatsRequest(
                safetensors=self.exported, add_prefix=f"team-a/imp{n()}/")),
            ("ImportStats (every layer)", "ImportStats", "admin", lambda: pb.ImportStatsRequest(
                safetensors=self.exported)),
            ("Freeze", "Freeze", "admin", lambda: pb.FreezeRequest(name=bn)),
            ("Unfreeze", "Unfreeze", "admin", lambda: pb.UnfreezeRequest(name=bn)),
            ("DeleteLayer", "DeleteLayer", "admin", lambda: pb.DeleteLayerRequest(name=f"team-a/victim{self.n}")),
        ]


def invoke(stub, method: str, request, metadata) -> str:
    """The call's status code name (WatchLayer: OK once its first message came)."""
    try:
        if method == "WatchLayer":
            stream = stub.WatchLayer(request, metadata=metadata, timeout=TIMEOUT)
            try:
                next(stream)
            finally:
                stream.cancel()
        elif method in ("NormalizeStream", "AllReduceMomentsStream"):
            list(getattr(stub, method)(iter(request), metadata=metadata, timeout=TIMEOUT))
        else:
            getattr(stub, method)(request, metadata=metadata, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def expected(identity: str, role: str) -> str:
    if identity in ("no token", "wrong token", "not Bearer"):
        return "UNAUTHENTICATED"
    if identity == "read-only":
        return "OK" if role == "read" else "PERMISSION_DENIED"
    return "PERMISSION_DENIED"


@dataclass
class Result:
    calls: int = 0
    rows: list = field(default_factory=list)  # (label, method, role, {identity: code}, control code)
    wrongly_allowed: list = field(default_factory=list)
    wrongly_refused: list = field(default_factory=list)
    state_changed: list = field(default_factory=list)
    control_failed: list = field(default_factory=list)
    methods: set = field(default_factory=set)
    transport: list = field(default_factory=list)  # (server, client, expected, got)
    seconds: float = 0.0

    @property
    def transport_failures(self) -> list:
        return [row for row in self.transport if row[2] != row[3]]

    @property
    def ok(self) -> bool:
        return not (self.wrongly_allowed or self.wrongly_refused or self.state_changed or self.control_failed
                    or self.transport_failures) and self.methods == set(METHODS)


def _setup(stub, metadata) -> None:
    for name in ("team-a/bn", "team-a/steps", "team-a/stream", "team-b/bn"):
        stub.CreateLayer(pb.CreateLayerRequest(name=name, config=pb.LayerConfig(num_features=[FEATURES])),
                         metadata=metadata, timeout=TIMEOUT)


def matrix(server: ServerProcess, rounds: int, seed: int, result: Result) -> None:
    admin = bearer(CONTROL)
    with server.channel() as channel:
        stub = pb_grpc.NormServiceStub(channel)
        _setup(stub, admin)
        exported = stub.ExportStats(pb.ExportStatsRequest(names=["team-a/bn"]), metadata=admin,
                                    timeout=TIMEOUT).safetensors
        requests = Requests(seed, exported)
        for round_ in range(rounds):
            for label, method, role, make in requests.all():
                if method == "DeleteLayer":
                    stub.CreateLayer(pb.CreateLayerRequest(name=f"team-a/victim{requests.n}"), metadata=admin,
                                     timeout=TIMEOUT)
                codes = {}
                for identity, metadata in IDENTITIES.items():
                    before = fingerprint(stub, admin)
                    code = codes[identity] = invoke(stub, method, make(), metadata)
                    result.calls += 1
                    want = expected(identity, role)
                    where = f"{label} with {identity}: {code}, expected {want}"
                    if want != "OK" and code != want:
                        result.wrongly_allowed.append(where)
                    elif want == "OK" and code != "OK":
                        result.wrongly_refused.append(where)
                    if code != "OK" and fingerprint(stub, admin) != before:
                        result.state_changed.append(where)
                control = invoke(stub, method, make(), admin)
                result.calls += 1
                if control != "OK":
                    result.control_failed.append(f"{label} with the admin token: {control}")
                result.methods.add(method)
                if round_ == 0:
                    result.rows.append((label, method, role, codes, control))
        result.transport.append(("plaintext + tokens", "health check, no token", "SERVING",
                                 "SERVING" if healthy(channel) else "no answer"))


def transport(folder: Path, result: Result) -> None:
    pki = make_pki(folder)
    tokens = folder / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    read = lambda key: Path(pki[key]).read_bytes()  # noqa: E731
    good_ca = grpc.ssl_channel_credentials(read("ca"))
    other_ca = grpc.ssl_channel_credentials(read("otherca"))
    client = grpc.ssl_channel_credentials(read("ca"), private_key=read("client_key"), certificate_chain=read("client"))
    intruder = grpc.ssl_channel_credentials(read("ca"), private_key=read("intruder_key"),
                                            certificate_chain=read("intruder"))

    tls = ("--tls-cert", pki["server"], "--tls-key", pki["server_key"], "--tokens", str(tokens))
    servers = {  # mode -> (serve arguments, credentials of a good client, checks)
        "TLS + tokens": (tls, good_ca, [
            ("health check, trusted CA, no token", good_ca, None, "SERVING"),
            ("GetLayer, trusted CA, admin token", good_ca, CONTROL, "OK"),
            ("GetLayer, trusted CA, no token", good_ca, None, "UNAUTHENTICATED"),
            ("GetLayer in plaintext", None, CONTROL, "UNAVAILABLE"),
            ("health check in plaintext", None, None, "no answer"),
            ("GetLayer, client trusts another CA", other_ca, CONTROL, "UNAVAILABLE"),
        ]),
        "mutual TLS + tokens": ((*tls, "--tls-client-ca", pki["ca"]), client, [
            ("health check, client certificate, no token", client, None, "SERVING"),
            ("GetLayer, client certificate, admin token", client, CONTROL, "OK"),
            ("GetLayer, client certificate, no token", client, None, "UNAUTHENTICATED"),
            ("GetLayer, no client certificate", good_ca, CONTROL, "UNAVAILABLE"),
            ("health check, no client certificate", good_ca, None, "no answer"),
            ("GetLayer, certificate from another CA", intruder, CONTROL, "UNAVAILABLE"),
            ("GetLayer in plaintext", None, CONTROL, "UNAVAILABLE"),
        ]),
    }
    for mode, (args, good, checks) in servers.items():
        with ServerProcess("memory://", *args) as server:
            with server.channel(credentials=good, host="localhost") as channel:
                _setup(pb_grpc.NormServiceStub(channel), bearer(CONTROL))
            for name, credentials, token, expect in checks:
                host = "localhost" if credentials else "127.0.0.1"  # the name the server certificate holds
                with server.channel(credentials=credentials, host=host) as channel:
                    if name.startswith("health check"):
                        got = "SERVING" if healthy(channel, timeout=5) else "no answer"
                    else:
                        got = invoke(pb_grpc.NormServiceStub(channel), "GetLayer",
                                     pb.GetLayerRequest(names=["team-a/bn"]), bearer(token))
                result.transport.append((mode, name, expect, got))


def run(rounds: int = 1, seed: int = 0, folder=None, with_tls: bool = True, log=print) -> Result:
    result = Result()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="normsvc-auth-", dir=folder) as tmp:
        tokens = Path(tmp) / "tokens.json"
        tokens.write_text(json.dumps(TOKENS))
        with ServerProcess(f"sqlite:///{Path(tmp) / 'auth.db'}", "--tokens", str(tokens)) as server:
            matrix(server, rounds, seed, result)
        log(f"  matrix: {result.calls} calls")
        if with_tls:
            if shutil.which("openssl") is None:
                result.transport.append(("TLS", "openssl CLI", "present", "missing"))
            else:
                transport(Path(tmp), result)
    result.seconds = time.monotonic() - started
    return result


def report(result: Result) -> None:
    headers = ("request", "needs", *IDENTITIES, "admin (control)")
    print_table("every RPC x every wrong credential (status codes)", headers,
                [(label, role, *(codes[i] for i in IDENTITIES), control)
                 for label, _, role, codes, control in result.rows])
    print_table("transport", ("server", "client", "expected", "got"), result.transport)
    print_table("checks", ("check", "value"), [
        ("calls", result.calls),
        ("RPCs covered", f"{len(result.methods)} of {len(METHODS)}"),
        ("wrongly allowed (a refusal expected, another answer came)", len(result.wrongly_allowed)),
        ("wrongly refused (a read by the read-only token)", len(result.wrongly_refused)),
        ("refused calls that changed the state", len(result.state_changed)),
        ("control calls (admin token) that failed", len(result.control_failed)),
        ("transport checks not as expected", len(result.transport_failures)),
    ])
    for line in (result.wrongly_allowed + result.wrongly_refused + result.state_changed + result.control_failed)[:10]:
        print("  " + line)


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0], rounds=1, seconds=0.0, rounds_help="times the matrix runs",
               seconds_help="unused (the matrix is a fixed set of calls)")
    args = p.parse_args(argv)
    print(machine(), flush=True)
    result = run(args.rounds, args.seed)
    report(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
