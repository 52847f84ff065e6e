"""Sandbox backend that runs each job in a fresh, locked-down Docker container.

Every container gets no network (`network_mode="none"`), a read-only root
filesystem with a small tmpfs at /tmp, no capabilities, no-new-privileges, a
non-root user, an explicit allow-listed environment and the memory, CPU, PID
and file-size limits of the job. The only writable mount is the job directory
at /job. The image contains third-party packages only, and the `sandbox` and
`evaluators` packages are mounted read-only from the host at /opt/evolve/src,
so the engine's code never enters the container and a code change needs no
image rebuild.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import secrets
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from sandbox.backend import BackendKind, Limits, SandboxBackend, SandboxUnavailable
from sandbox.process_backend import ProgressCallback
from sandbox.protocol import (
    JOB_FILE,
    LOG_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
    Job,
    JobKind,
    ProgressTail,
    Stage,
    StageResult,
)

logger = logging.getLogger(__name__)

DEFAULT_IMAGE = "evolve-sandbox:cpu"
BUILD_HINT = "build it with: evolve sandbox build"

CONTAINER_JOB_DIR = "/job"
CONTAINER_CACHE_DIR = "/cache"
CONTAINER_SOURCE_DIR = "/opt/evolve/src"
# The packages a worker imports; the engine package is deliberately absent.
SOURCE_PACKAGES = ("sandbox", "evaluators")

LABEL_MANAGED = "evolve.managed"
LABEL_RUN_ID = "evolve.run_id"
LABEL_CANDIDATE_ID = "evolve.candidate_id"
LABEL_KIND = "evolve.kind"

# uid and gid of Debian's "nobody", used when the engine itself runs as root.
NOBODY_ID = 65534
MAX_RESULT_BYTES = 16 * 1024 * 1024
LOG_TAIL_CHARS = 4000
# How often progress events are read while a job runs, in seconds.
PROGRESS_POLL_S = 1.0


@dataclass(frozen=True)
class ContainerRun:
    """Outcome of one container run.

    Attributes:
        name: container name.
        exit_code: the main process's exit status, or None when the run timed out.
        timed_out: the backend killed the container at the deadline.
        oom_killed: Docker reported an out-of-memory kill in the container.
        wall_s: seconds from container start to exit or kill.
        logs: stdout and stderr, cut to the backend's log limit (the end is kept).
    """

    name: str
    exit_code: int | None
    timed_out: bool
    oom_killed: bool
    wall_s: float
    logs: str


def container_environment(limits: Limits) -> dict[str, str]:
    """Return the complete environment of a sandbox container, with nothing taken from the host."""
    threads = str(max(1, math.floor(limits.cpus)))
    return {
        "HOME": "/tmp",
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "PYTHONPATH": CONTAINER_SOURCE_DIR,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "HF_HOME": "/tmp/huggingface",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        # a fixed cuBLAS workspace, one of the settings for deterministic CUDA runs (PyTorch notes, "Reproducibility")
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }


def container_name(run_id: str, candidate_id: str, kind: str) -> str:
    """Return `evolve-<run_id>-<candidate>-<kind>`, with characters Docker rejects replaced by '_'."""
    parts = [run_id or "run", candidate_id or "none", kind]
    cleaned = [re.sub(r"[^A-Za-z0-9_.-]", "_", part)[:64] for part in parts]
    return "evolve-" + "-".join(cleaned)


class DockerBackend(SandboxBackend):
    """Runs `python -m sandbox.worker /job` in one new container per job."""

    kind = BackendKind.DOCKER
    # The command each job container runs; tests replace it to simulate a
    # worker that hangs, crashes or writes no result.
    worker_command: tuple[str, ...] = ("python", "-m", "sandbox.worker", CONTAINER_JOB_DIR)

    def __init__(
        self,
        run_id: str,
        *,
        image: str = DEFAULT_IMAGE,
        source_root: Path | None = None,
        tmpfs_mb: int = 512,
        log_limit_bytes: int = 1024 * 1024,
        docker_host: str | None = None,
    ) -> None:
        """Connect to the Docker engine and check that `image` exists.

        Args:
            run_id: the engine run's id, used in container names and labels.
            image: the sandbox image; DEFAULT_IMAGE is built by `evolve sandbox build`.
            source_root: directory that contains the `sandbox` and `evaluators`
                packages; defaults to the one this module was imported from.
            tmpfs_mb: size of the tmpfs at /tmp in MiB; it counts against the memory limit.
            log_limit_bytes: most container output kept in the job's log file.
            docker_host: engine address such as "unix:///var/run/docker.sock";
                None reads DOCKER_HOST and the other standard variables.

        Raises:
            SandboxUnavailable: the Docker engine is unreachable or the image is missing.
        """
        self.run_id = run_id
        self.image = image
        self.source_root = (source_root or Path(__file__).resolve().parents[1]).resolve()
        self.tmpfs_mb = tmpfs_mb
        self.log_limit_bytes = log_limit_bytes
        missing = [name for name in SOURCE_PACKAGES if not (self.source_root / name / "__init__.py").is_file()]
        if missing:
            raise ValueError(
                f"source_root {self.source_root} lacks the package(s) {missing} that the container imports; "
                "pass the directory that contains sandbox/ and evaluators/"
            )
        self.client = _connect(docker_host)
        try:
            self.client.images.get(image)
        except ImageNotFound:
            raise SandboxUnavailable(f"Docker image {image!r} not found; {BUILD_HINT}") from None
        except (APIError, requests.exceptions.RequestException) as error:
            raise SandboxUnavailable(f"could not inspect Docker image {image!r}: {error}") from error

    def describe(self) -> str:
        return (
            f"docker ({self.image}; no network, read-only root filesystem, "
            f"uid {_container_user().split(':')[0]}, all capabilities dropped)"
        )

    # --- jobs ---------------------------------------------------------------

    def run(
        self, job: Job, job_dir: Path, limits: Limits, on_progress: ProgressCallback | None = None
    ) -> StageResult:
        """Run one worker job in a new container, as SandboxBackend.run describes.

        `on_progress` receives each event the worker appends to its progress
        file, read about once a second while the job runs.
        """
        job_dir = job_dir.resolve()
        job_dir.mkdir(parents=True, exist_ok=True)
        mounts: list[Mount] = []

        # the worker reads the container-side cache path, never the host path
        if job.cache_dir:
            cache_dir = Path(job.cache_dir).resolve()
            if job.kind is JobKind.PREPARE:
                # prepare jobs run trusted task code only, and they fill the cache
                cache_dir.mkdir(parents=True, exist_ok=True)
                _give_to_container_user(cache_dir)
            elif not cache_dir.is_dir():
                raise ValueError(f"cache directory {cache_dir} does not exist; run the task's prepare job first")
            else:
                _make_readable_by_container(cache_dir)
            read_only = job.kind is not JobKind.PREPARE
            mounts.append(Mount(CONTAINER_CACHE_DIR, str(cache_dir), type="bind", read_only=read_only))
            job = dataclasses.replace(job, cache_dir=CONTAINER_CACHE_DIR)
        # a file left by an earlier container in this directory is not trusted
        for stale in (RESULT_FILE, PROGRESS_FILE, JOB_FILE + ".tmp"):
            (job_dir / stale).unlink(missing_ok=True)
        job.write(job_dir)

        poll = None
        if on_progress is not None:
            tail = ProgressTail(job_dir / PROGRESS_FILE)

            def poll() -> None:
                for event in tail.poll():
                    on_progress(event)

        run = self.run_in_container(
            list(self.worker_command),
            job_dir,
            limits,
            kind=job.kind.value,
            candidate_id=job.candidate_id,
            extra_mounts=mounts,
            poll=poll,
        )
        _write_log(job_dir / LOG_FILE, run.logs)
        return self._stage_result(run, job_dir, limits)

    def run_in_container(
        self,
        command: Sequence[str],
        job_dir: Path,
        limits: Limits,
        *,
        kind: str,
        candidate_id: str = "",
        extra_mounts: Sequence[Mount] = (),
        poll: Callable[[], None] | None = None,
    ) -> ContainerRun:
        """Run `command` in a new sandbox container with `job_dir` at /job, then remove the container.

        The deadline counts from container start. At the deadline the container
        is killed and removed. A container that outlives removal raises
        SandboxUnavailable, because it would keep running unsupervised.
        `poll`, if given, is called every PROGRESS_POLL_S seconds and once at the end.
        """
        container = self.create_container(
            command, job_dir, limits, kind=kind, candidate_id=candidate_id, extra_mounts=extra_mounts
        )
        try:
            return self._supervise(container, limits, poll)
        finally:
            self._remove(container)

    def cleanup_leftovers(self, run_id: str) -> int:
        """Remove every container labelled with `run_id`, running or not; return how many."""
        if not run_id:
            raise ValueError("run_id is empty; pass the id of the run whose containers should be removed")
        filters = {"label": [f"{LABEL_MANAGED}=1", f"{LABEL_RUN_ID}={run_id}"]}
        leftovers = self.client.containers.list(all=True, filters=filters)
        for container in leftovers:
            self._remove(container)
        if leftovers:
            logger.info("removed %d leftover container(s) of run %s", len(leftovers), run_id)
        return len(leftovers)

    # --- container lifecycle --------------------------------------------------

    def create_container(
        self,
        command: Sequence[str],
        job_dir: Path,
        limits: Limits,
        *,
        kind: str,
        candidate_id: str = "",
        extra_mounts: Sequence[Mount] = (),
    ) -> Container:
        """Create, but do not start, a sandbox container; the caller must remove it."""
        job_dir = job_dir.resolve()
        if os.getuid() == 0:
            # the container runs as nobody (uid 65534) and writes its results here
            os.chown(job_dir, *_container_ids())
        labels = {LABEL_MANAGED: "1", LABEL_RUN_ID: self.run_id, LABEL_CANDIDATE_ID: candidate_id, LABEL_KIND: kind}
        name = container_name(self.run_id, candidate_id, kind)

        mounts = [Mount(CONTAINER_JOB_DIR, str(job_dir), type="bind", read_only=False)]
        for package in SOURCE_PACKAGES:
            source = str(self.source_root / package)
            mounts.append(Mount(f"{CONTAINER_SOURCE_DIR}/{package}", source, type="bind", read_only=True))
        mounts.extend(extra_mounts)

        command = list(command)
        output_bytes = limits.output_mb * 1024 * 1024
        environment = container_environment(limits)
        options = dict(
            image=self.image,
            command=command,
            name=name,
            labels=labels,
            user=_container_user(),
            environment=environment,
            working_dir=CONTAINER_JOB_DIR,
            hostname="sandbox",
            network_mode="none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={self.tmpfs_mb}m,mode=1777"},
            mounts=mounts,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            init=True,
            ipc_mode="private",
            mem_limit=f"{limits.memory_mb}m",
            memswap_limit=f"{limits.memory_mb}m",
            nano_cpus=int(limits.cpus * 1e9),
            pids_limit=limits.pids,
            ulimits=[
                Ulimit(name="fsize", soft=output_bytes, hard=output_bytes),
                Ulimit(name="core", soft=0, hard=0),
            ],
            # json-file keeps at most two files of the limit each, so a chatty
            # candidate cannot fill the Docker host's disk. Output beyond the
            # limit still leaves a full limit's worth to keep.
            log_config=LogConfig(
                type=LogConfig.types.JSON,
                config={"max-size": str(max(self.log_limit_bytes, 4096)), "max-file": "2"},
            ),
            device_requests=[DeviceRequest(count=1, capabilities=[["gpu"]])] if limits.gpu else None,
        )
        logger.debug("creating container %s (environment names: %s)", name, ", ".join(sorted(environment)))

        try:
            return self.client.containers.create(**options)
        except APIError as error:
            if error.status_code != 409:
                raise SandboxUnavailable(f"could not create container {name}: {error.explanation or error}") from error
        # 409: the name is taken, for example by the same candidate's job running twice
        options["name"] = f"{name}-{secrets.token_hex(3)}"
        try:
            return self.client.containers.create(**options)
        except APIError as error:
            explanation = error.explanation or error
            raise SandboxUnavailable(f"could not create container {options['name']}: {explanation}") from error

    def _supervise(self, container: Container, limits: Limits, poll: Callable[[], None] | None) -> ContainerRun:
        """Start `container`, wait for it until the deadline, and kill it there."""
        try:
            container.start()
        except APIError as error:
            raise _start_error(container.name, error, limits) from error
        started = time.monotonic()
        deadline = started + limits.timeout_s

        exit_code: int | None = None
        while exit_code is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait_s = min(remaining, PROGRESS_POLL_S) if poll else remaining
            waited_from = time.monotonic()
            try:
                exit_code = int(container.wait(timeout=wait_s)["StatusCode"])
            except NotFound as error:
                raise SandboxUnavailable(f"container {container.name} disappeared while it ran: {error}") from error
            except requests.exceptions.RequestException as error:
                # a read timeout is expected; a wait that failed early means the engine is in trouble
                if time.monotonic() - waited_from < wait_s / 2:
                    _ping(self.client)
                    raise SandboxUnavailable(f"waiting for container {container.name} failed: {error}") from error
            if poll:
                poll()

        timed_out = exit_code is None
        if timed_out:
            logger.info(
                "container %s reached its deadline of %g s; killing it", container.name, limits.timeout_s
            )
            _kill(container)
        wall_s = time.monotonic() - started

        container.reload()
        oom_killed = bool(container.attrs.get("State", {}).get("OOMKilled"))
        logs = self._read_logs(container)
        logger.debug("container %s ended: exit=%s oom=%s after %.2f s", container.name, exit_code, oom_killed, wall_s)
        return ContainerRun(container.name, exit_code, timed_out, oom_killed, wall_s, logs)

    def _read_logs(self, container: Container) -> str:
        try:
            raw = container.logs(stdout=True, stderr=True)
        except APIError as error:
            return f"[could not read the container's logs: {error}]"
        if len(raw) > self.log_limit_bytes:
            kept = raw[len(raw) - self.log_limit_bytes :]
            raw = f"[earlier output cut; the last {self.log_limit_bytes} bytes follow]\n".encode() + kept
        return raw.decode("utf-8", errors="replace")

    def _remove(self, container: Container) -> None:
        """Force-remove `container` and check that Docker no longer lists it."""
        for _ in range(3):
            try:
                container.remove(force=True)
            except NotFound:
                return
            except APIError as error:
                logger.warning("removing container %s failed: %s", container.name, error)
            try:
                self.client.containers.get(container.id)
            except NotFound:
                return
        raise SandboxUnavailable(
            f"container {container.name} could not be removed and may still be running; "
            f"remove it with: docker rm -f {container.name}"
        )

    # --- results --------------------------------------------------------------

    def _stage_result(self, run: ContainerRun, job_dir: Path, limits: Limits) -> StageResult:
        """Turn how the container ended, and the worker's result file if any, into a StageResult."""
        tail = run.logs[-LOG_TAIL_CHARS:]

        def failure(reason: str, category: str) -> StageResult:
            logger.info("job in container %s failed (%s): %s", run.name, category, reason)
            return StageResult(
                ok=False, stage=Stage.SANDBOX, reason=reason, category=category, wall_s=run.wall_s, log_tail=tail
            )

        if run.timed_out:
            return failure(
                f"timed out after {run.wall_s:.1f} s (limit {limits.timeout_s:g} s); "
                "the container was killed and removed",
                "timeout",
            )
        result_path = job_dir / RESULT_FILE
        if run.exit_code == 0 and result_path.exists():
            try:
                result = _read_result(result_path)
            except (OSError, ValueError, KeyError, TypeError) as error:
                return failure(f"the worker's {RESULT_FILE} is invalid: {error}", "invalid_result")
            result.wall_s = run.wall_s
            result.log_tail = result.log_tail or tail
            return result
        if run.oom_killed:
            return failure(
                f"out of memory: the container was killed at its memory limit of {limits.memory_mb} MiB",
                "oom",
            )
        if run.exit_code == 0:
            return failure(f"the worker exited with status 0 but wrote no {RESULT_FILE}", "no_result")
        last_line = next((line for line in reversed(tail.splitlines()) if line.strip()), "no output")
        return failure(f"the worker exited with {_describe_exit(run.exit_code)}; last output: {last_line}", "crash")


def _connect(docker_host: str | None) -> docker.DockerClient:
    try:
        client = docker.DockerClient(base_url=docker_host) if docker_host else docker.from_env()
        client.ping()
    except (DockerException, requests.exceptions.RequestException) as error:
        raise SandboxUnavailable(
            f"the Docker engine at {docker_host or os.environ.get('DOCKER_HOST') or 'the default socket'} "
            f"is unreachable ({error}); start dockerd (as root: nohup dockerd &) or use the process backend"
        ) from error
    return client


def _ping(client: docker.DockerClient) -> None:
    try:
        client.ping()
    except (DockerException, requests.exceptions.RequestException) as error:
        raise SandboxUnavailable(f"the Docker engine became unreachable while a job ran: {error}") from error


def _container_ids() -> tuple[int, int]:
    """Return the container's uid and gid: the engine's own, or nobody's when the engine is root."""
    if os.getuid() == 0:
        return NOBODY_ID, NOBODY_ID
    return os.getuid(), os.getgid()


def _container_user() -> str:
    uid, gid = _container_ids()
    return f"{uid}:{gid}"


def _make_readable_by_container(directory: Path) -> None:
    """Add read permission for others to the files under `directory`, when the engine is root.

    A root engine's container runs as nobody (uid 65534), which cannot read
    files saved with mode 0600, such as the preference task's cached model.safetensors.
    """
    if os.getuid() != 0:
        return
    for parent, directories, files in os.walk(directory):
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = os.path.join(parent, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode) and not mode & stat.S_IROTH:
                os.chmod(path, mode | stat.S_IROTH)


def _give_to_container_user(directory: Path) -> None:
    """Make `directory` and everything in it owned by the container user, when the engine is root."""
    if os.getuid() != 0:
        return
    uid, gid = _container_ids()
    os.chown(directory, uid, gid)
    for parent, directories, files in os.walk(directory):
        for name in directories + files:
            # lchown: a link inside the cache must not hand over a file outside it
            os.lchown(os.path.join(parent, name), uid, gid)


def _start_error(name: str, error: APIError, limits: Limits) -> SandboxUnavailable:
    text = str(error.explanation or error)
    if limits.gpu and ("device driver" in text or "gpu" in text.lower() or "nvidia" in text.lower()):
        return SandboxUnavailable(
            f"a GPU was requested (Limits.gpu=True) but the Docker engine cannot provide one: {text}. "
            "Install the NVIDIA Container Toolkit and restart dockerd, or request no GPU; "
            "the job is not run on the CPU instead"
        )
    return SandboxUnavailable(f"could not start container {name}: {text}")


def _kill(container: Container) -> None:
    try:
        container.kill()
    except (NotFound, APIError) as error:
        # the container may have exited between the deadline and the kill
        logger.debug("kill of container %s: %s", container.name, error)


def _read_result(path: Path) -> StageResult:
    # the container wrote this file: a symbolic link must not make the engine read a host file
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > MAX_RESULT_BYTES:
            raise ValueError(f"{info.st_size} bytes, more than the {MAX_RESULT_BYTES} allowed")
        payload = json.loads(handle.read())
    if not isinstance(payload, dict):
        raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
    return StageResult.from_dict(payload)


def _write_log(path: Path, text: str) -> None:
    # the job directory is the container's, so a link planted there must not redirect the write
    path.unlink(missing_ok=True)
    with open(path, "x") as handle:
        handle.write(text)


def _describe_exit(code: int | None) -> str:
    if code is not None and code > 128:
        try:
            return f"status {code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"status {code}"
