"""The ``normsvc`` command.

    normsvc serve [--host H] [--port P] [--store URL] ...
    normsvc layers list|show|freeze|unfreeze|reset|delete [NAME...] [--target HOST:PORT]
    normsvc export PATH [--layer NAME | --prefix P [--strip-prefix [S]]] [--naming keras|torch]
                        [--dtype float64|float32] [--target HOST:PORT]
    normsvc import PATH [--layer NAME] [--add-prefix P] [--naming keras|torch] [--target HOST:PORT]
    normsvc precompile

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
import tempfile
import threading
from pathlib import Path

__all__ = ["main", "build_parser", "DEFAULT_STORE"]

#: The embedded default: a sqlite file in ./.normsvc/ (created on start).
DEFAULT_STORE = "sqlite:///.normsvc/stats.db"
#: Seconds in-flight calls get on SIGTERM: well inside the time a supervisor waits before SIGKILL
#: (Docker's `docker stop` 10 s, Kubernetes' terminationGracePeriodSeconds 30 s), store close included.
DEFAULT_GRACE = 5.0


def _env(name: str, default=None):
    return os.environ.get(f"NORMSVC_{name}", default)


def _env_number(name: str, default, kind=int):
    """``NORMSVC_<name>`` as an int (or ``kind``), ``default`` when unset or empty."""
    value = _env(name)
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise SystemExit(f"normsvc: NORMSVC_{name}={value!r}: expected {expected}") from None


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
    p.add_argument("--port", type=int, default=_env_number("PORT", 50051),
                   help="port; 0 picks a free one and prints it (NORMSVC_PORT, default 50051)")
    p.add_argument("--store", default=_env("STORE", DEFAULT_STORE),
                   help=f"store URL: memory://, sqlite:///path (NORMSVC_STORE, default {DEFAULT_STORE})")
    p.add_argument("--max-message-mb", type=int, default=_env_number("MAX_MESSAGE_MB", 64),
                   help="largest gRPC message in MiB, both ways (NORMSVC_MAX_MESSAGE_MB, default 64)")
    p.add_argument("--max-tensor-elements", type=int, default=_env_number("MAX_TENSOR_ELEMENTS", 1 << 28),
                   help="largest tensor accepted (NORMSVC_MAX_TENSOR_ELEMENTS)")
    p.add_argument("--max-layers", type=int, default=_env_number("MAX_LAYERS", 1_000_000),
                   help="most layers the store may hold (NORMSVC_MAX_LAYERS)")
    p.add_argument("--max-layers-per-request", type=int, default=_env_number("MAX_LAYERS_PER_REQUEST", 4096),
                   help="most layers one request may name (NORMSVC_MAX_LAYERS_PER_REQUEST)")
    p.add_argument("--tokens", default=_env("TOKENS"),
                   help="JSON tokens file: bearer tokens with roles and layer prefixes (NORMSVC_TOKENS); "
                   "without it every call is allowed")
    p.add_argument("--tls-cert", default=_env("TLS_CERT"), help="PEM certificate chain (NORMSVC_TLS_CERT)")
    p.add_argument("--tls-key", default=_env("TLS_KEY"), help="PEM private key (NORMSVC_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=_env("TLS_CLIENT_CA"),
                   help="PEM CA bundle; require client certificates it signed, mutual TLS (NORMSVC_TLS_CLIENT_CA)")
    p.add_argument("--metrics-port", type=int, default=_env_number("METRICS_PORT", None),
                   help="serve Prometheus /metrics over HTTP on this port; 0 picks one (NORMSVC_METRICS_PORT)")
    p.add_argument("--health-port", type=int, default=_env_number("HEALTH_PORT", None),
                   help="also serve grpc.health.v1 alone on this port, plaintext even with TLS on and with threads "
                   "of its own (answered while every worker is busy), for container and kubelet probes; "
                   "0 picks one (NORMSVC_HEALTH_PORT, default: none)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=_env("DEVICE", "auto"),
                   help="where kernels run (NORMSVC_DEVICE, default auto)")
    p.add_argument("--workers", type=int, default=_env_number("WORKERS", 64),
                   help="server threads (NORMSVC_WORKERS, default 64)")
    p.add_argument("--max-streams", type=int, default=_env_number("MAX_STREAMS", None),
                   help="most calls that hold a thread while they last (WatchLayer and NormalizeStream streams, "
                   "ranks waiting in AllReduceMoments), all callers together; more are refused at once, so unary "
                   "calls and health checks always find a thread (NORMSVC_MAX_STREAMS, default: workers minus "
                   "max(2, workers/4), 48 of 64; at most workers - 1)")
    p.add_argument("--max-streams-per-token", type=int, default=_env_number("MAX_STREAMS_PER_TOKEN", None),
                   help="the same, per token; callers without a token count as one (NORMSVC_MAX_STREAMS_PER_TOKEN, "
                   "default: half of --max-streams with --tokens, all of it without); an AllReduceMoments "
                   "step holds one per rank, so keep world_size within it")
    p.add_argument("--max-stream-mb", type=int, default=_env_number("MAX_STREAM_MB", None),
                   help="MiB of NormalizeStream buffers at once, all streams together; each reserves twice its "
                   "tensor (x and y) before allocating (NORMSVC_MAX_STREAM_MB, default 8 x --max-message-mb)")
    p.add_argument("--step-lag", type=int, default=_env_number("STEP_LAG", 8),
                   help="a training step still open when a contribution this many steps ahead arrives is applied "
                   "with the ranks that came (NORMSVC_STEP_LAG, default 8)")
    p.add_argument("--grace", type=float, default=_env_number("GRACE", DEFAULT_GRACE, float),
                   help="seconds in-flight calls get to finish on SIGTERM; keep it below the time your supervisor "
                   "waits before SIGKILL (docker stop: 10 s) (NORMSVC_GRACE, default %g)" % DEFAULT_GRACE)
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING... (NORMSVC_LOG_LEVEL, default INFO)")
    p.set_defaults(run=_serve)


def _sqlite_dir(url: str) -> None:
    """Create the folder of a sqlite store file (the default one is ./.normsvc/) and check that this
    process can write there: sqlite keeps the database and its -wal and -shm files in it.  OSError
    naming the folder otherwise (a container's /data volume that its user cannot write)."""
    if not url.startswith("sqlite:///"):
        return
    path = url[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return
    folder = Path(path).absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        if Path(path).exists() and not os.access(path, os.R_OK | os.W_OK):
            raise PermissionError(13, f"{Path(path).name} is not readable and writable")
    except OSError as exc:
        who = f"uid {os.getuid()}, gid {os.getgid()}" if hasattr(os, "getuid") else "this user"
        raise OSError(f"the store's folder {folder} is not writable ({who}: {exc.strerror or exc}): the sqlite "
                      f"store {url} keeps its database and -wal/-shm files there; give this user a folder it "
                      "can write (in the image: a volume at /data writable by uid 10001), or choose another "
                      "--store (NORMSVC_STORE)") from None


def _warn_numba_cache() -> None:
    """Log when numba does not use NUMBA_CACHE_DIR: it silently caches elsewhere when it cannot write
    there (it probes with a temporary file), so what `normsvc precompile` put there goes unused and
    the first requests compile for seconds."""
    wanted = os.environ.get("NUMBA_CACHE_DIR")
    if not wanted:
        return
    from numba.core.registry import CPUDispatcher

    from .kernels import cpu

    used = next((f.stats.cache_path for f in vars(cpu).values() if isinstance(f, CPUDispatcher)), None)
    wanted = os.path.realpath(wanted)
    if used is not None and os.path.commonpath([wanted, os.path.realpath(used)]) != wanted:
        logging.getLogger("normsvc.server").warning(
            "numba cannot write NUMBA_CACHE_DIR=%s and caches in %s instead: kernels precompiled into "
            "NUMBA_CACHE_DIR are not used, and the first requests compile them (seconds each)", wanted, used)


def _serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import serve
    from .server.limits import Limits
    from .server.malloc import keep_large_blocks

    keep_large_blocks()  # reuse Normalize's large buffers instead of page-faulting fresh ones (see the module)

    _warn_numba_cache()
    limits = Limits(
        max_message_mb=args.max_message_mb,
        max_tensor_elements=args.max_tensor_elements,
        max_layers=args.max_layers,
        max_layers_per_request=args.max_layers_per_request,
        max_streams=args.max_streams,
        max_streams_per_token=args.max_streams_per_token,
        max_stream_mb=args.max_stream_mb,
    )
    stop = threading.Event()
    signals = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signals[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        _sqlite_dir(args.store)
        server = serve(
            args.store,
            host=args.host,
            port=args.port,
            tokens=args.tokens,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            metrics_port=args.metrics_port,
            health_port=args.health_port,
            device=args.device,
            workers=args.workers,
            limits=limits,
            step_lag=args.step_lag,
        )
    except (OSError, ValueError) as exc:
        for sig, previous in signals.items():
            signal.signal(sig, previous)
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

# --- client subcommands: layers list|show|freeze|unfreeze|reset|delete, export, import ---
#
# Each talks to a running server through normsvc.Client; errors print one line
# on stderr and exit 1.

#: Where the client subcommands connect unless --target or NORMSVC_TARGET says otherwise.
DEFAULT_TARGET = "127.0.0.1:50051"


def _connection_options() -> argparse.ArgumentParser:
    """--target, --token, TLS and --timeout, shared by every client subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=_env("TARGET", DEFAULT_TARGET),
                   help=f"server address host:port (NORMSVC_TARGET, default {DEFAULT_TARGET})")
    g.add_argument("--token", default=_env("TOKEN"), help="bearer token (NORMSVC_TOKEN)")
    g.add_argument("--tls", action="store_true", default=bool(_env("TLS")),
                   help="connect with TLS, trusting the system's root certificates (NORMSVC_TLS=1)")
    g.add_argument("--ca", default=_env("CA"),
                   help="PEM CA bundle to trust; implies TLS (NORMSVC_CA)")
    g.add_argument("--client-cert", default=_env("CLIENT_CERT"),
                   help="PEM client certificate, for mutual TLS (NORMSVC_CLIENT_CERT)")
    g.add_argument("--client-key", default=_env("CLIENT_KEY"),
                   help="PEM client key, for mutual TLS (NORMSVC_CLIENT_KEY)")
    g.add_argument("--timeout", type=float, default=_env_number("TIMEOUT", 30.0, float),
                   help="seconds each call may take, retries included (NORMSVC_TIMEOUT, default 30)")
    return p


def _tls(args):
    if args.client_cert or args.client_key:
        return {"root": args.ca, "cert": args.client_cert, "key": args.client_key}
    if args.ca:
        return args.ca
    return True if args.tls else None


def _with_client(command: str, fn):
    """``run`` for a client subcommand: connect, call ``fn(client, args)``, report errors in one line."""

    def run(args) -> int:
        from .client import Client
        from .errors import NormsvcError

        try:
            with Client(args.target, token=args.token, tls=_tls(args), timeout=args.timeout) as client:
                return fn(client, args) or 0
        except (NormsvcError, OSError) as exc:
            print(f"normsvc {command}: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1

    return run


def _table(headers, rows, right=()) -> str:
    """Aligned columns; the columns numbered in ``right`` (numbers) are right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _shape(stats) -> str:
    if stats is None or stats.mean is None:
        return "-"
    return "x".join(str(s) for s in stats.mean.shape) or "scalar"


def _when(stats) -> str:
    import datetime

    if stats is None or not stats.updated_at:
        return "-"
    t = datetime.datetime.fromtimestamp(stats.updated_at, tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _layers_list(client, args) -> None:
    infos = client.describe(prefix=args.prefix)
    if not infos:
        print("no layers" + (f" under prefix {args.prefix!r}" if args.prefix else ""))
        return
    rows = [(i.name, i.config.kind, i.config.convention, f"{i.config.epsilon:g}", _shape(i.stats),
             f"{i.stats.count:g}", i.stats.num_batches, i.stats.version, _yes(i.stats.frozen), _when(i.stats))
            for i in infos]
    headers = ("NAME", "KIND", "CONVENTION", "EPSILON", "SHAPE", "COUNT", "BATCHES", "VERSION", "FROZEN", "UPDATED")
    print(_table(headers, rows, right=(3, 5, 6, 7)))


def _values(array) -> str:
    import numpy as np

    if array is None:
        return "-"
    return np.array2string(np.asarray(array), precision=6, threshold=8, edgeitems=3, max_line_width=1 << 20)


def _epsilon(config) -> str:
    """The resolved epsilon, saying when it is the convention's default (cumulative's 1e-3 surprises RL users)."""
    from .running import DEFAULTS

    text = f"{config.epsilon:g}"
    if config.epsilon == DEFAULTS[config.convention][1]:
        text += f" (the {config.convention} convention's default)"
    return text


def _layers_show(client, args) -> None:
    blocks = []
    for info in client.describe(names=args.names):
        c, s = info.config, info.stats
        axis = list(c.axis) if isinstance(c.axis, tuple) else c.axis
        rows = [
            ("name", info.name), ("kind", c.kind), ("axis", axis), ("convention", c.convention),
            ("momentum", "-" if c.momentum is None else f"{c.momentum:g}"), ("epsilon", _epsilon(c)),
            ("groups", "-" if c.groups is None else c.groups), ("center", _yes(c.center)), ("scale", _yes(c.scale)),
            ("shape", _shape(s)), ("count", f"{s.count:g}"), ("batches", s.num_batches), ("version", s.version),
            ("frozen", _yes(s.frozen)), ("updated", _when(s)), ("mean", _values(s.mean)),
            ("variance", _values(s.variance)),
        ]
        if c.virtual_batch_size is not None:
            rows.insert(9, ("virtual_batch_size", c.virtual_batch_size))
        if c.renorm:
            clipping = ", ".join(f"{k}={v:g}" for k, v in c.renorm_clipping.items()) or "none"
            rows[9:9] = [("renorm", f"yes (momentum {c.renorm_momentum:g}, clipping {clipping})")]
            rows += [(name, _values(value)) for name, value in
                     zip(("moving_stddev", "renorm_mean", "renorm_stddev"), s.renorm or (None,) * 3)]
        width = max(len(k) for k, _ in rows)
        blocks.append("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    print("\n\n".join(blocks))


def _clipping(text: str) -> dict:
    """``rmax=3,rmin=0.33,dmax=5`` -> renorm_clipping (the store checks the keys and values)."""
    out = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"{part!r}: expected KEY=NUMBER with KEY among rmin, rmax, dmax")
    return out


def _axis_option(text: str):
    axes = [int(a) for a in text.split(",")]
    return axes[0] if len(axes) == 1 else axes


def _layers_create(client, args) -> None:
    options = {key: getattr(args, key) for key in ("kind", "convention", "groups", "epsilon", "renorm_clipping",
                                                   "renorm_momentum", "virtual_batch_size")}
    options = {key: value for key, value in options.items() if value is not None}
    if args.axis is not None:
        options["axis"] = args.axis
    if args.momentum is not None:
        options["momentum"] = None if args.momentum == "none" else float(args.momentum)
    if args.num_features is not None:
        options["num_features"] = tuple(int(n) for n in args.num_features.split(","))
    if args.renorm:
        options["renorm"] = True
    client.create_layer(args.name, **options)
    print(f"created {args.name} (or it existed with this config)")


def _layers_state(verb: str, method: str):
    def run(client, args) -> None:
        for name in args.names:
            stats = getattr(client.layer(name), method)()
            print(f"{verb} {name} (version {stats.version})")

    return run


def _layers_delete(client, args) -> None:
    for name in args.names:
        client.delete_layer(name)
        print(f"deleted {name}")


def _add_layers(sub) -> None:
    common = _connection_options()
    p = sub.add_parser("layers", help="list, show, create, freeze, unfreeze, reset or delete layers on a server",
                       description="Inspect and manage the layers of a running server.")
    layers = p.add_subparsers(dest="action", metavar="ACTION")
    layers.required = True
    q = layers.add_parser("list", parents=[common], help="a table of the layers",
                          description="A table of the layers (optionally under a name prefix).")
    q.add_argument("--prefix", default="", help="only layers whose name starts with this")
    q.set_defaults(run=_with_client("layers list", _layers_list))
    q = layers.add_parser("show", parents=[common], help="config and running statistics of layers",
                          description="Config and running statistics of the named layers.")
    q.add_argument("names", nargs="+", metavar="NAME")
    q.set_defaults(run=_with_client("layers show", _layers_show))
    q = layers.add_parser("create", parents=[common], help="create a layer (nothing changes if it exists alike)",
                          description="Create a layer with create_layer's options; an existing layer with the "
                                      "same config is left as it is, one with another config is an error.")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--kind", choices=("batch", "layer", "instance", "group", "rms"), help="default batch")
    q.add_argument("--convention", choices=("keras", "torch", "cumulative"), help="default keras")
    q.add_argument("--axis", type=_axis_option, metavar="AXIS[,AXIS...]", help="default: per convention")
    q.add_argument("--groups", type=int, help="group norm's groups (default 32, -1: one per channel)")
    q.add_argument("--epsilon", type=float, help="default: per convention")
    q.add_argument("--momentum", metavar="M|none", help="default: per convention; none: torch's cumulative average")
    q.add_argument("--num-features", metavar="N[,N...]", help="the statistics shape (default: from the first batch)")
    q.add_argument("--renorm", action="store_true", help="batch renormalization (tf.keras renorm=True)")
    q.add_argument("--renorm-clipping", type=_clipping, metavar="rmin=A,rmax=B,dmax=C",
                   help="renorm's clipping bounds (default none)")
    q.add_argument("--renorm-momentum", type=float, help="renorm's momentum (default 0.99)")
    q.add_argument("--virtual-batch-size", type=int, metavar="V", help="tf.keras' virtual (ghost) batches of V samples")
    q.set_defaults(run=_with_client("layers create", _layers_create))
    for action, verb, method, what in (
        ("freeze", "froze", "freeze", "stop taking updates (normalize with the running statistics)"),
        ("unfreeze", "unfroze", "unfreeze", "take updates again"),
        ("reset", "reset", "reset", "forget the running statistics (keep the config)"),
    ):
        q = layers.add_parser(action, parents=[common], help=what, description=f"Layers {what}.")
        q.add_argument("names", nargs="+", metavar="NAME")
        q.set_defaults(run=_with_client(f"layers {action}", _layers_state(verb, method)))
    q = layers.add_parser("delete", parents=[common], help="delete layers and their statistics",
                          description="Delete layers and their statistics (there is no undo).")
    q.add_argument("names", nargs="+", metavar="NAME")
    q.set_defaults(run=_with_client("layers delete", _layers_delete))


def _export(client, args) -> None:
    names = client.export(args.path, layers=args.layer or None, naming=args.naming, prefix=args.prefix,
                          strip_prefix=args.strip_prefix, dtype=args.dtype)
    print(f"exported {len(names)} layer{'s' if len(names) != 1 else ''} to {args.path}")


def _import(client, args) -> None:
    names = client.import_(args.path, naming=args.naming, layers=args.layer or None, add_prefix=args.add_prefix)
    print(f"imported {len(names)} layer{'s' if len(names) != 1 else ''} from {args.path}"
          + (f": {', '.join(names)}" if names else ""))


def _add_export_import(sub) -> None:
    common = _connection_options()
    p = sub.add_parser("export", parents=[common], help="write running statistics to a safetensors file",
                       description="Write the server's running statistics to a local safetensors file, "
                       "with Keras (<layer>/moving_mean) or PyTorch (<layer>.running_mean) names.")
    p.add_argument("path", help="the file to write (replaced atomically)")
    p.add_argument("--layer", action="append", metavar="NAME", help="only this layer (repeat for more)")
    p.add_argument("--prefix", help="only the layers whose names start with this (e.g. resnet50/)")
    p.add_argument("--strip-prefix", nargs="?", const=True, metavar="PREFIX",
                   help="remove this from every layer name in the file; alone: remove --prefix")
    p.add_argument("--naming", choices=("keras", "torch"), default="keras", help="tensor names (default keras)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="tensor type (default float64)")
    p.set_defaults(run=_with_client("export", _export))
    p = sub.add_parser("import", parents=[common], help="load running statistics from a safetensors file",
                       description="Load running statistics from a local safetensors file into the server "
                       "(missing layers are created), in one transaction.")
    p.add_argument("path", help="the safetensors file to read")
    p.add_argument("--layer", action="append", metavar="NAME",
                   help="only this layer, named as in the file (repeat for more)")
    p.add_argument("--add-prefix", metavar="PREFIX",
                   help="put this before every layer name of the file (e.g. resnet50/)")
    p.add_argument("--naming", choices=("keras", "torch"), default="keras", help="tensor names (default keras)")
    p.set_defaults(run=_with_client("import", _import))


def _precompile(args) -> int:
    from .precompile import precompile

    seconds = precompile()
    cache = os.environ.get("NUMBA_CACHE_DIR") or "__pycache__ beside the normsvc modules"
    print(f"normsvc precompile: kernels and update paths compiled in {seconds:.1f} s, cached in {cache}")
    return 0


def _add_precompile(sub) -> None:
    p = sub.add_parser("precompile", help="compile the CPU kernels and update paths into numba's disk cache",
                       description="Compile every jitted path a server takes into numba's on-disk cache "
                                   "(NUMBA_CACHE_DIR), so that the next processes load it instead of compiling "
                                   "(container images run this at build time).")
    p.set_defaults(run=_precompile)


#: Subcommands: each adds its parser (and sets ``run``) on the subparsers object.
SUBCOMMANDS = [_add_serve, _add_layers, _add_export_import, _add_precompile]


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
