"""The deploy/ folder: its configuration names real options, its health check works.

No Docker engine runs here, so the image itself is not built; these tests
keep the files it is made of honest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from normsvc.server import serve

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
FILES = [DEPLOY / "Dockerfile", DEPLOY / "compose.yaml", *sorted((DEPLOY / "k8s").glob("*.yaml"))]


def _serve_help() -> str:
    out = subprocess.run([sys.executable, "-m", "normsvc.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout


def test_every_normsvc_variable_in_deploy_files_is_a_serve_option():
    help_text = _serve_help()
    used = {name for f in FILES for name in re.findall(r"NORMSVC_[A-Z_]+", f.read_text())}
    assert used, "deploy files configure the server through NORMSVC_* variables"
    unknown = sorted(name for name in used if name not in help_text)
    assert not unknown, f"deploy files set variables `normsvc serve` does not read: {unknown}"


def test_the_image_precompiles_into_its_numba_cache():
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "NUMBA_CACHE_DIR=" in docker
    assert "normsvc precompile" in docker  # tests/test_precompile.py: a server then compiles nothing


def test_ports_agree_across_dockerfile_compose_and_k8s():
    docker = (DEPLOY / "Dockerfile").read_text()
    assert "EXPOSE 50051 9090" in docker
    assert "NORMSVC_PORT=50051" in docker and "NORMSVC_METRICS_PORT=9090" in docker
    compose = (DEPLOY / "compose.yaml").read_text()
    assert '"50051:50051"' in compose and '"9090:9090"' in compose
    k8s = (DEPLOY / "k8s" / "statefulset.yaml").read_text()
    assert "containerPort: 50051" in k8s and "containerPort: 9090" in k8s


def _healthcheck(port: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, NORMSVC_PORT=str(port))
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_container_healthcheck_follows_the_server():
    server = serve("memory://", port=0)
    port = server.port
    try:
        ok = _healthcheck(port)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop(0)
    down = _healthcheck(port)
    assert down.returncode == 1
    assert "UNAVAILABLE" in down.stderr
