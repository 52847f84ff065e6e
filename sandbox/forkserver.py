"""A warm worker for the process sandbox: imports once, forks one child per job.

A fresh interpreter per job pays its imports every time. On a 2-core CPU
`import torch` takes 1 to 2 s, and torch with transformers and TRL about
4.5 s, while the preference task's unit tests themselves take about 0.05 s.
The fork server pays the imports once. The engine starts it like a job
worker, under `unshare -rn` with a scrubbed environment, and it imports
torch, the worker and each task's modules before it forks. For each job it forks a child that starts a new session, sets the
job's resource limits, sends its output to the job's log and runs
`sandbox.worker.main` in the job directory. The server never runs candidate
code and never touches a tensor, so each child starts from the same clean
state, and no OpenMP thread pool exists at fork time.

Protocol: one JSON object per line. The engine writes requests to the server's
standard input:

    {"op": "start", "id": 7, "job_dir": "/abs/job", "task": "preference",
     "memory_mb": 4096, "output_mb": 1024, "threads": 1}
    {"op": "kill", "id": 7}

and reads replies from its standard output:

    {"ready": true, "seconds": 2.1}          once, after the base imports
    {"id": 7, "pid": 4242}                   the child runs
    {"id": 7, "exit": 0}                     the child ended (negative: signal)

When its standard input closes (the engine ended or died), the server kills
every child's process group and exits. Each child dies with the server.

This file runs in two places: `serve()` inside the sandbox, started as
`python -m sandbox.forkserver`, and `ForkServer` in the engine, which starts
the server and multiplexes the jobs of all engine threads over it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox.protocol import LOG_FILE

logger = logging.getLogger(__name__)

# The modules every job needs, imported by the server before it reports ready.
# NOTE: after the preference task's imports the server has one native thread
# besides its own, jemalloc's background thread from pyarrow. jemalloc handles
# fork, but a library that starts a thread at import without fork handlers
# could leave a lock held in every child.
BASE_IMPORTS = (
    "torch",
    "RestrictedPython",
    "sandbox.protocol",
    "sandbox.static_check",
    "sandbox.loader",
    "sandbox.worker",
    "evaluators.registry",
    "evaluators.task",
)
READY_TIMEOUT_S = 180.0
_START_TIMEOUT_S = 120.0


# ---------------------------------------------------------------------------
# server side, inside the sandbox


def set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, even by SIGKILL.

    Linux sends the signal when the thread that forked this process ends, so
    a parent with several threads must fork from one that lives as long as it.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _write_line(fd: int, payload: dict[str, Any]) -> None:
    data = (json.dumps(payload) + "\n").encode()
    try:
        while data:
            written = os.write(fd, data)
            data = data[written:]
    except BrokenPipeError:
        pass  # The engine is gone. The loop ends once the request input closes.


def _warm_task(name: str, warmed: set[str]) -> None:
    """Import a task's modules in the server, once, so that its jobs fork with them loaded."""
    if name in warmed:
        return
    warmed.add(name)
    try:
        from evaluators.registry import get_task

        task = get_task(name)
        for module in getattr(task, "warm_imports", ()):
            importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - the child imports again and reports the failure in its job
        print(f"forkserver: failed to preload task {name!r}, so its jobs import it themselves: "
              f"{type(error).__name__}: {error}", file=sys.stderr)


def _run_child(request: dict[str, Any], private_fds: list[int]) -> int:
    """Set up the forked child as an isolated job worker, run the job and return its exit status."""
    import resource

    os.setsid()
    set_parent_death_signal()
    if os.getppid() != request["server_pid"]:
        return 1  # the server died before the signal was armed
    signal.set_wakeup_fd(-1)
    for number in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)
    for fd in private_fds:
        os.close(fd)
    job_dir = Path(request["job_dir"])
    log_fd = os.open(job_dir / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)
    memory = int(request["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    output = int(request["output_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (output, output))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.chdir(job_dir)
    threads = str(max(1, int(request["threads"])))
    os.environ.update({"HOME": str(job_dir / "home"), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    import torch

    torch.set_num_threads(int(threads))
    from sandbox import worker

    sys.argv = ["sandbox.worker", str(job_dir)]
    return worker.main([str(job_dir)])


def _fork_job(request: dict[str, Any], private_fds: list[int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    request = {**request, "server_pid": os.getpid()}
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        status = _run_child(request, private_fds)
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - a dying child must still exit, never return into the server loop
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
    return 0  # not reached


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def serve() -> int:
    """Run the server loop until standard input closes.

    The server sets no parent-death signal, because Linux sends it when the
    engine thread that started the server ends, not the engine. A closed
    standard input means the engine is gone.
    """
    reply_fd = os.dup(1)
    request_fd = os.dup(0)
    # stray prints of imported modules must not corrupt the protocol
    os.dup2(2, 1)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write)

    start = time.monotonic()
    for module in BASE_IMPORTS:
        importlib.import_module(module)
    _write_line(reply_fd, {"ready": True, "seconds": round(time.monotonic() - start, 3)})

    private_fds = [reply_fd, request_fd, wake_read, wake_write]
    running: dict[int, int] = {}  # pid -> request id
    by_id: dict[int, int] = {}  # request id -> pid
    warmed: set[str] = set()
    pending = b""
    open_input = True
    while open_input or running:
        readable, _, _ = select.select([request_fd, wake_read] if open_input else [wake_read], [], [], 1.0)
        if wake_read in readable:
            try:
                os.read(wake_read, 4096)
            except BlockingIOError:
                pass
        if request_fd in readable:
            chunk = os.read(request_fd, 65536)
            if not chunk:
                open_input = False
                for pid in list(running):
                    _kill_group(pid)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if not line.strip():
                    continue
                request = json.loads(line)
                request_id = int(request["id"])
                if request["op"] == "start":
                    _warm_task(str(request["task"]), warmed)
                    try:
                        pid = _fork_job(request, private_fds)
                    except OSError as error:
                        print(f"forkserver: fork failed for job {request_id}: {error}", file=sys.stderr)
                        _write_line(reply_fd, {"id": request_id, "error": f"fork failed: {error}"})
                        continue
                    running[pid] = request_id
                    by_id[request_id] = pid
                    _write_line(reply_fd, {"id": request_id, "pid": pid})
                elif request["op"] == "kill" and request_id in by_id:
                    _kill_group(by_id[request_id])
        # Reap ended children. Each one's process group is killed first, while the unreaped zombie keeps its pid
        # from being reused.
        while running:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None or info.si_pid == 0:
                break
            pid = info.si_pid
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, status = os.waitpid(pid, 0)
            request_id = running.pop(pid, None)
            if request_id is None:
                continue
            by_id.pop(request_id, None)
            if open_input:
                _write_line(reply_fd, {"id": request_id, "exit": os.waitstatus_to_exitcode(status)})
    return 0


# ---------------------------------------------------------------------------
# engine side


class ForkServerError(RuntimeError):
    """Raised when the fork server cannot be started or dies."""


@dataclass
class _Pending:
    pid: int | None = None
    error: str = ""
    exit_code: int | None = None
    lost: bool = False
    started: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)


class ForkedJob:
    """One job running in a child of the fork server."""

    def __init__(self, server: ForkServer, request_id: int, pending: _Pending) -> None:
        self._server = server
        self.request_id = request_id
        self._pending = pending

    @property
    def pid(self) -> int | None:
        return self._pending.pid

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds and return whether the job ended."""
        return self._pending.ended.wait(timeout)

    @property
    def returncode(self) -> int | None:
        """The exit status like subprocess (negative: killed by that signal), None while running or when lost."""
        return self._pending.exit_code

    @property
    def lost(self) -> bool:
        """Whether the server died before it reported this job's end."""
        return self._pending.lost

    def kill(self) -> None:
        """Ask the server to kill the job's process group; as the child's parent, it cannot hit a reused pid."""
        self._server.send({"op": "kill", "id": self.request_id})


class ForkServer:
    """Engine-side client that starts the fork server in the sandbox and multiplexes jobs over its pipes.

    Thread-safe: engine threads may start and wait for jobs at the same time.
    """

    def __init__(self, command: list[str], env: dict[str, str], work_dir: Path) -> None:
        self._command = command
        self._env = env
        self.work_dir = work_dir
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._jobs: dict[int, _Pending] = {}
        self._next_id = 0
        self.log_path = work_dir / "forkserver.log"
        self.ready_seconds: float | None = None
        # Why the server could not start. Later jobs then fall back to a fresh interpreter at once.
        self.broken = ""

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        if self.broken:
            raise ForkServerError(self.broken)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                self._command,
                cwd=self.work_dir,
                env=self._env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        ready = _read_ready(process, READY_TIMEOUT_S)
        if ready is None:
            _stop(process)
            self.broken = (f"the fork server did not become ready within {READY_TIMEOUT_S:.0f} s "
                           f"(log {self.log_path}): {_tail(self.log_path)}")
            raise ForkServerError(self.broken)
        self.ready_seconds = float(ready.get("seconds", 0.0))
        logger.info("fork server started (pid %d, base imports %.1f s, log %s)", process.pid, self.ready_seconds,
                    self.log_path)
        self._process = process
        threading.Thread(target=self._read_replies, args=(process,), name="forkserver-replies", daemon=True).start()
        return process

    def _read_replies(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                reply = json.loads(line)
                request_id = int(reply["id"])
            except (ValueError, KeyError, TypeError):
                logger.warning("fork server sent an unreadable line: %r", line[:200])
                continue
            with self._lock:
                pending = self._jobs.get(request_id)
            if pending is None:
                continue
            if "pid" in reply:
                pending.pid = int(reply["pid"])
                pending.started.set()
            elif "error" in reply or "exit" in reply:
                if "error" in reply:
                    pending.error = str(reply["error"])
                else:
                    pending.exit_code = int(reply["exit"])
                with self._lock:
                    self._jobs.pop(request_id, None)
                pending.started.set()
                pending.ended.set()
        # the server is gone: every job it held is lost (its children died with it)
        process.wait()
        if process.returncode != 0:
            logger.warning("fork server (pid %d) ended with status %d; see %s", process.pid, process.returncode,
                           self.log_path)
        with self._lock:
            lost = [pending for pending in self._jobs.values()]
            self._jobs = {}
            if self._process is process:
                self._process = None
        for pending in lost:
            pending.lost = True
            pending.started.set()
            pending.ended.set()

    def send(self, request: dict[str, Any]) -> None:
        with self._lock:
            process = self._process
            if process is None or process.stdin is None:
                return
            try:
                process.stdin.write((json.dumps(request) + "\n").encode())
                process.stdin.flush()
            except (ValueError, OSError) as error:
                # the reader thread detects the server's end and fails its jobs
                logger.warning("could not send %s for job %s to the fork server: %s", request.get("op"),
                               request.get("id"), error)

    def start(self, job_dir: Path, task: str, memory_mb: int, output_mb: int, threads: int) -> ForkedJob:
        """Fork a child for the job in `job_dir` and return once it runs."""
        with self._lock:
            self._ensure_started()
            self._next_id += 1
            request_id = self._next_id
            pending = _Pending()
            self._jobs[request_id] = pending
        self.send({"op": "start", "id": request_id, "job_dir": str(job_dir), "task": task,
                   "memory_mb": memory_mb, "output_mb": output_mb, "threads": threads})
        if not pending.started.wait(_START_TIMEOUT_S):
            raise ForkServerError(f"the fork server timed out after {_START_TIMEOUT_S:.0f} s starting the job: "
                                  f"{_tail(self.log_path)}")
        if pending.lost:
            raise ForkServerError(f"the fork server died while starting the job: {_tail(self.log_path)}")
        if pending.error:
            raise ForkServerError(f"the fork server could not start the job: {pending.error}")
        return ForkedJob(self, request_id, pending)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def close(self) -> None:
        """Stop the server, which kills its running children."""
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            _stop(process)


def _read_ready(process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            break
        byte = os.read(fd, 1)
        if not byte:
            break
        line += byte
    try:
        reply = json.loads(line)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) and reply.get("ready") else None


def _stop(process: subprocess.Popen[bytes]) -> None:
    try:
        if process.stdin is not None:
            process.stdin.close()
    except OSError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:].strip() or "(empty log)"


if __name__ == "__main__":
    sys.exit(serve())
