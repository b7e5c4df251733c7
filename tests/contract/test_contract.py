"""Cross-language contract: a Node.js client built from protos/ alone checks the proto's promises.

``contract.js`` (next to this file) uses @grpc/grpc-js and @grpc/proto-loader
and knows nothing but ``protos/normsvc/v1/*.proto``: every message, field path,
status code and error detail it expects is what the proto says.  This test
starts a real server (and a second one with bearer tokens), installs the Node
packages from the committed package-lock.json when ``node_modules`` is missing
(``npm ci``), runs the checks and asserts that all of them pass.

Without node and npm, or when ``npm ci`` cannot fetch the packages (offline),
the test skips and says why; CI installs node (``.ci/run``), and with ``CI``
set in the environment those cases fail instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MIN_NODE = 18
LIMITS = {"max_tensor_elements": 1 << 16, "max_layers_per_request": 64}


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set, so the contract test must run)")
    pytest.skip(reason)


def _node() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("the Node.js contract client needs node and npm on PATH "
                     "(apt-get install nodejs npm; CI installs them)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = re.match(r"v(\d+)", version)
    if major is None or int(major.group(1)) < MIN_NODE:
        _unavailable(f"the Node.js contract client needs node >= {MIN_NODE}, found {version or 'an unknown version'}")
    return node, npm


def _node_modules(npm: str) -> None:
    if (HERE / "node_modules" / "@grpc" / "grpc-js" / "package.json").exists() and \
            (HERE / "node_modules" / "@grpc" / "proto-loader" / "package.json").exists():
        return
    try:
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, capture_output=True, text=True,
                              timeout=600)
    except subprocess.TimeoutExpired:
        _unavailable("npm ci (tests/contract) timed out: the npm registry is unreachable?")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        _unavailable(f"npm ci (tests/contract) failed, offline? It said:\n{tail}")


@pytest.fixture
def contract_servers(start_server, tmp_path):
    """A server with request limits the checks exceed on purpose, and one that wants bearer tokens."""
    from normsvc.server.limits import Limits

    server = start_server("memory://", limits=Limits(**LIMITS), allreduce_max_wait=60.0)
    tokens = {"admin": "contract-admin-token", "reader": "contract-read-token"}
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"tokens": [
        {"name": "admin", "token": tokens["admin"], "role": "admin"},
        {"name": "reader", "token": tokens["reader"], "role": "read"},
    ]}))
    secured = start_server("memory://", tokens=str(tokens_file))
    return {
        "target": f"127.0.0.1:{server.port}",
        "limits": LIMITS,
        "auth": {"target": f"127.0.0.1:{secured.port}", **tokens},
    }


def test_a_node_client_finds_every_promise_of_the_proto_kept(contract_servers, tmp_path):
    node, npm = _node()
    _node_modules(npm)
    config = tmp_path / "contract.json"
    config.write_text(json.dumps(contract_servers))
    done = subprocess.run([node, str(HERE / "contract.js"), str(config)], cwd=HERE, capture_output=True, text=True,
                          timeout=600)
    out = done.stdout + done.stderr
    print(out)  # every check, shown by pytest on failure (or with -s)
    summary = re.search(r"^(\d+) passed, (\d+) failed$", done.stdout, re.M)
    assert summary is not None, f"the Node client did not finish (exit {done.returncode}):\n{out[-4000:]}"
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    assert done.returncode == 0 and summary.group(2) == "0", (
        f"{summary.group(0)}; the proto promises what the server does not do:\n" + "\n".join(failures))
    assert int(summary.group(1)) >= 1000, f"only {summary.group(1)} checks ran"
