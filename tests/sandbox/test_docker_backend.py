"""The Docker backend with real containers: deadlines, OOM, failures, leftovers, GPU requests.

Most tests replace the backend's worker command with a short Python one-liner
that hangs, crashes or writes no result, so each failure path runs through
`DockerBackend.run` exactly as a misbehaving worker would. The last tests run
the real worker on the preference task.
"""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sandbox.backend import Limits, SandboxUnavailable
from sandbox.docker_backend import LABEL_MANAGED, LABEL_RUN_ID, DockerBackend
from sandbox.protocol import LOG_FILE, Job, JobKind, Stage

# How long after the deadline a killed container may still count as running:
# one kill and one wait round trip to the Docker engine.
KILL_GRACE_S = 2.0

WRITE_RESULT = (
    "from pathlib import Path; from sandbox.protocol import Stage, StageResult; "
    "StageResult(ok=True, stage=Stage.UNIT_TEST, metrics={'written_by': 'container'}).write(Path('/job'))"
)
HANG = "import time; time.sleep(3600)"


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


def make_backend(run_id: str, command: str, **options) -> DockerBackend:
    backend = DockerBackend(run_id, **options)
    backend.worker_command = ("python", "-c", command)
    return backend


def make_job(tmp_path: Path, kind: JobKind = JobKind.UNIT_TEST, candidate_id: str = "c1", code: str = "") -> Job:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(exist_ok=True)
    return Job(
        kind=kind, task="preference", settings={}, cache_dir=str(cache_dir), code=code, candidate_id=candidate_id
    )


def containers_of(backend: DockerBackend, run_id: str) -> list:
    """Return the run's containers, running or not: `docker ps -a --filter label=evolve.run_id=...`."""
    return backend.client.containers.list(all=True, filters={"label": f"{LABEL_RUN_ID}={run_id}"})


SMALL = Limits(timeout_s=60, memory_mb=512, cpus=1.0)


# --- results and failures ------------------------------------------------------


@pytest.mark.docker
def test_result_file_is_returned(backend, run_id, tmp_path):
    backend.worker_command = ("python", "-c", WRITE_RESULT)
    result = backend.run(make_job(tmp_path), tmp_path / "job", SMALL)
    assert result.ok, result.reason + result.log_tail
    assert result.stage is Stage.UNIT_TEST
    assert result.metrics == {"written_by": "container"}
    assert 0 < result.wall_s < SMALL.timeout_s
    assert containers_of(backend, run_id) == []


@pytest.mark.docker
def test_timeout_kills_and_removes_container(backend, run_id, tmp_path):
    backend.worker_command = ("python", "-c", HANG)
    limits = Limits(timeout_s=3, memory_mb=256, cpus=0.5)
    result = backend.run(make_job(tmp_path), tmp_path / "job", limits)

    assert not result.ok
    assert result.stage is Stage.SANDBOX
    assert result.category == "timeout"
    assert result.reason.startswith("timed out after ")
    assert "(limit 3 s)" in result.reason
    assert limits.timeout_s <= result.wall_s < limits.timeout_s + KILL_GRACE_S
    assert containers_of(backend, run_id) == []


@pytest.mark.docker
def test_hung_job_does_not_delay_others(backend, run_id, tmp_path):
    """Three jobs at once: the hung one is killed at its own deadline and the others finish."""
    limits = Limits(timeout_s=4, memory_mb=256, cpus=0.5)
    jobs = [("fast-a", WRITE_RESULT), ("hung", HANG), ("fast-b", WRITE_RESULT)]

    def run_one(candidate: str, command: str):
        job_backend = make_backend(run_id, command)
        return job_backend.run(make_job(tmp_path, candidate_id=candidate), tmp_path / candidate, limits)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {candidate: pool.submit(run_one, candidate, command) for candidate, command in jobs}
        results = {candidate: future.result() for candidate, future in futures.items()}
    elapsed = time.monotonic() - started

    assert results["fast-a"].ok, results["fast-a"].reason
    assert results["fast-b"].ok, results["fast-b"].reason
    assert results["hung"].category == "timeout"
    assert results["hung"].wall_s < limits.timeout_s + KILL_GRACE_S
    # the generation ends with the hung job's deadline, not with its hour-long sleep
    assert elapsed < 60
    assert containers_of(backend, run_id) == []


@pytest.mark.docker
def test_progress_events_reach_callback(backend, tmp_path):
    command = (
        "import json, time\n"
        "for step in range(3):\n"
        "    with open('/job/progress.jsonl', 'a') as handle:\n"
        "        handle.write(json.dumps({'step': step, 'total': 3, 'message': 'training'}) + '\\n')\n"
        "    time.sleep(0.6)\n" + WRITE_RESULT
    )
    backend.worker_command = ("python", "-c", command)
    events = []
    result = backend.run(make_job(tmp_path), tmp_path / "job", SMALL, on_progress=events.append)
    assert result.ok, result.reason + result.log_tail
    assert [event["step"] for event in events] == [0, 1, 2]
    assert events[0]["message"] == "training"


@pytest.mark.docker
def test_oom_kill_is_reported(backend, run_id, tmp_path):
    # bytes multiplication writes every page, so the 400 MiB are really resident
    backend.worker_command = ("python", "-c", "data = b'x' * (400 * 1024 * 1024)")
    result = backend.run(make_job(tmp_path), tmp_path / "job", Limits(timeout_s=60, memory_mb=128, cpus=1.0))
    assert not result.ok
    assert result.stage is Stage.SANDBOX
    assert result.category == "oom"
    assert "128 MiB" in result.reason
    assert containers_of(backend, run_id) == []


@pytest.mark.docker
def test_exit_zero_without_result_fails(backend, tmp_path):
    backend.worker_command = ("python", "-c", "print('worker forgot its result')")
    result = backend.run(make_job(tmp_path), tmp_path / "job", SMALL)
    assert not result.ok
    assert result.stage is Stage.SANDBOX
    assert result.category == "no_result"
    assert "status 0" in result.reason
    assert "result.json" in result.reason
    assert "worker forgot its result" in result.log_tail


@pytest.mark.docker
def test_nonzero_exit_reports_log_tail(backend, tmp_path):
    backend.worker_command = ("python", "-c", "import sys; print('fatal: marker-42', file=sys.stderr); sys.exit(3)")
    result = backend.run(make_job(tmp_path), tmp_path / "job", SMALL)
    assert not result.ok
    assert result.category == "crash"
    assert "status 3" in result.reason
    assert "fatal: marker-42" in result.reason
    assert "fatal: marker-42" in result.log_tail
    assert "fatal: marker-42" in (tmp_path / "job" / LOG_FILE).read_text()


@pytest.mark.docker
def test_stale_result_is_not_reused(backend, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "result.json").write_text(json.dumps({"ok": True, "stage": "unit_test"}))
    backend.worker_command = ("python", "-c", "pass")
    result = backend.run(make_job(tmp_path), job_dir, SMALL)
    assert not result.ok
    assert result.category == "no_result"


@pytest.mark.docker
def test_result_symlink_is_not_followed(backend, tmp_path):
    # inside the container the link dangles; on the host it would point at a real file
    backend.worker_command = ("python", "-c", "import os; os.symlink('/etc/hostname', '/job/result.json')")
    result = backend.run(make_job(tmp_path), tmp_path / "job", SMALL)
    assert not result.ok
    assert result.category == "invalid_result"


@pytest.mark.docker
def test_log_file_is_bounded(run_id, tmp_path):
    limit = 64 * 1024
    command = "import sys; sys.stdout.write(('x' * 1023 + '\\n') * 2048); print('END-MARKER')"
    try:
        backend = make_backend(run_id, command, log_limit_bytes=limit)
    except SandboxUnavailable as error:
        pytest.skip(f"the Docker sandbox is not usable here: {error}")
    backend.run(make_job(tmp_path), tmp_path / "job", SMALL)
    log = (tmp_path / "job" / LOG_FILE).read_text()
    # 2 MiB were printed; the log keeps the last `limit` bytes plus a one-line note
    assert len(log) <= limit + 100
    assert log.rstrip().endswith("END-MARKER")
    assert log.startswith("[earlier output cut")


# --- mounts ----------------------------------------------------------------------


@pytest.mark.docker
def test_cache_is_read_only_at_container_path(backend, tmp_path):
    job = make_job(tmp_path)
    # transformers saves model.safetensors with mode 0600
    (Path(job.cache_dir) / "model.txt").write_text("weights")
    (Path(job.cache_dir) / "model.txt").chmod(0o600)
    command = (
        "import errno, json\n"
        "print('cache_dir=' + json.load(open('/job/job.json'))['cache_dir'])\n"
        "print('cached=' + open('/cache/model.txt').read())\n"
        "try:\n"
        "    open('/cache/new.txt', 'w')\n"
        "    print('cache_write=ok')\n"
        "except OSError as error:\n"
        "    print('cache_write=' + errno.errorcode[error.errno])\n"
    )
    backend.worker_command = ("python", "-c", command)
    backend.run(job, tmp_path / "job", SMALL)
    log = (tmp_path / "job" / LOG_FILE).read_text()
    assert "cache_dir=/cache" in log
    assert "cached=weights" in log
    assert "cache_write=EROFS" in log
    assert not (Path(job.cache_dir) / "new.txt").exists()


@pytest.mark.docker
def test_prepare_job_can_fill_cache(backend, tmp_path):
    job = make_job(tmp_path, kind=JobKind.PREPARE)
    backend.worker_command = ("python", "-c", "open('/cache/built.txt', 'w').write('prepared'); " + WRITE_RESULT)
    result = backend.run(job, tmp_path / "job", SMALL)
    assert result.ok, result.reason + result.log_tail
    assert (Path(job.cache_dir) / "built.txt").read_text() == "prepared"


# --- leftovers, GPU and engine checks ------------------------------------------------


@pytest.mark.docker
def test_leftovers_of_crashed_engine_are_removed(backend, run_id):
    # containers that a crashed engine left behind: still running, labelled with its run id
    other_run = f"{run_id}-other"
    for labels in (
        {LABEL_MANAGED: "1", LABEL_RUN_ID: run_id},
        {LABEL_MANAGED: "1", LABEL_RUN_ID: run_id},
        {LABEL_MANAGED: "1", LABEL_RUN_ID: other_run},
    ):
        backend.client.containers.run(
            backend.image, ["sleep", "3600"], detach=True, labels=labels, network_mode="none"
        )
    assert len(containers_of(backend, run_id)) == 2

    restarted = DockerBackend(run_id)
    try:
        assert restarted.cleanup_leftovers(run_id) == 2
        assert containers_of(backend, run_id) == []
        assert len(containers_of(backend, other_run)) == 1
    finally:
        restarted.cleanup_leftovers(other_run)


@pytest.mark.docker
def test_gpu_request_without_gpu_raises(backend, run_id, tmp_path):
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has an NVIDIA GPU, so a GPU request can succeed")
    backend.worker_command = ("python", "-c", WRITE_RESULT)
    limits = Limits(timeout_s=60, memory_mb=512, cpus=1.0, gpu=True)
    with pytest.raises(SandboxUnavailable, match="GPU was requested") as raised:
        backend.run(make_job(tmp_path), tmp_path / "job", limits)
    assert "NVIDIA Container Toolkit" in str(raised.value)
    assert containers_of(backend, run_id) == []


@pytest.mark.docker
def test_missing_image_names_build_command(backend, run_id):
    with pytest.raises(SandboxUnavailable, match="evolve sandbox build"):
        DockerBackend(run_id, image="evolve-sandbox:no-such-tag")


def test_unreachable_engine_raises(tmp_path):
    with pytest.raises(SandboxUnavailable, match="is unreachable"):
        DockerBackend("unreachable", docker_host=f"unix://{tmp_path}/no-docker.sock")


# --- the real worker on the preference task ---------------------------------------

DPO = """import torch.nn.functional as F

def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    logits = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    return -F.logsigmoid(beta * logits)
"""

MEAN_REDUCED = """import torch.nn.functional as F

def loss_fn(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta):
    logits = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    losses = -F.logsigmoid(beta * logits)
    return losses.mean()
"""

WORKER_MODULES = ("sandbox.loader", "sandbox.static_check", "evaluators.preference")


def require_worker_modules() -> None:
    missing = [name for name in WORKER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the sandbox worker cannot run preference jobs yet: missing {', '.join(missing)}")


UNIT_TEST_LIMITS = Limits(timeout_s=300, memory_mb=2048, cpus=1.0)


@pytest.mark.docker
def test_preference_unit_test_accepts_dpo(backend, run_id, tmp_path):
    require_worker_modules()
    result = backend.run(make_job(tmp_path, code=DPO), tmp_path / "job", UNIT_TEST_LIMITS)
    assert result.ok, f"{result.category}: {result.reason}\n{result.log_tail}"
    assert result.stage is Stage.UNIT_TEST
    assert containers_of(backend, run_id) == []


@pytest.mark.docker
def test_preference_unit_test_rejects_mean(backend, tmp_path):
    require_worker_modules()
    result = backend.run(make_job(tmp_path, code=MEAN_REDUCED), tmp_path / "job", UNIT_TEST_LIMITS)
    assert not result.ok
    assert result.stage is Stage.UNIT_TEST, f"{result.category}: {result.reason}\n{result.log_tail}"
    assert result.category == "shape"
    assert "do not reduce" in result.reason
