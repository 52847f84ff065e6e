"""The job and result files exchanged between the engine and a sandbox worker.

This module imports only the standard library, because the worker runs it in
images that contain nothing but what a stage needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "log.txt"


class Stage(str, Enum):
    """Pipeline stage at which a candidate was judged or rejected."""

    PARSE = "parse"
    DUPLICATE = "duplicate"
    STATIC = "static"
    UNIT_TEST = "unit_test"
    TRAIN = "train"
    EVALUATE = "evaluate"
    SANDBOX = "sandbox"


class JobKind(str, Enum):
    """Kind of work a worker job performs."""

    PREPARE = "prepare"  # build cached model and data; runs trusted code only
    UNIT_TEST = "unit_test"  # static checks again, then the task's unit tests
    EVALUATE = "evaluate"  # static checks again, then fine-tune and score


@dataclass(frozen=True)
class Job:
    """One unit of work for a worker, written to JOB_FILE in the job directory."""

    kind: JobKind
    task: str
    settings: dict[str, Any]
    cache_dir: str
    code: str = ""
    seed: int = 0
    candidate_id: str = ""

    def write(self, job_dir: Path) -> None:
        payload = asdict(self)
        payload["kind"] = self.kind.value
        write_json_atomic(job_dir / JOB_FILE, payload)

    @classmethod
    def read(cls, job_dir: Path) -> Job:
        payload = json.loads((job_dir / JOB_FILE).read_text())
        payload["kind"] = JobKind(payload["kind"])
        return cls(**payload)


@dataclass
class StageResult:
    """Outcome of one job: passed, or rejected at a stage with an actionable reason."""

    ok: bool
    stage: Stage
    reason: str = ""
    category: str = ""
    fitness: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    peak_rss_mb: float | None = None
    log_tail: str = ""

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["stage"] = self.stage.value
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> StageResult:
        payload = dict(payload)
        payload["stage"] = Stage(payload["stage"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in payload.items() if k in known})

    def write(self, job_dir: Path) -> None:
        write_json_atomic(job_dir / RESULT_FILE, self.to_dict())


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class ProgressTail:
    """Reads the complete JSON lines appended to a job's progress file since the last poll.

    The file lives in a directory that candidate code can write to, so it is
    opened without following symlinks, read in bytes and bounded per poll.
    """

    _MAX_READ = 1 << 20

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0

    def poll(self) -> list[dict[str, Any]]:
        try:
            descriptor = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return []
        with os.fdopen(descriptor, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read(self._MAX_READ)
        complete, newline, _ = chunk.rpartition(b"\n")
        if not newline:
            return []
        self._offset += len(complete) + 1
        events = []
        for line in complete.splitlines():
            try:
                event = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(event, dict):
                events.append(event)
        return events
