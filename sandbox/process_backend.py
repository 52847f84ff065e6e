"""Process backend: runs each job in a child process with limits and no network.

Isolation on Linux: a new session (so the whole process group can be killed),
a new user and network namespace via `unshare -rn` when the kernel allows it
(the child then sees only a loopback interface that is down), resource limits
set with setrlimit, and an environment built from an allow-list so that API
keys in the engine's environment never reach candidate code. GPUs are hidden.
The Docker backend adds a read-only root filesystem, dropped capabilities and
a pids limit.

By default jobs are forked from a warm worker (sandbox/forkserver.py) that
runs in the same sandbox and has imported torch and the task's modules once;
`warm=False` starts a fresh interpreter per job instead. Both give a job the
same isolation, limits and environment.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from sandbox.backend import BackendKind, Limits, SandboxBackend, SandboxUnavailable
from sandbox.forkserver import ForkedJob, ForkServer, ForkServerError, set_parent_death_signal
from sandbox.protocol import LOG_FILE, PROGRESS_FILE, RESULT_FILE, Job, ProgressTail, Stage, StageResult

logger = logging.getLogger(__name__)

# Environment variables copied from the engine's environment. Everything else,
# API keys and tokens included, is dropped.
_ENV_ALLOW_LIST = ("LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# Fixed values set for every job. The process sandbox assigns no GPU, so none is visible.
_ENV_FIXED = {
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    "TQDM_DISABLE": "1",
}
_LOG_TAIL_CHARS = 4000
_POLL_S = 0.25
_KILL_WAIT_S = 10.0

ProgressCallback = Callable[[dict], None]


def network_isolation_available() -> bool:
    """Return whether `unshare -rn` can create a network namespace here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        completed = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return completed.returncode == 0


def _project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def build_environment(home: Path, threads: int) -> dict[str, str]:
    """Return the complete environment of a job; nothing else is inherited."""
    env = {key: os.environ[key] for key in _ENV_ALLOW_LIST if key in os.environ}
    env.update(_ENV_FIXED)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
    env["HOME"] = str(home)
    env["PYTHONPATH"] = str(_project_root())
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def read_log_tail(path: Path, limit: int = _LOG_TAIL_CHARS) -> str:
    """Return the last `limit` characters of a log file, or "" when it is missing."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class ProcessBackend(SandboxBackend):
    """Runs jobs as child processes of the engine, or of its warm fork server."""

    kind = BackendKind.PROCESS

    def __init__(self, require_network_isolation: bool = True, warm: bool = True) -> None:
        self.network_isolated = network_isolation_available()
        self.warm = warm
        if not self.network_isolated:
            if require_network_isolation:
                raise SandboxUnavailable(
                    "the process sandbox cannot isolate the network: `unshare -rn true` failed "
                    "(user namespaces disabled or util-linux missing). Use --sandbox docker, enable "
                    "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1), or set "
                    "sandbox.allow_network = true in the config to run candidates with network access."
                )
            logger.warning(
                "process sandbox runs WITHOUT network isolation because sandbox.allow_network is set"
            )

    def describe(self) -> str:
        network = "no network (user+network namespace)" if self.network_isolated else "NETWORK NOT ISOLATED"
        start = "forked from a warm worker" if self.warm else "fresh interpreter per job"
        return f"process sandbox: child process ({start}), {network}, rlimits, scrubbed environment"

    def _sandboxed(self, command: list[str]) -> list[str]:
        return ["unshare", "-rn", *command] if self.network_isolated else command

    def command(self, job_dir: Path) -> list[str]:
        """Return the command of a cold job: a fresh interpreter that runs the worker on `job_dir`."""
        return self._sandboxed([sys.executable, "-m", "sandbox.worker", str(job_dir)])

    def fork_server(self) -> ForkServer:
        """Return the warm fork server of this sandbox, shared by every backend of the process.

        The server starts with the first job that uses it.
        """
        return _shared_fork_server(self.network_isolated, self._sandboxed([sys.executable, "-m", "sandbox.forkserver"]))

    def run(
        self,
        job: Job,
        job_dir: Path,
        limits: Limits,
        on_progress: ProgressCallback | None = None,
    ) -> StageResult:
        if limits.gpu:
            raise SandboxUnavailable(
                "the process sandbox does not assign GPUs; use --sandbox docker for GPU jobs "
                "or set the task's device to cpu"
            )
        # the worker runs with the job directory as its working directory, so a relative path would not resolve there
        job_dir = job_dir.absolute()
        job_dir.mkdir(parents=True, exist_ok=True)
        for stale in (RESULT_FILE, PROGRESS_FILE):
            (job_dir / stale).unlink(missing_ok=True)
        job.write(job_dir)
        (job_dir / "home").mkdir(exist_ok=True)
        log_path = job_dir / LOG_FILE
        tail = ProgressTail(job_dir / PROGRESS_FILE)

        start = time.monotonic()
        deadline = start + limits.timeout_s
        forked = None
        if self.warm:
            try:
                forked = self.fork_server().start(job_dir, job.task, limits.memory_mb, limits.output_mb,
                                                  threads=max(1, int(limits.cpus)))
            except ForkServerError as error:
                logger.log(logging.DEBUG if str(error) in _warned else logging.WARNING,
                           "warm worker unavailable, this job starts a fresh interpreter: %s", error)
                _warned.add(str(error))
        if forked is not None:
            timed_out, returncode = _watch_forked(forked, deadline, tail, on_progress)
        else:
            timed_out, returncode = self._run_cold(job_dir, limits, deadline, tail, on_progress)
        wall_s = time.monotonic() - start
        log_tail = read_log_tail(log_path)

        if timed_out:
            return StageResult(
                ok=False,
                stage=Stage.SANDBOX,
                category="timeout",
                reason=f"timed out after {wall_s:.0f} s (limit {limits.timeout_s:.0f} s); "
                "the process group was killed. Make the code cheaper or raise the stage's timeout.",
                wall_s=wall_s,
                log_tail=log_tail,
            )
        if returncode is None:
            return StageResult(
                ok=False,
                stage=Stage.SANDBOX,
                category="crash",
                reason="the warm worker that forked this job died before the job ended, so the job was killed "
                "with it; run again, or set sandbox.warm_start = false to start each job in a fresh interpreter",
                wall_s=wall_s,
                log_tail=log_tail,
            )
        return _result_from_exit(job_dir, returncode, wall_s, log_tail, limits)

    def _run_cold(
        self, job_dir: Path, limits: Limits, deadline: float, tail: ProgressTail, on_progress: ProgressCallback | None
    ) -> tuple[bool, int]:
        env = build_environment(job_dir / "home", threads=max(1, int(limits.cpus)))

        def apply_limits() -> None:
            # the engine's job thread lives until the job ends, so the signal follows the engine
            set_parent_death_signal()
            memory = limits.memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            output = limits.output_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_FSIZE, (output, output))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        with open(job_dir / LOG_FILE, "ab") as log:
            process = subprocess.Popen(
                self.command(job_dir),
                cwd=job_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=apply_limits,
            )
            timed_out = False
            try:
                while True:
                    try:
                        process.wait(timeout=_POLL_S)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    _forward(tail, on_progress)
                    if time.monotonic() >= deadline:
                        timed_out = True
                        break
            finally:
                # kill the whole process group, then reap the child so no zombie is left
                if process.poll() is None:
                    _kill_group(process.pid)
                process.wait()
                _kill_group(process.pid)
        return timed_out, process.returncode


def _forward(tail: ProgressTail, on_progress: ProgressCallback | None) -> None:
    if on_progress is not None:
        for event in tail.poll():
            on_progress(event)


def _watch_forked(
    forked: ForkedJob, deadline: float, tail: ProgressTail, on_progress: ProgressCallback | None
) -> tuple[bool, int | None]:
    """Wait for a forked job until its deadline.

    Returns whether it timed out, and its exit status, or None when the server died.
    """
    timed_out = False
    try:
        while not forked.wait(_POLL_S):
            _forward(tail, on_progress)
            if time.monotonic() >= deadline:
                timed_out = True
                break
    finally:
        if not forked.wait(0):
            # the server is the child's parent: it kills the process group and reports the exit
            forked.kill()
            if not forked.wait(_KILL_WAIT_S) and forked.pid is not None:
                _kill_group(forked.pid)
                forked.wait(_KILL_WAIT_S)
    return timed_out, forked.returncode


_servers: dict[tuple, ForkServer] = {}
_warned: set[str] = set()
_servers_lock = threading.Lock()


def _shared_fork_server(network_isolated: bool, command: list[str]) -> ForkServer:
    key = (network_isolated, tuple(command), tuple((name, os.environ.get(name)) for name in _ENV_ALLOW_LIST))
    with _servers_lock:
        server = _servers.get(key)
        if server is None:
            work_dir = Path(tempfile.mkdtemp(prefix="evolve-forkserver-"))
            (work_dir / "home").mkdir()
            # The server imports with one thread, so OpenBLAS and MKL start no thread pool that a fork would break.
            # Each child then sets its own job's thread count.
            env = build_environment(work_dir / "home", threads=1)
            server = ForkServer(command, env, work_dir)
            _servers[key] = server
        return server


def close_fork_servers() -> None:
    """Stop every warm fork server of this process and remove its scratch directory."""
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close()
        shutil.rmtree(server.work_dir, ignore_errors=True)


atexit.register(close_fork_servers)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _result_from_exit(job_dir: Path, returncode: int, wall_s: float, log_tail: str, limits: Limits) -> StageResult:
    result_path = job_dir / RESULT_FILE
    if returncode == 0 and result_path.exists():
        try:
            result = StageResult.from_dict(json.loads(result_path.read_text()))
        except (ValueError, KeyError, TypeError) as error:
            return StageResult(
                ok=False,
                stage=Stage.SANDBOX,
                category="bad_result",
                reason=f"the worker wrote an unreadable result file ({error})",
                wall_s=wall_s,
                log_tail=log_tail,
            )
        result.wall_s = wall_s
        result.log_tail = log_tail
        return result
    if returncode == 0:
        reason = "the worker exited with status 0 but wrote no result file"
        category = "no_result"
    elif returncode < 0:
        name = signal.Signals(-returncode).name
        reason = f"the worker was killed by {name}"
        category = "killed"
        if "MemoryError" in log_tail or "std::bad_alloc" in log_tail or "Cannot allocate memory" in log_tail:
            category = "oom"
            reason = f"out of memory: the job exceeded its {limits.memory_mb} MiB limit"
    else:
        reason = f"the worker exited with status {returncode}"
        category = "crash"
        if "MemoryError" in log_tail or "std::bad_alloc" in log_tail or "Cannot allocate memory" in log_tail:
            category = "oom"
            reason = f"out of memory: the job exceeded its {limits.memory_mb} MiB limit"
        last_line = log_tail.strip().splitlines()[-1] if log_tail.strip() else ""
        if last_line and category == "crash":
            reason += f": {last_line[:300]}"
    return StageResult(ok=False, stage=Stage.SANDBOX, category=category, reason=reason, wall_s=wall_s, log_tail=log_tail)
