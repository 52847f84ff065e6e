"""The node side of the Ray executor: one sandbox job per Ray task.

A task receives the job in its arguments, runs it with the node's process or
Docker backend in a private temporary directory, and yields the worker's
progress events, then the result and the job directory's files. The engine
machine and the node therefore share no job directory. They do share the
cache directory, which must exist at the same path on every node.

Candidate code never runs in the Ray worker itself: the inner backend starts
the usual sandbox worker process or container, and the Ray worker only waits
for it and copies files.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from sandbox.backend import BackendKind, Limits, SandboxBackend, SandboxUnavailable
from sandbox.protocol import Job, StageResult

# Job directories of tasks live here on each node, one per task, named
# "<ray worker pid>-<random>" so that a later task can remove the directories
# of workers that were killed before they could clean up.
JOBS_DIR_NAME = "evolve-ray-jobs"
# Files returned to the engine: at most this many bytes in all, and no file
# larger than MAX_RETURNED_FILE_BYTES. Larger files stay out and are listed.
MAX_RETURNED_BYTES = 64 * 1024 * 1024
MAX_RETURNED_FILE_BYTES = 16 * 1024 * 1024
# The sandbox's HOME: library caches that candidate code may fill, never read by the engine.
_NOT_RETURNED = ("home",)
_POLL_S = 0.5


@dataclass(frozen=True)
class InnerBackendSpec:
    """Which sandbox backend a node builds for its jobs, and its settings.

    Attributes:
        kind: the backend, or None to let the node choose as `--sandbox auto`
            does: Docker when its engine responds and has `image`, else the process backend.
        run_id: the engine run's id, used in Docker container names.
        image: the Docker image of the sandbox worker.
        allow_network: let the process backend run without network isolation.
        warm_start: let the process backend fork jobs from a warm worker.
    """

    kind: BackendKind | None
    run_id: str
    image: str
    allow_network: bool = False
    warm_start: bool = True

    def build(self) -> SandboxBackend:
        """Build the backend on this node; raise SandboxUnavailable when it cannot isolate jobs here."""
        if self.kind in (BackendKind.DOCKER, None):
            try:
                from sandbox.docker_backend import DockerBackend

                return DockerBackend(image=self.image, run_id=self.run_id)
            except (SandboxUnavailable, ImportError) as error:
                if self.kind is BackendKind.DOCKER:
                    raise SandboxUnavailable(f"the Docker sandbox is not usable on node {socket.gethostname()}: {error}") from None
        from sandbox.process_backend import ProcessBackend

        return ProcessBackend(require_network_isolation=not self.allow_network, warm=self.warm_start)


# Messages a node task yields, in this order: NodeStarted, any number of
# NodeProgress, then one NodeFinished or NodeUnavailable.


@dataclass(frozen=True)
class NodeStarted:
    """The task began on a node; `pid` is the Ray worker process."""

    node: str
    pid: int


@dataclass(frozen=True)
class NodeProgress:
    """Progress events the sandbox worker appended since the last message."""

    events: list[dict[str, Any]]


@dataclass(frozen=True)
class NodeFinished:
    """The job's result and the files of its job directory, keyed by relative POSIX path."""

    result: dict[str, Any]
    files: dict[str, bytes]
    left_out: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NodeUnavailable:
    """The node cannot run sandbox jobs at all (no isolation, no image, no cache); no candidate is at fault."""

    reason: str


@dataclass(frozen=True)
class NodeProbe:
    """Result of a probe task on a node: the backend that jobs would get there, or the problem that prevents one."""

    node: str
    kind: BackendKind | None
    description: str
    problem: str = ""


def probe_node(spec: InnerBackendSpec) -> NodeProbe:
    """Build the inner backend on a node to learn which sandbox jobs would get there."""
    node = socket.gethostname()
    try:
        backend = spec.build()
    except SandboxUnavailable as error:
        return NodeProbe(node=node, kind=None, description="", problem=str(error))
    return NodeProbe(node=node, kind=backend.kind, description=backend.describe())


def run_job_on_node(spec: InnerBackendSpec, job: Job, limits: Limits, cache_expected: bool) -> Iterator[Any]:
    """Run one sandbox job on this node and yield the messages listed above (a Ray streaming generator).

    `cache_expected` is true when the job's cache directory exists on the engine
    machine. Its absence here is then a node problem rather than a task without a cache.
    """
    node = socket.gethostname()
    yield NodeStarted(node=node, pid=os.getpid())

    if cache_expected and not Path(job.cache_dir).is_dir():
        yield NodeUnavailable(
            f"the cache directory {job.cache_dir} does not exist on node {node}; the cache of prepared models "
            "and data must be at the same path on every node (a shared filesystem, or a copy of the cache that "
            "the engine's prepare step filled)"
        )
        return
    try:
        backend = spec.build()
        if backend.kind is BackendKind.DOCKER:
            remove_orphaned_container(backend, job)
    except SandboxUnavailable as error:
        yield NodeUnavailable(f"node {node}: {error}")
        return

    jobs_root = Path(tempfile.gettempdir()) / JOBS_DIR_NAME
    jobs_root.mkdir(exist_ok=True)
    remove_orphaned_job_dirs(jobs_root)
    job_dir = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=jobs_root))
    try:
        # the inner backend runs in a thread so that this generator can yield progress meanwhile
        events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        outcome: dict[str, Any] = {}

        def run_inner() -> None:
            try:
                outcome["result"] = backend.run(job, job_dir, limits, on_progress=events.put)
            except SandboxUnavailable as error:
                outcome["unavailable"] = f"node {node}: {error}"
            except BaseException as error:  # noqa: BLE001 - re-raised in the task below
                outcome["error"] = error

        runner = threading.Thread(target=run_inner, name="evolve-sandbox-job", daemon=True)
        runner.start()
        while runner.is_alive():
            runner.join(_POLL_S)
            batch = drain(events)
            if batch:
                yield NodeProgress(batch)
        batch = drain(events)
        if batch:
            yield NodeProgress(batch)

        if "error" in outcome:
            raise outcome["error"]
        if "unavailable" in outcome:
            yield NodeUnavailable(outcome["unavailable"])
            return
        result: StageResult = outcome["result"]
        files, left_out = collect_files(job_dir)
        yield NodeFinished(result=result.to_dict(), files=files, left_out=left_out)
    finally:
        shutil.rmtree(job_dir, ignore_errors=True)


def drain(events: queue.SimpleQueue) -> list[dict[str, Any]]:
    batch = []
    while True:
        try:
            batch.append(events.get_nowait())
        except queue.Empty:
            return batch


def remove_orphaned_container(backend: SandboxBackend, job: Job) -> None:
    """Remove the container of an earlier try of this job whose Ray worker was killed on this node.

    Container names are unique per run, candidate and job kind, and the engine
    never runs one candidate's job twice at once, so a container with this
    job's name belongs to a dead try.
    NOTE: the container of an earlier try on another node is not removed, and runs until its job ends.
    """
    from docker.errors import APIError, NotFound

    from sandbox.docker_backend import container_name

    name = container_name(backend.run_id, job.candidate_id, job.kind.value)
    try:
        backend.client.containers.get(name).remove(force=True)
    except NotFound:
        return
    except APIError as error:
        raise SandboxUnavailable(f"the container {name} of an earlier try could not be removed: {error}") from None


def remove_orphaned_job_dirs(jobs_root: Path) -> int:
    """Delete job directories whose Ray worker process no longer exists; return how many."""
    removed = 0
    for entry in jobs_root.iterdir():
        owner, _, _ = entry.name.partition("-")
        if not owner.isdigit() or _process_exists(int(owner)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect_files(job_dir: Path) -> tuple[dict[str, bytes], list[str]]:
    """Read the regular files of a job directory for the engine, within the size limits.

    Candidate code can write into the job directory, so symbolic links and
    other special files are never followed or read, and every file is opened
    with O_NOFOLLOW. Returns the files and a line for each file left out.
    """
    files: dict[str, bytes] = {}
    left_out: list[str] = []
    total = 0
    for directory, subdirectories, names in os.walk(job_dir, followlinks=False):
        relative_dir = Path(directory).relative_to(job_dir)
        if relative_dir == Path("."):
            subdirectories[:] = [name for name in subdirectories if name not in _NOT_RETURNED]
        subdirectories.sort()
        for name in sorted(names):
            path = Path(directory) / name
            relative = (relative_dir / name).as_posix()
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                left_out.append(f"{relative} (not a regular file)")
                continue
            if info.st_size > MAX_RETURNED_FILE_BYTES or total + info.st_size > MAX_RETURNED_BYTES:
                left_out.append(f"{relative} ({info.st_size} bytes, over the size limit)")
                continue
            try:
                descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError as error:
                left_out.append(f"{relative} (unreadable: {error.strerror})")
                continue
            with os.fdopen(descriptor, "rb") as handle:
                data = handle.read(MAX_RETURNED_FILE_BYTES + 1)
            if len(data) > MAX_RETURNED_FILE_BYTES or total + len(data) > MAX_RETURNED_BYTES:
                left_out.append(f"{relative} (grew past the size limit while it was read)")
                continue
            files[relative] = data
            total += len(data)
    return files, left_out


def write_files(job_dir: Path, files: dict[str, bytes]) -> None:
    """Write files returned by a node into the engine's job directory.

    Raises:
        ValueError: a path is absolute or leaves the job directory; a node
            never returns one, so it means the message was tampered with.
    """
    for relative, data in files.items():
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise ValueError(f"returned file path {relative!r} is not inside the job directory")
        target = job_dir.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        # replace rather than write through an existing file, which might be a symbolic link
        target.unlink(missing_ok=True)
        target.write_bytes(data)
