"""The deploy/ folder: its files name real options and agree with each other, and what the image
relies on (the health check, the stop grace, the data-folder check) works against real servers.

The image itself is checked by the tests at the end, where a Docker engine answers and an image
is built (``docker build -f deploy/Dockerfile -t normsvc .``; another tag: NORMSVC_IMAGE).  They
never build it and skip otherwise; CI has no engine, so they are no part of CI.  docs/deploy.md
records the manual runs: the build, first-request times, TLS, stop, read-only, compose.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import normsvc
from normsvc import cli
from normsvc.server import serve
from normsvc.store import Store

from first_requests import make_first_requests

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = [DEPLOY / "compose.yaml", DEPLOY / "compose.sqlite.yaml"]
K8S = sorted((DEPLOY / "k8s").rglob("*.yaml"))
FILES = [DEPLOY / "Dockerfile", DEPLOY / "entrypoint.sh", DEPLOY / "healthcheck.py", *COMPOSE, *K8S]
DOCKER_STOP_TIMEOUT = 10  # seconds `docker stop` waits before SIGKILL, unless told otherwise


def _serve_help() -> str:
    out = subprocess.run([sys.executable, "-m", "normsvc.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout


def _dockerfile_env() -> dict:
    """The image's ENV, name -> value."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def _compose(path: Path) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


def _seconds(text) -> float:
    """A compose duration (``30s``, ``1m30s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- the files ---------------------------------------------------------------------------------

def test_every_normsvc_variable_in_deploy_files_is_a_serve_option():
    help_text = _serve_help()
    used = {name for f in FILES for name in re.findall(r"NORMSVC_[A-Z_]+", f.read_text())}
    assert used, "deploy files configure the server through NORMSVC_* variables"
    unknown = sorted(name for name in used if f"({name}" not in help_text)
    assert not unknown, f"deploy files set variables `normsvc serve` does not read: {unknown}"


def test_the_image_precompiles_and_links_the_cache_where_numba_can_write():
    docker = (DEPLOY / "Dockerfile").read_text()
    entrypoint = (DEPLOY / "entrypoint.sh").read_text()
    precompiled = re.search(r"^precompiled=(\S+)$", entrypoint, re.M).group(1)
    assert f"NUMBA_CACHE_DIR={precompiled} normsvc precompile" in docker  # tests/test_precompile.py
    runtime = _dockerfile_env()["NUMBA_CACHE_DIR"]
    assert runtime.startswith("/tmp/"), "the runtime cache must be writable: under /tmp, a tmpfs when read-only"
    assert 'ENTRYPOINT ["/bin/sh", "/opt/normsvc/entrypoint.sh"]' in docker
    assert 'exec "$@"' in entrypoint  # the server replaces the shell: SIGTERM reaches it


def test_ports_agree_across_dockerfile_compose_and_k8s():
    docker = (DEPLOY / "Dockerfile").read_text()
    env = _dockerfile_env()
    ports = {env["NORMSVC_PORT"], env["NORMSVC_HEALTH_PORT"], env["NORMSVC_METRICS_PORT"]}
    assert ports == {"50051", "8081", "9090"}
    assert "EXPOSE 50051 8081 9090" in docker
    for path in COMPOSE:
        for name, service in _compose(path)["services"].items():
            if "normsvc" in name:
                inside = {str(p).rsplit(":", 1)[1] for p in service["ports"]}
                assert "50051" in inside and inside <= {"50051", "9090"}, (path.name, name)
    for path in K8S:
        text = path.read_text()
        if "containers:" in text:
            for port in ports:
                assert f"containerPort: {port}" in text, (path.name, port)


def test_compose_files_use_real_secrets_and_publish_on_loopback_unless_auth_is_on():
    for path in COMPOSE:
        doc = _compose(path)
        defined = set(doc.get("secrets") or {})
        for name, service in doc["services"].items():
            secrets = set(service.get("secrets") or [])
            assert secrets <= defined, f"{path.name}: {name} uses undefined secrets {secrets - defined}"
            env = service.get("environment") or {}
            tokens = env.get("NORMSVC_TOKENS")
            if tokens is not None:
                assert tokens.startswith("/run/secrets/") and tokens.rsplit("/", 1)[1] in secrets, (path.name, name)
            for port in service.get("ports") or []:
                published_on = str(port).split(":")[0] if str(port).count(":") == 2 else "0.0.0.0"
                if tokens is None or not str(port).endswith(":50051"):  # auth covers the gRPC port only
                    assert published_on == "127.0.0.1", f"{path.name}: {name} publishes {port} beyond loopback"
        for secret in doc.get("secrets", {}).values():
            assert (path.parent / secret["file"]).parent.is_dir()


def test_compose_stop_outlasts_the_grace_and_read_only_services_have_a_tmp():
    for path in COMPOSE:
        for name, service in _compose(path)["services"].items():
            if "normsvc" not in name:
                continue
            grace = float(service["environment"].get("NORMSVC_GRACE", cli.DEFAULT_GRACE))
            assert _seconds(service["stop_grace_period"]) >= grace + 5, (path.name, name)
            if service.get("read_only"):
                assert "/tmp" in service["tmpfs"], f"{path.name}: {name} needs a tmpfs for the numba cache"
            assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"]


def test_two_replica_compose_shares_a_persistent_redis_and_prometheus_scrapes_both():
    yaml = pytest.importorskip("yaml")
    doc = _compose(DEPLOY / "compose.yaml")
    services = doc["services"]
    replicas = sorted(name for name in services if name.startswith("normsvc"))
    assert len(replicas) == 2
    assert all(services[n]["environment"]["NORMSVC_STORE"] == "redis://redis:6379/0" for n in replicas)
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"]) and not redis.get("ports")
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert sorted(targets) == [f"{n}:9090" for n in replicas]


def _manifests() -> list[dict]:
    yaml = pytest.importorskip("yaml")
    return [doc for path in K8S for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_k8s_manifests_pass_kubernetes_validate_strict():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in _manifests():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _pods() -> dict:
    """Workload name -> (workload, its pod spec)."""
    return {doc["metadata"]["name"]: (doc, doc["spec"]["template"]["spec"])
            for doc in _manifests() if doc["kind"] in ("Deployment", "StatefulSet")}


def test_k8s_pods_are_restricted_read_only_and_sized():
    pods = _pods()
    assert {doc["kind"] for doc, _ in pods.values()} == {"Deployment", "StatefulSet"}
    for name, (doc, pod) in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        [c] = pod["containers"]
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
        assert sc["readOnlyRootFilesystem"] is True, name
        tmp = {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp"}  # NUMBA_CACHE_DIR lives there
        assert any(v["name"] in tmp and "emptyDir" in v for v in pod["volumes"]), name
        resources = c["resources"]
        assert resources["limits"]["cpu"] == resources["requests"]["cpu"] and "memory" in resources["limits"]
        env = {e["name"]: e for e in c["env"]}
        assert env["NUMBA_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu", name
        ready, live = c["readinessProbe"], c["livenessProbe"]
        assert ready != live and ready["grpc"]["port"] == live["grpc"]["port"] == 8081, name  # the health port
        grace = float(env["NORMSVC_GRACE"]["value"])
        pre_stop = float(c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [0, 0])[1])
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5, name


def test_k8s_redis_replicas_have_a_disruption_budget_and_a_secret_and_sqlite_stays_at_one():
    docs = _manifests()
    deployment, pod = next((d, p) for d, p in _pods().values() if d["kind"] == "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    secret = next(d for d in docs if d["kind"] == "Secret")["metadata"]["name"]
    [c] = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NORMSVC_STORE"]["valueFrom"]["secretKeyRef"]["name"] == secret
    mounted = {v["name"] for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret}
    folder = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] in mounted)
    for key in ("NORMSVC_TOKENS", "NORMSVC_TLS_CERT", "NORMSVC_TLS_KEY"):
        assert env[key]["value"].startswith(folder + "/"), key
    statefulset = next(d for d, _ in _pods().values() if d["kind"] == "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    headless = services[statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"


def test_the_default_grace_ends_inside_docker_stop(monkeypatch):
    monkeypatch.delenv("NORMSVC_GRACE", raising=False)
    grace = cli.build_parser().parse_args(["serve"]).grace
    assert grace + 3 <= DOCKER_STOP_TIMEOUT  # room to close the store and exit before SIGKILL
    assert "NORMSVC_GRACE" not in _dockerfile_env()  # the image keeps the default


# --- the health check, against real servers ------------------------------------------------------

def _healthcheck(**env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSVC_")} | env
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_container_healthcheck_follows_the_server():
    server = serve("memory://", port=0)
    port = server.port
    try:
        ok = _healthcheck(NORMSVC_PORT=str(port))
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop(0)
    down = _healthcheck(NORMSVC_PORT=str(port))
    assert down.returncode == 1
    assert "UNAVAILABLE" in down.stderr


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed server certificate for 127.0.0.1 and localhost: (cert path, key path)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(folder / "server.key"), "-out", str(folder / "server.pem")],
                   check=True, capture_output=True, timeout=60)
    return folder / "server.pem", folder / "server.key"


def test_healthcheck_with_tls_on_asks_the_plaintext_health_port(certificate):
    cert, key = certificate
    server = serve("memory://", port=0, tls_cert=cert, tls_key=key, health_port=0)
    tls = {"NORMSVC_PORT": str(server.port), "NORMSVC_TLS_CERT": str(cert), "NORMSVC_TLS_KEY": str(key)}
    try:
        ok = _healthcheck(**tls, NORMSVC_HEALTH_PORT=str(server.health_port))
        assert ok.returncode == 0, ok.stderr
        without = _healthcheck(**tls)  # the main port speaks TLS only
        assert without.returncode == 1 and "NORMSVC_HEALTH_PORT" in without.stderr
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:  # and still does
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)
    down = _healthcheck(**tls, NORMSVC_HEALTH_PORT=str(server.health_port))
    assert down.returncode == 1


def test_health_port_answers_while_every_worker_is_busy():
    store = Store.open("memory://")
    store.create_layer("bn", num_features=4)
    workers, entered, release = 2, threading.Semaphore(0), threading.Event()
    update_many = store.update_many

    def blocked(*args, **kwargs):  # holds the worker thread until released
        entered.release()
        release.wait(60)
        return update_many(*args, **kwargs)

    store.update_many = blocked
    server = serve(store, port=0, workers=workers, health_port=0)
    calls = []
    try:
        client = normsvc.Client(server.address, timeout=60)
        moments = normsvc.moments(np.ones((8, 4), np.float32), axes=[0])
        for _ in range(workers):
            calls.append(threading.Thread(target=client.layer("bn").update, args=(moments,)))
            calls[-1].start()
        for _ in range(workers):
            assert entered.acquire(timeout=30), "the updates did not reach the store"
        with grpc.insecure_channel(server.address) as channel:  # the main port: no worker left to answer
            with pytest.raises(grpc.RpcError) as busy:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            assert busy.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        ok = _healthcheck(NORMSVC_PORT=str(server.port), NORMSVC_HEALTH_PORT=str(server.health_port))
        assert ok.returncode == 0, ok.stderr
    finally:
        release.set()
        for call in calls:
            call.join(30)
        server.stop(0)
        store.close()


# --- the data folder ------------------------------------------------------------------------------

def _unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot write: a read-only one, or (root writes anywhere) /proc."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/proc")
    folder = tmp_path / "data"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


def test_serve_with_a_data_folder_it_cannot_write_fails_naming_it(tmp_path, capsys):
    folder = _unwritable_folder(tmp_path)
    assert cli.main(["serve", "--port", "0", "--store", f"sqlite:///{folder}/stats.db"]) == 2
    err = capsys.readouterr().err
    assert f"folder {folder} is not writable" in err and "--store" in err, err


def test_serve_says_when_numba_does_not_use_numba_cache_dir(tmp_path, monkeypatch, caplog):
    """numba falls back silently from a NUMBA_CACHE_DIR it cannot write; the precompiled kernels there
    then go unused (this process's kernels were cached elsewhere, as such a fallback would)."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "precompiled"))
    with caplog.at_level("WARNING", logger="normsvc.server"):
        cli._warn_numba_cache()
    assert f"numba cannot write NUMBA_CACHE_DIR={tmp_path / 'precompiled'}" in caplog.text


# --- the image, where a Docker engine answers and an image is built ----------------------------------

IMAGE = os.environ.get("NORMSVC_IMAGE", "normsvc:latest")


def _docker(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done


@pytest.fixture(scope="module")
def image():
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI (the image checks are manual: docs/deploy.md)")
    try:
        if _docker("info", check=False, timeout=20).returncode != 0:
            pytest.skip("no Docker engine answers (the image checks are manual: docs/deploy.md)")
    except subprocess.TimeoutExpired:
        pytest.skip("the Docker engine does not answer")
    if _docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.skip(f"no image {IMAGE}: docker build -f deploy/Dockerfile -t {IMAGE.split(':')[0]} .")
    return IMAGE


@pytest.fixture
def container(image):
    """``container(*docker_run_args, env=...)`` -> (name, host port of 50051): a detached container
    with a fresh /data volume, removed (with the volume) at teardown."""
    started = []

    def run(*args, env=None):
        name = f"normsvc-test-{uuid.uuid4().hex[:8]}"
        started.append(name)
        flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
        _docker("run", "-d", "--name", name, "-p", "127.0.0.1::50051", "-v", f"{name}:/data",
                "--health-interval=1s", "--health-start-period=30s", *flags, *args, image)
        port = _docker("port", name, "50051/tcp").stdout.split(":")[-1].strip()
        return name, int(port)

    yield run
    for name in started:
        _docker("rm", "-f", "-v", name, check=False)
        _docker("volume", "rm", "-f", name, check=False)


def _wait_healthy(name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(_docker("inspect", "-f", "{{json .State}}", name).stdout)
        status = (state.get("Health") or {}).get("Status")
        if status == "healthy" or not state["Running"]:
            return status if state["Running"] else f"exited {state['ExitCode']}"
        time.sleep(0.5)
    return status


HARDENED = ("--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


@pytest.mark.timeout(300)
def test_image_fresh_read_only_container_compiles_nothing(container):
    name, port = container(*HARDENED, env={"NUMBA_DEBUG_CACHE": "1"})
    assert _wait_healthy(name) == "healthy", _docker("logs", name).stderr[-2000:]
    with normsvc.Client(f"127.0.0.1:{port}", timeout=120) as client:
        make_first_requests(client)
    logs = _docker("logs", name)
    out = logs.stdout + logs.stderr
    saved = [line for line in out.splitlines() if re.search(r"\[cache\] (data|index) saved", line)]
    assert not saved, "the first requests compiled:\n" + "\n".join(saved[:10])
    assert "[cache] data loaded" in out


@pytest.mark.timeout(120)
def test_image_with_a_data_folder_it_cannot_write_fails_naming_data(image):
    done = _docker("run", "--rm", "--tmpfs", "/data:mode=755", image, check=False, timeout=100)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "folder /data is not writable" in done.stderr, done.stderr[-2000:]


@pytest.mark.timeout(180)
def test_image_is_healthy_with_tls_on(container, certificate, tmp_path):
    cert, key = certificate
    folder = tmp_path / "tls"  # readable by the image's user (uid 10001)
    folder.mkdir()
    for path in (cert, key):
        shutil.copy(path, folder / path.name)
        (folder / path.name).chmod(0o644)
    folder.chmod(0o755)
    tmp_path.chmod(0o755)
    name, port = container("-v", f"{folder}:/tls:ro", env={"NORMSVC_TLS_CERT": "/tls/server.pem",
                                                            "NORMSVC_TLS_KEY": "/tls/server.key"})
    assert _wait_healthy(name) == "healthy", _docker("logs", name).stderr[-2000:]


@pytest.mark.timeout(180)
def test_image_docker_stop_drains_within_the_default_timeout(container):
    name, port = container()
    assert _wait_healthy(name) == "healthy"
    outcome = {}
    with normsvc.Client(f"127.0.0.1:{port}", timeout=60) as client:
        client.create_layer("bn", num_features=4)
        moments = normsvc.moments(np.ones((8, 4), np.float32), axes=[0])

        def lone_rank():  # waits for a second rank that never comes: held until the grace ends
            try:
                client.allreduce({"bn": moments}, step=0, rank=0, world_size=2, timeout=60)
            except normsvc.NormsvcError as exc:
                outcome["error"] = exc

        waiting = threading.Thread(target=lone_rank)
        waiting.start()
        time.sleep(1.0)
        _docker("stop", name, timeout=60)  # Docker's default: SIGKILL after 10 s
        waiting.join(60)
    state = json.loads(_docker("inspect", "-f", "{{json .State}}", name).stdout)
    assert state["ExitCode"] == 0, f"docker stop ended in exit {state['ExitCode']} (137: killed)"
    assert "error" in outcome  # the waiting rank was told (UNAVAILABLE), not left hanging
