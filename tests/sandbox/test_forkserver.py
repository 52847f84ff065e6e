"""The warm fork server of the process backend, with real processes.

test_process_backend.py tests what both start modes share: isolation, limits
and deadlines. These tests cover what only the warm start has: one server
process, its restart, its fallback and its concurrency.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from sandbox.backend import Limits
from sandbox.forkserver import ForkServer
from sandbox.process_backend import ProcessBackend, build_environment, network_isolation_available
from sandbox.protocol import Job, JobKind, Stage

pytestmark = pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here")

DPO = """import torch.nn.functional as F

def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * rho)
"""
PROBE = "tests.support.probe_task:ProbeTask"
LIMITS = Limits(timeout_s=60.0, memory_mb=4096, cpus=1)


def probe_job(tmp_path: Path) -> Job:
    return Job(kind=JobKind.EVALUATE, task=PROBE, settings={}, cache_dir=str(tmp_path / "cache"), code=DPO)


def test_jobs_fork_from_one_server(tmp_path):
    backend = ProcessBackend(warm=True)
    first = backend.run(probe_job(tmp_path), tmp_path / "first", LIMITS)
    second = ProcessBackend(warm=True).run(probe_job(tmp_path), tmp_path / "second", LIMITS)
    assert first.ok, first.reason + first.log_tail
    assert second.ok, second.reason + second.log_tail
    server = backend.fork_server()
    assert first.metrics["parent_pid"] == second.metrics["parent_pid"] == server.pid
    assert first.metrics["pid"] != second.metrics["pid"]
    # the probe task preloads a module that prints to standard output; the print went to the server's log
    assert "noisy_import: imported" in server.log_path.read_text()


def test_warm_cold_same_result(tmp_path, toy_task_name):
    results = {}
    for warm in (True, False):
        job = Job(kind=JobKind.EVALUATE, task=toy_task_name, settings={}, cache_dir=str(tmp_path / "cache"),
                  code=DPO, seed=3)
        results[warm] = ProcessBackend(warm=warm).run(job, tmp_path / f"job-{warm}", LIMITS)
        assert results[warm].ok, results[warm].reason + results[warm].log_tail
    assert results[True].fitness == results[False].fitness
    assert results[True].metrics["train_loss"] == results[False].metrics["train_loss"]


def test_server_outlives_starting_thread(tmp_path):
    # Linux sends a parent-death signal when the starting thread ends, so the server must not rely on one
    backend = ProcessBackend(warm=True)
    server = backend.fork_server()
    server.close()
    results = []
    starter = threading.Thread(target=lambda: results.append(backend.run(probe_job(tmp_path), tmp_path / "a", LIMITS)))
    starter.start()
    starter.join()
    pid = server.pid
    assert results[0].ok, results[0].reason
    time.sleep(0.5)
    later = backend.run(probe_job(tmp_path), tmp_path / "b", LIMITS)
    assert later.ok, later.reason + later.log_tail
    assert server.pid == pid == later.metrics["parent_pid"]


def test_concurrent_jobs_from_engine_threads(tmp_path, toy_task_name):
    backend = ProcessBackend(warm=True)
    results = {}

    def run(name: str) -> None:
        job = Job(kind=JobKind.EVALUATE, task=toy_task_name, settings={"sleep_s": 1.0},
                  cache_dir=str(tmp_path / "cache"), code=DPO)
        results[name] = backend.run(job, tmp_path / name, LIMITS)

    threads = [threading.Thread(target=run, args=(f"job-{index}",)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["job-0", "job-1", "job-2"]
    for result in results.values():
        assert result.ok, result.reason + result.log_tail
        assert result.fitness > 0.8


def test_killed_server_fails_job_restarts(tmp_path, toy_task_name):
    backend = ProcessBackend(warm=True)
    job = Job(kind=JobKind.EVALUATE, task=toy_task_name, settings={"sleep_s": 60.0}, cache_dir=str(tmp_path / "cache"),
              code=DPO)
    results = []
    runner = threading.Thread(target=lambda: results.append(backend.run(job, tmp_path / "slow", LIMITS)))
    runner.start()
    progress = tmp_path / "slow" / "progress.jsonl"
    deadline = time.monotonic() + 60
    while not progress.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert progress.exists(), "the job never started training"
    server_pid = backend.fork_server().pid
    os.kill(server_pid, signal.SIGKILL)
    runner.join(timeout=30)
    assert not runner.is_alive()
    result = results[0]
    assert not result.ok
    assert result.stage is Stage.SANDBOX
    assert result.category == "crash"
    assert "warm worker" in result.reason
    assert "warm_start = false" in result.reason

    again = backend.run(probe_job(tmp_path), tmp_path / "again", LIMITS)
    assert again.ok, again.reason + again.log_tail
    assert again.metrics["parent_pid"] != server_pid


def test_unusable_server_falls_back_cold(tmp_path, monkeypatch, caplog):
    (tmp_path / "home").mkdir()
    broken = ForkServer([sys.executable, "-c", "import sys; print('no protocol here'); sys.exit(3)"],
                        build_environment(tmp_path / "home", threads=1), tmp_path / "broken-server")
    monkeypatch.setattr(ProcessBackend, "fork_server", lambda self: broken)
    with caplog.at_level(logging.WARNING, logger="sandbox.process_backend"):
        result = ProcessBackend(warm=True).run(probe_job(tmp_path), tmp_path / "job", LIMITS)
    assert result.ok, result.reason + result.log_tail
    # a cold job is a child of the engine itself (unshare runs the interpreter in its own process)
    assert result.metrics["parent_pid"] == os.getpid()
    messages = [record.getMessage() for record in caplog.records]
    fallbacks = [message for message in messages if "fresh interpreter" in message]
    assert fallbacks, messages
    assert "did not become ready" in fallbacks[0]
