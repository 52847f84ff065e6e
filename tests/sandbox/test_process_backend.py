"""The process backend with real child processes: isolation, deadlines, reaping.

Most tests run twice: once with jobs forked from the warm fork server (the
default) and once with a fresh interpreter per job.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from sandbox.backend import Limits
from sandbox.process_backend import ProcessBackend, network_isolation_available
from sandbox.protocol import Job, JobKind, Stage
from tests.support.processes import descendants_of, leftover_processes

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
PROBE = "tests.support.probe_task:ProbeTask"


@pytest.fixture(params=["warm", "cold"])
def warm(request) -> bool:
    return request.param == "warm"


def run_job(tmp_path, task, code, warm, kind=JobKind.EVALUATE, settings=None, timeout_s=60.0, job_name="job"):
    backend = ProcessBackend(warm=warm)
    job = Job(kind=kind, task=task, settings=settings or {}, cache_dir=str(tmp_path / "cache"), code=code)
    return backend.run(job, tmp_path / job_name, Limits(timeout_s=timeout_s, memory_mb=4096, cpus=1))


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_process_job_evaluates_toy_task(tmp_path, toy_task_name, warm):
    result = run_job(tmp_path, toy_task_name, DPO, warm)
    assert result.ok, result.reason + result.log_tail
    assert result.stage is Stage.EVALUATE
    assert result.fitness > 0.8
    assert len(result.metrics["train_loss"]) == 40


def test_relative_job_dir_works(tmp_path, toy_task_name, monkeypatch, warm):
    # the default run directory is relative ("runs/..."), and the worker starts inside the job directory
    monkeypatch.chdir(tmp_path)
    job = Job(kind=JobKind.UNIT_TEST, task=toy_task_name, settings={}, cache_dir="cache", code=DPO)
    result = ProcessBackend(warm=warm).run(job, Path("runs/r1/jobs/dpo"), Limits(timeout_s=60.0, memory_mb=4096, cpus=1))
    assert result.ok, result.reason + result.log_tail
    assert (tmp_path / "runs/r1/jobs/dpo/result.json").exists()


def test_process_job_environment_is_scrubbed(tmp_path, monkeypatch, warm):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-CANARY-7f3a")
    monkeypatch.setenv("HF_TOKEN", "hf_CANARY_91")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    result = run_job(tmp_path, PROBE, DPO, warm)
    assert result.ok, result.reason + result.log_tail
    assert result.metrics["canary_in_env"] is False
    assert "OPENAI_API_KEY" not in result.metrics["env_keys"]
    assert "HF_TOKEN" not in result.metrics["env_keys"]
    # the process sandbox assigns no GPU, so it shows none
    assert result.metrics["cuda_visible_devices"] == ""


def test_process_job_session_and_limits(tmp_path, warm):
    job = Job(kind=JobKind.EVALUATE, task=PROBE, settings={}, cache_dir=str(tmp_path / "cache"), code=DPO)
    result = ProcessBackend(warm=warm).run(job, tmp_path / "job", Limits(timeout_s=60.0, memory_mb=4096, cpus=2))
    assert result.ok, result.reason + result.log_tail
    job_dir = (tmp_path / "job").resolve()
    assert result.metrics["leads_session"] is True
    assert result.metrics["cwd"] == str(job_dir)
    assert result.metrics["home"] == str(job_dir / "home")
    assert result.metrics["rlimit_as"] == 4096 * 1024 * 1024
    assert result.metrics["rlimit_fsize"] == Limits(timeout_s=1).output_mb * 1024 * 1024
    assert result.metrics["torch_threads"] == 2


def test_process_job_cannot_reach_host_loopback(tmp_path, warm):
    # a server on the host's loopback; the job lives in its own network namespace
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        result = run_job(tmp_path, PROBE, DPO, warm, settings={"port": port})
    finally:
        server.close()
    assert result.ok, result.reason + result.log_tail
    assert result.metrics["host_loopback"] != "CONNECTED"


def test_process_timeout_kills_and_reaps(tmp_path, toy_task_name, warm):
    start = time.monotonic()
    result = run_job(tmp_path, toy_task_name, HANG, warm, kind=JobKind.UNIT_TEST, timeout_s=4.0)
    elapsed = time.monotonic() - start
    assert not result.ok
    assert result.category == "timeout"
    assert result.stage is Stage.SANDBOX
    assert "timed out" in result.reason
    assert elapsed < 4.0 + 5.0
    # nothing left behind: no process below ours, zombie or alive, except an idle fork server
    assert leftover_processes() == []


def test_process_exit_without_result_is_failure(tmp_path, toy_task_name):
    backend = ProcessBackend(warm=False)
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


def test_worker_dies_with_engine(tmp_path, toy_task_name, warm):
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
ProcessBackend(warm={warm!r}).run(job, Path({str(tmp_path / 'job')!r}), Limits(timeout_s=120))
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
    worker_pids = descendants_of(engine.pid)
    assert worker_pids
    engine.send_signal(signal.SIGKILL)
    engine.wait()

    # the kernel delivers SIGKILL to the orphaned worker; poll until it is gone
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in worker_pids):
        time.sleep(0.05)
    assert [pid for pid in worker_pids if is_alive(pid)] == []
