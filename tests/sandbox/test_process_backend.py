"""The process backend with real child processes: isolation, deadlines, reaping."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from sandbox.backend import Limits
from sandbox.process_backend import ProcessBackend, network_isolation_available
from sandbox.protocol import Job, JobKind, Stage

DPO = """import torch.nn.functional as F

def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * rho)
"""

HANG = """import torch.nn.functional as F

def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    n = 0
    while n >= 0:
        n += 1
    return -F.logsigmoid(policy_chosen_logps - policy_rejected_logps)
"""

pytestmark = pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here")


def run_job(tmp_path, task, code, kind=JobKind.EVALUATE, settings=None, timeout_s=60.0):
    backend = ProcessBackend()
    job = Job(kind=kind, task=task, settings=settings or {}, cache_dir=str(tmp_path / "cache"), code=code)
    return backend.run(job, tmp_path / "job", Limits(timeout_s=timeout_s, memory_mb=4096, cpus=1))


def children_of(pid: int) -> list[tuple[int, str]]:
    """Return (pid, state) of every live or zombie child process of `pid`, read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, parent = fields[0], int(fields[1])
        if parent == pid:
            children.append((int(stat.parent.name), state))
    return children


def test_process_job_evaluates_toy_task(tmp_path, toy_task_name):
    result = run_job(tmp_path, toy_task_name, DPO)
    assert result.ok, result.reason + result.log_tail
    assert result.stage is Stage.EVALUATE
    assert result.fitness > 0.8
    assert len(result.metrics["train_loss"]) == 40


def test_relative_job_dir_works(tmp_path, toy_task_name, monkeypatch):
    # the default run directory is relative ("runs/..."), and the worker starts inside the job directory
    monkeypatch.chdir(tmp_path)
    job = Job(kind=JobKind.UNIT_TEST, task=toy_task_name, settings={}, cache_dir="cache", code=DPO)
    result = ProcessBackend().run(job, Path("runs/r1/jobs/dpo"), Limits(timeout_s=60.0, memory_mb=4096, cpus=1))
    assert result.ok, result.reason + result.log_tail
    assert (tmp_path / "runs/r1/jobs/dpo/result.json").exists()


def test_process_job_environment_is_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-CANARY-7f3a")
    monkeypatch.setenv("HF_TOKEN", "hf_CANARY_91")
    result = run_job(tmp_path, "tests.support.probe_task:ProbeTask", DPO)
    assert result.ok, result.reason + result.log_tail
    assert result.metrics["canary_in_env"] is False
    assert "OPENAI_API_KEY" not in result.metrics["env_keys"]
    assert "HF_TOKEN" not in result.metrics["env_keys"]


def test_process_job_cannot_reach_host_loopback(tmp_path):
    # a server on the host's loopback; the job lives in its own network namespace
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        result = run_job(tmp_path, "tests.support.probe_task:ProbeTask", DPO, settings={"port": port})
    finally:
        server.close()
    assert result.ok, result.reason + result.log_tail
    assert result.metrics["host_loopback"] != "CONNECTED"


def test_process_timeout_kills_and_reaps(tmp_path, toy_task_name):
    start = time.monotonic()
    result = run_job(tmp_path, toy_task_name, HANG, kind=JobKind.UNIT_TEST, timeout_s=4.0)
    elapsed = time.monotonic() - start
    assert not result.ok
    assert result.category == "timeout"
    assert result.stage is Stage.SANDBOX
    assert "timed out" in result.reason
    assert elapsed < 4.0 + 5.0
    # nothing left behind: no child process of ours, zombie or alive
    assert children_of(os.getpid()) == []


def test_process_exit_without_result_is_failure(tmp_path, toy_task_name):
    backend = ProcessBackend()
    job = Job(kind=JobKind.UNIT_TEST, task=toy_task_name, settings={}, cache_dir=str(tmp_path), code=DPO)
    job_dir = tmp_path / "job"
    original = backend.command
    backend.command = lambda directory: ["python3", "-c", "pass"]
    try:
        result = backend.run(job, job_dir, Limits(timeout_s=30))
    finally:
        backend.command = original
    assert not result.ok
    assert result.category == "no_result"
    assert "no result file" in result.reason


def test_worker_dies_with_engine(tmp_path, toy_task_name):
    # an "engine" process starts a slow job and is then SIGKILLed; its worker must not outlive it
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from sandbox.backend import Limits
from sandbox.process_backend import ProcessBackend
from sandbox.protocol import Job, JobKind
job = Job(kind=JobKind.EVALUATE, task={toy_task_name!r}, settings={{"sleep_s": 60.0}}, cache_dir={str(tmp_path)!r},
          code={DPO!r})
ProcessBackend().run(job, Path({str(tmp_path / 'job')!r}), Limits(timeout_s=120))
"""
    import signal
    import subprocess
    import sys

    engine = subprocess.Popen([sys.executable, "-c", script])
    progress = tmp_path / "job" / "progress.jsonl"
    deadline = time.monotonic() + 60
    while not progress.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert progress.exists(), "the worker never started training"
    worker_pids = [pid for pid, _ in children_of(engine.pid)]
    assert worker_pids
    engine.send_signal(signal.SIGKILL)
    engine.wait()

    # the kernel delivers SIGKILL to the orphaned worker; poll until it is gone
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in worker_pids):
        time.sleep(0.05)
    alive = [pid for pid in worker_pids if Path(f"/proc/{pid}/stat").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []
