"""Fuzz every RPC of NormService: hypothesis-built request messages and mutated bytes, over raw channels.

`normsvc serve` runs on a sqlite file.  Each input goes to one of the 14
methods through a channel with identity serializers (the bytes reach the
server as generated), drawn from three sources:

* structured: a request message built field by field from its descriptor
  (names near and far from valid, edge integers, NaN/Inf, unknown enum
  numbers, tensors whose dtype, shape and bytes agree or not);
* mutated: a valid request's bytes with bits flipped, bytes inserted,
  deleted, truncated or repeated;
* valid: a valid request as is (so that accepted calls change the state the
  other inputs meet).

After every input: the status code must be one the proto documents for a
caller without faults of the server (OK, INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED;
CANCELLED for a stream this script cancels); an error the server produced
must carry its google.rpc.ErrorInfo (domain "normsvc"); the server process
must be alive; and a rejected request must leave every layer (name, config,
statistics, updated_at) as it was.  The health check must answer at the end;
the server's RSS is sampled every 100 inputs.

    python scripts/reliability/fuzz.py --rounds 1000
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `reliability` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor as FD
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings, strategies as st

from reliability.common import (
    METHODS, Deadline, ServerProcess, encode, fingerprint, healthy, machine, moments_pb, parser, pb, pb_grpc,
    print_table, raw_method,
)

#: codes a server without faults answers a client without faults (the proto's "Errors"), plus
#: CANCELLED for WatchLayer streams this script cancels after their first message
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS",
              "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}
#: the server's --max-tensor-elements here: a fuzzed layer may hold this many statistics per tensor
MAX_TENSOR_ELEMENTS = 65536
MAX_MESSAGE = 64 << 20
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
TIMEOUTS = {"AllReduceMoments": 1.0, "AllReduceMomentsStream": 2.0, "WatchLayer": 2.0}
TIMEOUT = 20.0

LAYERS = {  # the layers the inputs meet: name -> config
    "fz/bn": pb.LayerConfig(num_features=[4]),
    "fz/torch": pb.LayerConfig(convention=pb.CONVENTION_TORCH, num_features=[4]),
    "fz/cum": pb.LayerConfig(convention=pb.CONVENTION_CUMULATIVE),
    "fz/ln": pb.LayerConfig(kind=pb.LAYER_KIND_LAYER),
    "fz/gn": pb.LayerConfig(kind=pb.LAYER_KIND_GROUP, groups=2),
    "fz/frozen": pb.LayerConfig(num_features=[4]),
    "fz/victim": pb.LayerConfig(),
}
NAMES = [*LAYERS, "fz/new", "fz/imp/bn", "nope", "", "a" * 257, "a//b", "/a", "a/", "fz/\u00e9", "fz/bn\x00",
         "fz", "fz/", "../etc", "x" * 256]
PREFIXES = ["", "fz/", "fz/b", "nope/", "fz/imp/", "a" * 300, "/"]
INT32 = [-(1 << 31), -1, 0, 1, 2, 3, 4, 7, 8, 100, 1000, 1001, 4096, 4097, (1 << 31) - 1]
INT64 = INT32 + [-(1 << 63), (1 << 28) + 1, 1 << 40, (1 << 63) - 1]
DOUBLES = [0.0, -0.0, 1e-5, 1e-3, 0.1, 0.5, 0.99, 1.0, 1.5, -1.0, 1e308, 5e-324, float("nan"), float("inf"),
           float("-inf")]
ENUM = [-1, 0, 1, 2, 3, 4, 5, 6, 99, (1 << 31) - 1]


# --- strategies --------------------------------------------------------------------------------

def _strings(name: str):
    if name in ("name", "layer", "names"):
        return st.one_of(st.sampled_from(list(LAYERS)), st.sampled_from(NAMES), st.text(max_size=12))
    if name in ("prefix", "add_prefix", "strip_prefix"):
        return st.one_of(st.sampled_from(PREFIXES), st.text(max_size=12))
    return st.one_of(st.sampled_from(["", "r", "run-1", "id-1", "x" * 300]), st.text(max_size=12))


@st.composite
def tensors(draw, features=None):
    dtype = draw(st.sampled_from([0, 1, 2, 3, 3, 3, 4, -1]))
    if features is not None and draw(st.booleans()):
        shape = [features]
    else:
        shape = draw(st.lists(st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 1 << 20, 1 << 31, 1 << 62]), max_size=4))
    n = int(np.prod(shape, dtype=object)) if shape else 1
    itemsize = {1: 2, 2: 4, 3: 8}.get(dtype, 8)
    if 0 <= n <= 4096 and dtype in (1, 2, 3) and draw(st.booleans()):
        values = draw(st.lists(st.sampled_from(DOUBLES[:12]) | st.floats(-1e3, 1e3), min_size=n, max_size=n))
        with np.errstate(all="ignore"):  # values beyond float16/float32: inf, as a client might send
            data = np.asarray(values, dtype=np.float64).astype({1: "<f2", 2: "<f4", 3: "<f8"}[dtype]).tobytes()
        data = data + draw(st.sampled_from([b"", b"", b"\x00", b"\x00" * itemsize]))
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def moments(draw):
    f = draw(st.sampled_from([1, 2, 4, 8]))
    if draw(st.booleans()):  # agreeing shapes, maybe bad values
        count = draw(st.sampled_from([0.0, 1.0, 2.0, 16.0, -1.0, float("nan"), 1e300]))
        mean = draw(st.lists(st.floats(-10, 10) | st.sampled_from(DOUBLES), min_size=f, max_size=f))
        var = draw(st.lists(st.floats(0, 10) | st.sampled_from(DOUBLES), min_size=f, max_size=f))
        with np.errstate(all="ignore"):
            m = moments_pb(count, mean, np.asarray(var) * count) if np.isfinite(count) and count > 0 else None
        if m is not None:
            return m
    return pb.Moments(count=draw(tensors()), mean=draw(tensors(f)), variance=draw(tensors(f)))


def _scalar(fd: FD):
    if fd.type == FD.TYPE_STRING:
        return _strings(fd.name)
    if fd.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if fd.type == FD.TYPE_BOOL:
        return st.booleans()
    if fd.type == FD.TYPE_ENUM:
        return st.sampled_from(ENUM)
    if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.sampled_from(DOUBLES) | st.floats(allow_nan=True, allow_infinity=True)
    if fd.type in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return st.sampled_from(INT64) | st.integers(-10, 10)
    return st.sampled_from(INT32) | st.integers(-10, 10)


_MESSAGES = {}


def messages(descriptor, depth: int = 0):
    """Messages of ``descriptor``: each field left unset or drawn from its strategy."""
    key = (descriptor.full_name, depth)
    if key not in _MESSAGES:
        _MESSAGES[key] = _messages(descriptor, depth)
    return _MESSAGES[key]


def field_values(fd: FD, depth: int = 0):
    """Values of field ``fd`` (lists for a repeated one); None for a message field too deep to build."""
    if fd.type == FD.TYPE_MESSAGE:
        full = fd.message_type.full_name
        if full == "normsvc.v1.Tensor":
            value = tensors()
        elif full == "normsvc.v1.Moments":
            value = moments()
        elif depth >= 3:
            return None
        else:
            value = messages(fd.message_type, depth + 1)
    else:
        value = _scalar(fd)
    return st.lists(value, max_size=4) if fd.is_repeated else value


def set_field(msg, fd: FD, value) -> None:
    if fd.is_repeated:
        target = getattr(msg, fd.name)
        del target[:]
        if fd.type == FD.TYPE_MESSAGE:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif fd.type == FD.TYPE_MESSAGE:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


def _messages(descriptor, depth: int):
    fields = {fd.name: field_values(fd, depth) for fd in descriptor.fields}
    fields = {name: values for name, values in fields.items() if values is not None}
    cls = _class(descriptor)

    def build(values):
        msg = cls()
        for name, value in values.items():
            set_field(msg, descriptor.fields_by_name[name], value)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


@st.composite
def one_field(draw, data: bytes, descriptor) -> bytes:
    """A valid request with one top-level field cleared or given a fuzzed value."""
    msg = _class(descriptor).FromString(data)
    fd = draw(st.sampled_from(list(descriptor.fields)))
    if draw(st.integers(0, 4)) == 0:
        msg.ClearField(fd.name)
    else:
        set_field(msg, fd, draw(field_values(fd)))
    return msg.SerializeToString()


def _class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def _input_type(method: str):
    return pb.DESCRIPTOR.services_by_name["NormService"].methods_by_name[method].input_type


@st.composite
def mutated(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "repeat", "append"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat":
            data += data[at:at + draw(st.integers(1, 32))]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# --- valid requests (the seeds) ------------------------------------------------------------------

def seeds(imported: bytes) -> dict:
    """method -> list of valid requests, each a list of serialized messages (one, except for the streams)."""
    rng = np.random.default_rng(0)

    def m(f=4):
        return moments_pb(8.0, rng.normal(size=f), rng.uniform(1, 2, size=f) * 8)

    x = encode(rng.normal(size=(4, 8)))
    header = pb.NormalizeStreamHeader(layer="fz/ln", dtype=pb.DTYPE_FLOAT64, shape=[4, 8], mode=pb.MODE_TRAINING)
    out = {
        "CreateLayer": [pb.CreateLayerRequest(name="fz/new", config=pb.LayerConfig(num_features=[4])),
                        pb.CreateLayerRequest(name="fz/victim"),
                        pb.CreateLayerRequest(name="fz/bn", config=pb.LayerConfig(num_features=[8]))],
        "GetLayer": [pb.GetLayerRequest(names=["fz/bn", "fz/ln"])],
        "ListLayers": [pb.ListLayersRequest(prefix="fz/", page_size=2, include_stats=True)],
        "DeleteLayer": [pb.DeleteLayerRequest(name="fz/victim")],
        "ResetStats": [pb.ResetStatsRequest(name="fz/torch", request_id="reset-1")],
        "UpdateStats": [pb.UpdateStatsRequest(updates=[pb.LayerMoments(layer="fz/bn", moments=m()),
                                                       pb.LayerMoments(layer="fz/torch", moments=m())]),
                        pb.UpdateStatsRequest(updates=[pb.LayerMoments(layer="fz/cum", moments=m(2))], step=1,
                                              rank=0, world_size=2, run="r"),
                        pb.UpdateStatsRequest(updates=[pb.LayerMoments(layer="fz/frozen", moments=m())],
                                              request_id="frozen-1")],
        "AllReduceMoments": [pb.AllReduceMomentsRequest(step=3, rank=0, world_size=1, run="ar",
                                                        moments=[pb.LayerMoments(layer="fz/bn", moments=m())])],
        "AllReduceMomentsStream": [[pb.AllReduceMomentsRequest(
            step=s, rank=0, world_size=1, run="ars", wait_seconds=1, update_stats=False,
            moments=[pb.LayerMoments(layer="fz/bn", moments=m(8))]) for s in (4, 5)]],
        "WatchLayer": [pb.WatchLayerRequest(names=["fz/bn", "fz/gn"])],
        "Normalize": [pb.NormalizeRequest(layer="fz/ln", x=x, mode=pb.MODE_TRAINING),
                      pb.NormalizeRequest(layer="fz/bn", x=encode(rng.normal(size=(3, 4))), mode=pb.MODE_INFERENCE),
                      pb.NormalizeRequest(layer="fz/cum", x=encode(rng.normal(size=(3, 4))), mode=pb.MODE_INFERENCE)],
        "NormalizeStream": [[pb.NormalizeStreamRequest(header=header),
                             pb.NormalizeStreamRequest(chunk=rng.normal(size=(4, 8)).tobytes())]],
        "Freeze": [pb.FreezeRequest(name="fz/frozen")],
        "Unfreeze": [pb.UnfreezeRequest(name="fz/frozen")],
        "ExportStats": [pb.ExportStatsRequest(prefix="fz/", naming=pb.NAMING_TORCH)],
        "ImportStats": [pb.ImportStatsRequest(safetensors=imported, add_prefix="fz/imp/")],
    }
    return {method: [[r.SerializeToString() for r in (v if isinstance(v, list) else [v])] for v in values]
            for method, values in out.items()}


@st.composite
def inputs(draw, valid: dict):
    """(method, source, list of serialized messages)."""
    method = draw(st.sampled_from(sorted(METHODS)))
    source = draw(st.sampled_from(["structured"] * 6 + ["one field"] * 6 + ["mutated"] * 6 + ["valid"] * 2))
    seed_messages = draw(st.sampled_from(valid[method]))
    if source == "valid":
        return method, source, seed_messages
    if source == "mutated":
        k = draw(st.integers(0, len(seed_messages) - 1))
        return method, source, seed_messages[:k] + [draw(mutated(seed_messages[k]))] + seed_messages[k + 1:]
    if source == "one field":
        descriptor = pb.NormalizeStreamHeader.DESCRIPTOR if method == "NormalizeStream" else _input_type(method)
        if method == "NormalizeStream":
            header = pb.NormalizeStreamRequest.FromString(seed_messages[0]).header.SerializeToString()
            changed = pb.NormalizeStreamHeader.FromString(draw(one_field(header, descriptor)))
            return method, source, [pb.NormalizeStreamRequest(header=changed).SerializeToString(), *seed_messages[1:]]
        return method, source, [draw(one_field(seed_messages[0], descriptor))]
    if method == "NormalizeStream":
        part = messages(pb.NormalizeStreamRequest.DESCRIPTOR)
        first = draw(messages(pb.NormalizeStreamHeader.DESCRIPTOR).map(lambda h: pb.NormalizeStreamRequest(header=h))
                     | part)
        rest = draw(st.lists(part | st.binary(max_size=64).map(lambda b: pb.NormalizeStreamRequest(chunk=b)),
                             max_size=3))
        return method, source, [msg.SerializeToString() for msg in [first, *rest]]
    return method, source, [draw(messages(_input_type(method))).SerializeToString()]


# --- calling ---------------------------------------------------------------------------------

def call(channel, method: str, payload: list):
    """(code name, error or None); streams are read to their end, WatchLayer until its first message."""
    rpc = raw_method(channel, method)
    timeout = TIMEOUTS.get(method, TIMEOUT)
    try:
        if method == "WatchLayer":
            stream = rpc(payload[0], timeout=timeout)
            try:
                next(stream, None)
            finally:
                stream.cancel()
            return "OK", None
        if method in ("NormalizeStream", "AllReduceMomentsStream"):
            for _ in rpc(iter(payload), timeout=timeout):
                pass
            return "OK", None
        rpc(payload[0], timeout=timeout)
        return "OK", None
    except grpc.RpcError as exc:
        if method == "WatchLayer" and exc.code() == grpc.StatusCode.CANCELLED:
            return "OK", None  # cancelled by us after its first message
        return exc.code().name, exc


def has_error_info(exc) -> bool:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == "normsvc":
                    return True
    return False


@dataclass
class Result:
    inputs: int = 0
    seconds: float = 0.0
    codes: collections.Counter = field(default_factory=collections.Counter)
    by_method: collections.Counter = field(default_factory=collections.Counter)
    by_source: collections.Counter = field(default_factory=collections.Counter)
    undocumented: list = field(default_factory=list)
    no_error_info: list = field(default_factory=list)
    state_changed: list = field(default_factory=list)
    crashed: list = field(default_factory=list)
    healthy_after: bool = False
    longest_message: int = 0
    rss_mib: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (not self.undocumented and not self.no_error_info and not self.state_changed and not self.crashed
                and self.healthy_after)


def _example(method, payload) -> str:
    return f"{method} {[p[:200].hex() for p in payload]}"


def run(rounds: int = 1000, seconds: float = 900.0, seed: int = 0, folder=None, log=print) -> Result:
    result = Result()
    started = time.monotonic()
    budget = Deadline(seconds)
    with tempfile.TemporaryDirectory(prefix="normsvc-fuzz-", dir=folder) as tmp, \
            ServerProcess(f"sqlite:///{Path(tmp) / 'fuzz.db'}", "--max-tensor-elements", str(MAX_TENSOR_ELEMENTS)) \
            as server, server.channel(options=OPTIONS) as channel:
        stub = pb_grpc.NormServiceStub(channel)
        for name, config in LAYERS.items():
            stub.CreateLayer(pb.CreateLayerRequest(name=name, config=config), timeout=TIMEOUT)
        stub.Freeze(pb.FreezeRequest(name="fz/frozen"), timeout=TIMEOUT)
        imported = stub.ExportStats(pb.ExportStatsRequest(names=["fz/bn", "fz/torch"]), timeout=TIMEOUT).safetensors
        valid = seeds(imported)
        state = [fingerprint(stub)]
        result.rss_mib.append(server.rss_mib())

        @hypothesis_seed(seed)
        @settings(max_examples=rounds, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(inputs(valid))
        def one(drawn):
            method, source, payload = drawn
            if budget.expired() or result.crashed:
                return
            result.inputs += 1
            result.by_method[method] += 1
            result.by_source[source] += 1
            code, exc = call(channel, method, payload)
            result.codes[code] += 1
            if code not in DOCUMENTED:
                result.undocumented.append(f"{code} {exc.details() if exc else ''}: {_example(method, payload)}")
            elif exc is not None and code not in ("DEADLINE_EXCEEDED", "CANCELLED") and not has_error_info(exc):
                result.no_error_info.append(f"{code} {exc.details()}: {_example(method, payload)}")
            if exc is not None:
                result.longest_message = max(result.longest_message, len(exc.details() or ""))
            if server.proc.poll() is not None:
                result.crashed.append(f"exit code {server.proc.returncode} after {_example(method, payload)}")
                return
            now = fingerprint(stub)
            if code != "OK" and now != state[0]:
                result.state_changed.append(f"{code}: {_example(method, payload)}")
            state[0] = now
            if result.inputs % 100 == 0:
                result.rss_mib.append(server.rss_mib())
                log(f"  {result.inputs} inputs, codes {dict(result.codes)}, RSS {result.rss_mib[-1]:.0f} MiB")

        one()
        result.healthy_after = server.proc.poll() is None and healthy(channel)
        result.rss_mib.append(server.rss_mib())
    result.seconds = time.monotonic() - started
    return result


def report(result: Result) -> None:
    print_table(f"{result.inputs} fuzz inputs in {result.seconds:.0f} s", ("status code", "answers"),
                sorted(result.codes.items(), key=lambda kv: -kv[1]))
    print_table("inputs", ("method", "inputs"), sorted(result.by_method.items()))
    print_table("checks", ("check", "value"), [
        ("inputs (structured / one field changed / mutated bytes / valid)",
         f"{result.inputs} ({result.by_source['structured']} / {result.by_source['one field']} / "
         f"{result.by_source['mutated']} / {result.by_source['valid']})"),
        ("status codes outside the documented ones", len(result.undocumented)),
        ("errors without google.rpc.ErrorInfo", len(result.no_error_info)),
        ("rejected requests that changed the state", len(result.state_changed)),
        ("server crashes", len(result.crashed)),
        ("health check answers SERVING after", result.healthy_after),
        ("longest error message (characters)", result.longest_message),
        ("server RSS MiB: start / max / end", f"{result.rss_mib[0]:.0f} / {max(result.rss_mib):.0f} / "
                                              f"{result.rss_mib[-1]:.0f}"),
    ])
    for line in (result.undocumented + result.no_error_info + result.state_changed + result.crashed)[:10]:
        print("  " + line[:600])


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0], rounds=1000, seconds=900.0, rounds_help="fuzz inputs",
               seconds_help="time limit (inputs left are skipped)")
    args = p.parse_args(argv)
    print(machine(), flush=True)
    result = run(args.rounds, args.seconds, args.seed)
    report(result)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
