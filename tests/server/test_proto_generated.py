"""The committed stubs in normsvc/_proto are exactly what scripts/gen_proto.py generates."""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "normsvc" / "_proto"

pytest.importorskip("grpc_tools", reason="grpcio-tools is in the test extra")


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_the_stubs_changes_nothing(tmp_path):
    recorded = re.search(r"grpcio-tools (\S+)", (COMMITTED / "__init__.py").read_text()).group(1)
    installed = metadata.version("grpcio-tools")
    if recorded != installed:
        pytest.skip(f"stubs were generated with grpcio-tools {recorded}, {installed} is installed")
    written = _gen_module().generate(tmp_path / "_proto")
    fresh = {p.name: p.read_bytes() for p in written}
    committed = {p.name: p.read_bytes() for p in COMMITTED.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed), "run: python scripts/gen_proto.py"
    for name in fresh:
        assert fresh[name] == committed[name], f"normsvc/_proto/{name} is stale: run python scripts/gen_proto.py"


def test_stubs_import_as_part_of_the_package():
    from normsvc._proto import normsvc_pb2, normsvc_pb2_grpc

    service = normsvc_pb2.DESCRIPTOR.services_by_name["NormService"]
    assert normsvc_pb2.DESCRIPTOR.name == "normsvc/v1/normsvc.proto"
    assert normsvc_pb2.DESCRIPTOR.package == "normsvc.v1"
    assert set(service.methods_by_name) == {
        "CreateLayer", "GetLayer", "ListLayers", "DeleteLayer", "ResetStats", "UpdateStats",
        "AllReduceMoments", "AllReduceMomentsStream", "WatchLayer", "Normalize", "NormalizeStream", "Freeze",
        "Unfreeze", "ExportStats", "ImportStats",
    }
    assert hasattr(normsvc_pb2_grpc, "NormServiceStub")
