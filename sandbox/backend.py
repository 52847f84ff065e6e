"""The interface every sandbox backend implements, and the limits it enforces."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from sandbox.protocol import Job, StageResult


class BackendKind(str, Enum):
    """Where candidate code runs."""

    PROCESS = "process"
    DOCKER = "docker"


@dataclass(frozen=True)
class Limits:
    """Resource limits for one job.

    Attributes:
        timeout_s: wall-clock deadline in seconds, counted from the start of the
            job; the backend kills the whole process tree or container at the deadline.
        memory_mb: memory ceiling in MiB.
        cpus: CPU cores the job may use.
        pids: maximum number of processes and threads (enforced by Docker only).
        output_mb: largest file the job may write, in MiB.
        gpu: whether the job needs one GPU; a backend that cannot give one raises
            SandboxUnavailable instead of running on the CPU.
    """

    timeout_s: float
    memory_mb: int = 8192
    cpus: float = 2.0
    pids: int = 512
    output_mb: int = 1024
    gpu: bool = False


class SandboxUnavailable(RuntimeError):
    """Raised when a backend cannot run jobs at all (no Docker engine, no image, no GPU)."""


class SandboxBackend(abc.ABC):
    """Runs sandbox worker jobs with no network, a scrubbed environment and limits."""

    kind: BackendKind

    @abc.abstractmethod
    def run(
        self,
        job: Job,
        job_dir: Path,
        limits: Limits,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> StageResult:
        """Run `job` in `job_dir` and return its result.

        `on_progress` receives each event the worker appends to its progress file.

        Never raises for a candidate fault: timeouts, OOM kills, crashes and a
        missing result file all come back as a failed StageResult with stage
        SANDBOX (or the stage that was running) and a reason.
        """

    def cleanup_leftovers(self, run_id: str) -> int:
        """Remove processes or containers left by an earlier, crashed engine; return how many."""
        return 0

    def describe(self) -> str:
        """Return a one-line description of the isolation this backend provides."""
        return self.kind.value
