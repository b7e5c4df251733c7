#!/usr/bin/env python3
"""Regenerate the committed gRPC stubs in normsvc/_proto from protos/.

    python scripts/gen_proto.py            # rewrite normsvc/_proto
    python scripts/gen_proto.py --out DIR  # write into DIR instead (the test does this)

Uses grpcio-tools' bundled protoc (``--python_out --pyi_out --grpc_python_out``),
so the output depends only on the .proto files and the grpcio-tools version,
which is recorded in the generated ``__init__.py``.  protoc names modules after
the proto path (``normsvc/v1/normsvc_pb2.py``), whose absolute import
``normsvc.v1`` would collide with this package; the stubs are therefore
flattened into one package and the grpc module imports its messages
relatively.  The descriptors keep their proto path, ``normsvc/v1/normsvc.proto``,
which is what server reflection and grpcurl show.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTOS = ["normsvc/v1/normsvc.proto"]
DEFAULT_OUT = ROOT / "normsvc" / "_proto"

INIT = '''\
"""Generated gRPC stubs for normsvc.v1 (do not edit; run scripts/gen_proto.py).

grpcio-tools {version}
"""

from . import normsvc_pb2, normsvc_pb2_grpc

__all__ = ["normsvc_pb2", "normsvc_pb2_grpc"]
'''


def generate(out: Path) -> list[Path]:
    """Write the stubs into ``out`` (created if missing) and return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTOS,
        ]
        # protoc resolves the proto paths against the -I roots, so run from the repo root.
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed: {' '.join(args)}")
        for proto in PROTOS:
            stem = Path(proto).with_suffix("")
            for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
                src = Path(tmp) / f"{stem}{suffix}"
                text = src.read_text()
                # from normsvc.v1 import normsvc_pb2 as ...  ->  from . import normsvc_pb2 as ...
                package = ".".join(stem.parent.parts)
                text = re.sub(rf"^from {re.escape(package)} import ", "from . import ", text, flags=re.M)
                dst = out / f"{stem.name}{suffix}"
                dst.write_text(text)
                written.append(dst)
    init = out / "__init__.py"
    init.write_text(INIT.format(version=metadata.version("grpcio-tools")))
    written.append(init)
    return sorted(written)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output package folder")
    args = parser.parse_args(argv)
    if args.out.resolve() == DEFAULT_OUT.resolve() and DEFAULT_OUT.exists():
        shutil.rmtree(DEFAULT_OUT)  # drop stubs of removed protos
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
