"""The ``normsvc`` command.

    normsvc serve [--host H] [--port P] [--store URL] ...

Every option of ``serve`` can also come from an environment variable
(``NORMSVC_<OPTION>``, e.g. ``NORMSVC_PORT=50051``), so a container is
configured without flags; a flag wins over its variable.  Subcommands live
in ``SUBCOMMANDS``: each adds its parser and names the function it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["main", "build_parser", "DEFAULT_STORE"]

#: The embedded default: a sqlite file in ./.normsvc/ (created on start).
DEFAULT_STORE = "sqlite:///.normsvc/stats.db"


def _env(name: str, default=None):
    return os.environ.get(f"NORMSVC_{name}", default)


def _env_int(name: str, default):
    value = _env(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"normsvc: NORMSVC_{name}={value!r}: expected an integer") from None


def _env_float(name: str, default):
    value = _env(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"normsvc: NORMSVC_{name}={value!r}: expected a number") from None


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the NormService gRPC server (with health checking and reflection) until "
        "SIGTERM or SIGINT, then shut down gracefully and exit 0.  Each option defaults to its "
        "NORMSVC_* environment variable.",
    )
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                   help="address to listen on; 0.0.0.0 for every interface (NORMSVC_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=_env_int("PORT", 50051),
                   help="port; 0 picks a free one and prints it (NORMSVC_PORT, default 50051)")
    p.add_argument("--store", default=_env("STORE", DEFAULT_STORE),
                   help=f"store URL: memory://, sqlite:///path (NORMSVC_STORE, default {DEFAULT_STORE})")
    p.add_argument("--max-message-mb", type=int, default=_env_int("MAX_MESSAGE_MB", 64),
                   help="largest gRPC message in MiB, both ways (NORMSVC_MAX_MESSAGE_MB, default 64)")
    p.add_argument("--max-tensor-elements", type=int, default=_env_int("MAX_TENSOR_ELEMENTS", 1 << 28),
                   help="largest tensor accepted (NORMSVC_MAX_TENSOR_ELEMENTS)")
    p.add_argument("--max-layers", type=int, default=_env_int("MAX_LAYERS", 1_000_000),
                   help="most layers the store may hold (NORMSVC_MAX_LAYERS)")
    p.add_argument("--max-layers-per-request", type=int, default=_env_int("MAX_LAYERS_PER_REQUEST", 4096),
                   help="most layers one request may name (NORMSVC_MAX_LAYERS_PER_REQUEST)")
    p.add_argument("--tokens", default=_env("TOKENS"),
                   help="JSON tokens file: bearer tokens with roles and layer prefixes (NORMSVC_TOKENS); "
                   "without it every call is allowed")
    p.add_argument("--tls-cert", default=_env("TLS_CERT"), help="PEM certificate chain (NORMSVC_TLS_CERT)")
    p.add_argument("--tls-key", default=_env("TLS_KEY"), help="PEM private key (NORMSVC_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=_env("TLS_CLIENT_CA"),
                   help="PEM CA bundle; require client certificates it signed, mutual TLS (NORMSVC_TLS_CLIENT_CA)")
    p.add_argument("--metrics-port", type=int, default=_env_int("METRICS_PORT", None),
                   help="serve Prometheus /metrics over HTTP on this port; 0 picks one (NORMSVC_METRICS_PORT)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=_env("DEVICE", "auto"),
                   help="where kernels run (NORMSVC_DEVICE, default auto)")
    p.add_argument("--workers", type=int, default=_env_int("WORKERS", 64),
                   help="server threads (NORMSVC_WORKERS, default 64)")
    p.add_argument("--grace", type=float, default=_env_float("GRACE", 10.0),
                   help="seconds in-flight calls get to finish on SIGTERM (NORMSVC_GRACE, default 10)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING... (NORMSVC_LOG_LEVEL, default INFO)")
    p.set_defaults(run=_serve)


def _sqlite_dir(url: str) -> None:
    """Create the folder of a sqlite store file (the default one is ./.normsvc/)."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def _serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import serve
    from .server.limits import Limits

    _sqlite_dir(args.store)
    limits = Limits(
        max_message_mb=args.max_message_mb,
        max_tensor_elements=args.max_tensor_elements,
        max_layers=args.max_layers,
        max_layers_per_request=args.max_layers_per_request,
    )
    stop = threading.Event()
    signals = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signals[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        server = serve(
            args.store,
            host=args.host,
            port=args.port,
            tokens=args.tokens,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            metrics_port=args.metrics_port,
            device=args.device,
            workers=args.workers,
            limits=limits,
        )
    except (OSError, ValueError) as exc:
        print(f"normsvc serve: {exc}", file=sys.stderr)
        return 2
    # One parseable line on stdout: tests and scripts read the port from it.
    print(f"normsvc serving on {server.address}"
          + (f" metrics on port {server.metrics_port}" if server.metrics_port is not None else ""), flush=True)
    while not stop.wait(1.0):
        pass
    logging.getLogger("normsvc.server").info("signal received: shutting down")
    server.stop(grace=args.grace)
    for sig, previous in signals.items():
        signal.signal(sig, previous)
    return 0


#: Subcommands: each adds its parser (and sets ``run``) on the subparsers object.
SUBCOMMANDS = [_add_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normsvc", description="Running statistics for normalization layers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
