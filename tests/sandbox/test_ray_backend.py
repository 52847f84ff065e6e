"""The Ray executor against a real single-machine Ray cluster that the tests start on loopback.

The cluster is `ray start --head --block` in its own session, bound to
127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from swapping in the
machine's routable address), and is stopped with SIGTERM at the end. Jobs run
in the process sandbox on the node, as they would on a remote node.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from engine.candidate import Status
from engine.cli import _overrides_from_args, build_run_parser
from engine.config import ConfigError, RunConfig, SandboxConfig, config_from_dict
from engine.loop import Evolution, LoopOptions
from engine.runner import RunError, build_pipeline, choose_backend, open_run
from sandbox.backend import BackendKind, Limits, SandboxUnavailable
from sandbox.process_backend import ProcessBackend, network_isolation_available
from sandbox.protocol import RESULT_FILE, Job, JobKind
from tests.engine.test_loop import MARGIN, QuietReporter, ScriptedProposer, reply
from tests.support.ray_cluster import LOOPBACK_VARIABLE, local_ray_cluster

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'evolve[ray]')"),
    pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here"),
]


SCALED = reply("scaled_logistic", MARGIN + "    return -F.logsigmoid(2.0 * self.beta * rho)\n")
SOFTPLUS = reply("softplus_margin", MARGIN + "    return F.softplus(1.0 - self.beta * rho)\n")
SCALED_CODE = (
    "import torch\nimport torch.nn.functional as F\n\n"
    "def scaled_logistic(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, "
    "reference_rejected_logps):\n" + MARGIN + "    return -F.logsigmoid(2.0 * self.beta * rho)\n"
)


@pytest.fixture(scope="module", autouse=True)
def loopback_ray():
    """Keep Ray on 127.0.0.1 in this process; Ray reads the variable when it is first imported."""
    previous = os.environ.get(LOOPBACK_VARIABLE)
    os.environ[LOOPBACK_VARIABLE] = "0"
    yield
    if previous is None:
        os.environ.pop(LOOPBACK_VARIABLE, None)
    else:
        os.environ[LOOPBACK_VARIABLE] = previous


@pytest.fixture(scope="module")
def ray_address():
    """Start a 2-CPU Ray head on 127.0.0.1 for this module; yield its GCS address."""
    with local_ray_cluster(num_cpus=2) as address:
        yield address


@pytest.fixture(scope="module")
def ray_backend(ray_address):
    from sandbox.ray_backend import RayBackend

    return RayBackend(BackendKind.PROCESS, ray_address, run_id="ray-test")


def run_config(tmp_path, ray_address: str, toy_task_name: str, preset: str = "") -> RunConfig:
    return RunConfig(
        task=toy_task_name,
        preset=preset,
        generations=1,
        population=2,
        workers=2,
        max_attempts=1,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        sandbox=SandboxConfig(backend="process", executor="ray", ray_address=ray_address,
                              unit_test_timeout_s=60, train_timeout_s=120, cpus=1),
    )


def local_fitness(tmp_path, toy_task_name: str, code: str, settings: dict) -> float:
    """Return the fitness of `code` judged by the local process backend, the reference for Ray's result."""
    (tmp_path / "local-cache").mkdir(exist_ok=True)
    job = Job(kind=JobKind.EVALUATE, task=toy_task_name, settings=settings, cache_dir=str(tmp_path / "local-cache"),
              code=code, seed=0)
    result = ProcessBackend().run(job, tmp_path / "local-job", Limits(timeout_s=120, cpus=1))
    assert result.ok, result.reason + result.log_tail
    return result.fitness


def test_generation_runs_on_ray_with_two_workers(tmp_path, ray_address, toy_task_name):
    config = run_config(tmp_path, ray_address, toy_task_name)
    context = open_run(config, None, {})
    assert context.backend_reason.startswith("ray:")
    assert context.backend.kind is BackendKind.PROCESS
    assert context.archive.get_meta("backend") == "process"
    options = LoopOptions(generations=1, max_attempts=1, seed=0, population=2, workers=2)
    evolution = Evolution(context.task, context.settings, context.archive, build_pipeline(context),
                          ScriptedProposer([SCALED, SOFTPLUS]), QuietReporter(), options)
    evolution.add_seeds(context.task.seeds())
    evolution.judge_unfinished()
    evolution.run()

    candidates = context.archive.candidates()
    assert sorted(c.name for c in candidates) == ["dpo", "hinge", "scaled_logistic", "softplus_margin"]
    for candidate in candidates:
        assert candidate.status is Status.EVALUATED, candidate.reason
        assert candidate.fitness is not None
        # the node's job directory came back: its result file and log are in the engine's job directory
        job_dir = Path(config.run_dir) / "jobs" / candidate.id / "evaluate"
        assert (job_dir / RESULT_FILE).is_file()
        assert (job_dir / "log.txt").is_file()
    assert context.archive.get_meta("completed_generations") == 1

    # the toy task is deterministic for a seed, so a Ray-run evaluation equals a local one
    scaled = next(c for c in candidates if c.name == "scaled_logistic")
    assert scaled.fitness == local_fitness(tmp_path, toy_task_name, SCALED_CODE, context.task.settings_to_dict(context.settings))


def test_killed_ray_worker_job_runs_again(tmp_path, ray_address, toy_task_name, caplog):
    # the slow preset sleeps 0.2 s per training step, so the job is still running when its worker is killed
    config = run_config(tmp_path, ray_address, toy_task_name, preset="slow")
    context = open_run(config, None, {})
    killed: dict[str, int] = {}
    steps: list[int] = []

    def kill_worker_once(candidate, event):
        if candidate.name != "scaled_logistic" or event.get("message") != "train":
            return
        steps.append(event["step"])
        if killed or event["step"] < 3:
            return
        # The toy task's progress events mark the job as training. Its sandbox worker, a fresh interpreter or a
        # child of the warm fork server, is found by its working directory, and the Ray worker above it.
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if "sandbox.worker" not in cmdline and "sandbox.forkserver" not in cmdline:
                continue
            try:
                job = Job.read(Path(process.cwd()))
            except (OSError, psutil.Error, ValueError):
                continue
            if job.candidate_id == candidate.id and job.kind is JobKind.EVALUATE:
                ray_worker = process.parent()
                if "sandbox.forkserver" in ray_worker.cmdline():
                    ray_worker = ray_worker.parent()
                # a Ray worker shows "ray::<task>" once it has set its title, its script path before that
                title = " ".join(ray_worker.cmdline())
                assert "ray::" in title or "default_worker.py" in title, title
                killed["sandbox_worker"] = process.pid
                killed["ray_worker"] = ray_worker.pid
                ray_worker.kill()
                return

    options = LoopOptions(generations=1, max_attempts=1, seed=0, population=2, workers=2)
    pipeline = build_pipeline(context, on_progress=kill_worker_once)
    evolution = Evolution(context.task, context.settings, context.archive, pipeline,
                          ScriptedProposer([SCALED, SOFTPLUS]), QuietReporter(), options)
    with caplog.at_level(logging.WARNING, logger="sandbox.ray_backend"):
        evolution.run()

    assert "ray_worker" in killed, "no sandbox worker of the candidate was found while it trained"
    proposals = {c.name: c for c in context.archive.iter_proposals()}
    victim = proposals["scaled_logistic"]
    assert victim.status is Status.EVALUATED, victim.reason
    assert proposals["softplus_margin"].status is Status.EVALUATED, proposals["softplus_margin"].reason
    # the job started over: step 1 came once per try, and the second try reached the last step
    assert steps.count(1) == 2
    assert steps[-1] == context.settings.steps
    retries = [r for r in caplog.records if "submitting it again" in r.getMessage() and victim.id in r.getMessage()]
    assert len(retries) == 1
    # the sandbox worker did not outlive its Ray worker (its fork server saw its input close, or PDEATHSIG)
    sandbox_worker = killed["sandbox_worker"]
    assert not psutil.pid_exists(sandbox_worker) or psutil.Process(sandbox_worker).status() == psutil.STATUS_ZOMBIE
    # a complete second try gives the same fitness as an undisturbed local run
    assert victim.fitness == local_fitness(tmp_path, toy_task_name, SCALED_CODE,
                                           context.task.settings_to_dict(context.settings))


def test_unreachable_cluster_names_address(ray_backend):
    from sandbox.ray_backend import RayBackend

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    with pytest.raises(SandboxUnavailable) as raised:
        RayBackend(BackendKind.PROCESS, address)
    assert address in str(raised.value)
    assert "ray start --head" in str(raised.value)


def test_unreachable_cluster_is_run_error():
    config = SandboxConfig(backend="process", executor="ray", ray_address="127.0.0.1:1")
    with pytest.raises(RunError) as raised:
        choose_backend(config, "run-id")
    assert "127.0.0.1:1" in str(raised.value)


def test_invalid_address_rejected(ray_backend):
    from sandbox.ray_backend import RayBackend

    with pytest.raises(SandboxUnavailable) as raised:
        RayBackend(BackendKind.PROCESS, "no-port-here")
    assert "'no-port-here' is invalid" in str(raised.value)


def test_job_larger_than_any_node_rejected(tmp_path, ray_backend):
    job = Job(kind=JobKind.UNIT_TEST, task="tests.support.toy_task:ToyTask", settings={}, cache_dir="", code="")
    # the test cluster's only node has 2 CPUs
    with pytest.raises(SandboxUnavailable) as raised:
        ray_backend.run(job, tmp_path / "job", Limits(timeout_s=10, cpus=4))
    assert "4 CPU(s)" in str(raised.value)


def test_cache_missing_on_node_stops_run(tmp_path, ray_backend, monkeypatch):
    from sandbox import ray_backend as module

    # the engine machine has the prepared cache, but the node (here the same machine) does not
    monkeypatch.setattr(module, "cache_prepared", lambda job: True)
    job = Job(kind=JobKind.UNIT_TEST, task="tests.support.toy_task:ToyTask", settings={},
              cache_dir=str(tmp_path / "absent"), code=SCALED_CODE)
    with pytest.raises(SandboxUnavailable) as raised:
        ray_backend.run(job, tmp_path / "job", Limits(timeout_s=30, cpus=1))
    assert str(tmp_path / "absent") in str(raised.value)


def test_ray_address_flag_implies_executor():
    parser = build_run_parser()
    sandbox = _overrides_from_args(parser.parse_args(["--ray-address", "10.0.0.5:6379"]))["sandbox"]
    assert sandbox["executor"] == "ray"
    assert sandbox["ray_address"] == "10.0.0.5:6379"
    explicit = _overrides_from_args(parser.parse_args(["--executor", "local", "--ray-address", "10.0.0.5:6379"]))
    assert explicit["sandbox"]["executor"] == "local"
    assert "sandbox" not in _overrides_from_args(parser.parse_args([]))


def test_executor_config_validated():
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"sandbox": {"executor": "spark", "ray_address": ""}})
    assert any("sandbox.executor = 'spark'" in problem for problem in raised.value.problems)
    config = config_from_dict({"sandbox": {"executor": "ray", "ray_address": "10.0.0.5:6379"}})
    assert config.sandbox.executor == "ray"
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"sandbox": {"executor": "ray", "ray_address": " "}})
    assert any("ray_address is empty" in problem for problem in raised.value.problems)


def test_collect_files_skips_links_and_large_files(tmp_path, monkeypatch):
    from sandbox import ray_node

    monkeypatch.setattr(ray_node, "MAX_RETURNED_FILE_BYTES", 10)
    job_dir = tmp_path / "job"
    (job_dir / "work").mkdir(parents=True)
    (job_dir / "home").mkdir()
    (job_dir / "result.json").write_text("{}")
    (job_dir / "work" / "curve.json").write_text("[1, 2]")
    (job_dir / "work" / "big.bin").write_bytes(b"x" * 11)
    (job_dir / "home" / "cache.txt").write_text("not returned")
    secret = tmp_path / "secret.txt"
    secret.write_text("node file")
    (job_dir / "work" / "link.txt").symlink_to(secret)

    files, left_out = ray_node.collect_files(job_dir)

    assert files == {"result.json": b"{}", "work/curve.json": b"[1, 2]"}
    assert any(line.startswith("work/big.bin") for line in left_out)
    assert any(line.startswith("work/link.txt (not a regular file)") for line in left_out)


def test_write_files_rejects_escaping_paths(tmp_path):
    from sandbox.ray_node import write_files

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    write_files(job_dir, {"work/curve.json": b"[1]"})
    assert (job_dir / "work" / "curve.json").read_bytes() == b"[1]"
    for bad in ("../outside.txt", "/etc/evil", "work/../../outside.txt"):
        with pytest.raises(ValueError):
            write_files(job_dir, {bad: b"x"})
    assert not (tmp_path / "outside.txt").exists()


def test_orphaned_job_dirs_removed(tmp_path):
    from sandbox.ray_node import remove_orphaned_job_dirs

    finished = subprocess.Popen(["true"])
    finished.wait()
    orphan = tmp_path / f"{finished.pid}-abc"
    owned = tmp_path / f"{os.getpid()}-def"
    orphan.mkdir()
    owned.mkdir()
    assert remove_orphaned_job_dirs(tmp_path) == 1
    assert not orphan.exists()
    assert owned.exists()


@pytest.mark.docker
def test_docker_sandbox_on_node(tmp_path, ray_address):
    from evaluators.registry import get_task
    from sandbox.docker_backend import DockerBackend
    from sandbox.ray_backend import RayBackend

    try:
        DockerBackend("ray-docker-check")
    except SandboxUnavailable as error:
        pytest.skip(f"the Docker sandbox is not usable here: {error}")
    backend = RayBackend(BackendKind.DOCKER, ray_address, run_id="ray-docker-test")
    assert backend.kind is BackendKind.DOCKER
    task = get_task("classification")
    seed = task.seeds()[0]
    (tmp_path / "cache").mkdir()
    job = Job(kind=JobKind.UNIT_TEST, task="classification", settings=task.settings_to_dict(task.presets()["cpu"]),
              cache_dir=str(tmp_path / "cache"), code=seed.code, candidate_id="docker-on-ray")

    result = backend.run(job, tmp_path / "job", Limits(timeout_s=300, memory_mb=2048, cpus=1))

    assert result.ok, f"{result.category}: {result.reason}\n{result.log_tail}"
    assert (tmp_path / "job" / RESULT_FILE).is_file()
