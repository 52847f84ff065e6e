"""Process backend: runs each job in a child process with limits and no network.

Isolation on Linux: a new session (so the whole process group can be killed),
a new user and network namespace via `unshare -rn` when the kernel allows it
(the child then sees only a loopback interface that is down), resource limits
set with setrlimit, and an environment built from an allow-list so that API
keys in the engine's environment never reach candidate code. The Docker
backend adds a read-only root filesystem, dropped capabilities and a pids limit.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from sandbox.backend import BackendKind, Limits, SandboxBackend, SandboxUnavailable
from sandbox.protocol import LOG_FILE, PROGRESS_FILE, RESULT_FILE, Job, ProgressTail, Stage, StageResult

logger = logging.getLogger(__name__)

# Environment variables copied from the engine's environment. Everything else,
# API keys and tokens included, is dropped.
_ENV_ALLOW_LIST = ("LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES")
# Fixed values set for every job.
_ENV_FIXED = {
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
    """Runs jobs as child processes of the engine."""

    kind = BackendKind.PROCESS

    def __init__(self, require_network_isolation: bool = True) -> None:
        self.network_isolated = network_isolation_available()
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
        return f"process sandbox: child process, {network}, rlimits, scrubbed environment"

    def command(self, job_dir: Path) -> list[str]:
        # NOTE: every job starts a fresh interpreter whose imports dominate short jobs. On a 2-core CPU torch takes
        # 1.1 s, and torch with transformers and TRL 4.5 s (docs/benchmarks.md). No warm worker pool exists yet.
        base = [sys.executable, "-m", "sandbox.worker", str(job_dir)]
        if self.network_isolated:
            return ["unshare", "-rn", *base]
        return base

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
        home = job_dir / "home"
        home.mkdir(exist_ok=True)
        env = build_environment(home, threads=max(1, int(limits.cpus)))
        log_path = job_dir / LOG_FILE

        def apply_limits() -> None:
            _die_with_parent()
            memory = limits.memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            output = limits.output_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_FSIZE, (output, output))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        start = time.monotonic()
        deadline = start + limits.timeout_s
        tail = ProgressTail(job_dir / PROGRESS_FILE)
        with open(log_path, "ab") as log:
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
                    if on_progress is not None:
                        for event in tail.poll():
                            on_progress(event)
                    if time.monotonic() >= deadline:
                        timed_out = True
                        break
            finally:
                # kill the whole process group, then reap the child so no zombie is left
                if process.poll() is None:
                    _kill_group(process.pid)
                process.wait()
                _kill_group(process.pid)
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
        return _result_from_exit(job_dir, process.returncode, wall_s, log_tail, limits)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the engine dies, even by SIGKILL.

    Without it a killed engine leaves its worker running, and a resumed run
    would race that orphan for the same job directory.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


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
