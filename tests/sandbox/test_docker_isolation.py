"""Isolation of the Docker sandbox, proven by probe scripts run inside real containers.

The probes run as the container's command through `DockerBackend.run_in_container`,
which uses the same container settings as every job but skips the worker and
its static checks, as a candidate that got past those checks would.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import pytest

from sandbox.backend import Limits, SandboxUnavailable
from sandbox.docker_backend import LABEL_RUN_ID, DockerBackend
from sandbox.image import CANARY_VARIABLE, self_check

pytestmark = pytest.mark.docker

# The targets carry no traffic even with networking on: 198.51.100.7 is in
# TEST-NET-2 (RFC 5737) and 169.254.169.254 is the cloud metadata address.
NETWORK_PROBE = """
import json, socket
results = {}
for host, port in [("198.51.100.7", 80), ("host.docker.internal", 8000), ("169.254.169.254", 80)]:
    try:
        socket.create_connection((host, port), timeout=2).close()
        results[f"{host}:{port}"] = "CONNECTED"
    except OSError as error:
        results[f"{host}:{port}"] = type(error).__name__
print(json.dumps(results))
"""

ENVIRONMENT_PROBE = """
import json, os
try:
    pid1 = open("/proc/1/environ", "rb").read().decode(errors="replace")
except OSError:
    pid1 = ""
print(json.dumps({
    "canary_in_env": any("CANARY" in value for value in os.environ.values()),
    "canary_in_pid1": "CANARY" in pid1,
    "names": sorted(os.environ),
}))
"""

CANARIES = {
    "OPENAI_API_KEY": "sk-test-CANARY-7f3a",
    "HF_TOKEN": "hf_CANARY_91",
    CANARY_VARIABLE: "sk-test-CANARY-5d0c",
}
LIMITS = Limits(timeout_s=60, memory_mb=512, cpus=1.0)


@pytest.fixture
def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def backend(run_id):
    try:
        backend = DockerBackend(run_id)
    except SandboxUnavailable as error:
        pytest.skip(f"the Docker sandbox is not usable here: {error}")
    yield backend
    backend.cleanup_leftovers(run_id)


def run_probe(backend: DockerBackend, script: str, job_dir: Path) -> dict:
    job_dir.mkdir(exist_ok=True)
    run = backend.run_in_container(["python", "-c", script], job_dir, LIMITS, kind="probe", candidate_id="probe")
    assert run.exit_code == 0, run.logs
    return json.loads(run.logs.strip().splitlines()[-1])


def test_network_probe_reaches_nothing(backend, tmp_path):
    results = run_probe(backend, NETWORK_PROBE, tmp_path / "job")
    assert results["198.51.100.7:80"] != "CONNECTED"
    assert results["169.254.169.254:80"] != "CONNECTED"
    # the name must not even resolve: gaierror is a subclass of OSError
    assert results["host.docker.internal:8000"] == "gaierror"


def test_host_secrets_stay_out(backend, run_id, tmp_path, monkeypatch, caplog):
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    job_dir = tmp_path / "job"

    results = run_probe(backend, ENVIRONMENT_PROBE, job_dir)

    assert results["canary_in_env"] is False
    assert results["canary_in_pid1"] is False
    for name in CANARIES:
        assert name not in results["names"]
    # nothing the backend logged or left in the job directory carries a secret
    assert "CANARY" not in caplog.text
    for path in job_dir.rglob("*"):
        if path.is_file():
            assert "CANARY" not in path.read_text(errors="replace"), path


def test_container_settings_are_locked_down(backend, run_id, tmp_path, monkeypatch):
    """Inspect a job container's configuration, as `docker inspect` shows it."""
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    container = backend.create_container(["true"], tmp_path, LIMITS, kind="inspect")
    try:
        container_attrs = container.attrs
    finally:
        container.remove(force=True)
    host = container_attrs["HostConfig"]
    config = container_attrs["Config"]

    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Memory"] == LIMITS.memory_mb * 1024 * 1024
    assert host["MemorySwap"] == LIMITS.memory_mb * 1024 * 1024
    assert host["NanoCpus"] == int(LIMITS.cpus * 1e9)
    assert host["PidsLimit"] == LIMITS.pids
    assert config["User"] != ""
    assert not config["User"].startswith("0:")
    assert config["Labels"][LABEL_RUN_ID] == run_id
    assert list(host["Tmpfs"]) == ["/tmp"]
    writable = [mount["Destination"] for mount in container_attrs["Mounts"] if mount["RW"]]
    assert writable == ["/job"]
    assert [entry for entry in config["Env"] if "CANARY" in entry] == []


def test_self_check_passes(backend, monkeypatch):
    monkeypatch.delenv(CANARY_VARIABLE, raising=False)
    report = self_check(backend)
    text = str(report)
    assert report.passed, text
    assert report.exit_code == 0
    assert "network: blocked" in text
    assert "environment: clean (canary absent)" in text
    assert "root filesystem: read-only" in text
    assert "user: non-root" in text
    assert "capabilities: dropped" in text
    assert "job directory: writable" in text
    # the canary lives in the engine's environment only while the check runs
    assert CANARY_VARIABLE not in os.environ
