"""Candidate records and their status."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sandbox.protocol import Stage


class Status(str, Enum):
    """Where a candidate is in the pipeline; the last five are final."""

    PENDING = "pending"  # parsed, not yet validated
    VALIDATED = "validated"  # passed static checks and unit tests, not yet trained
    TRAINING = "training"  # an evaluation job was started
    EVALUATED = "evaluated"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    TIMEOUT = "timeout"
    FAILED = "failed"  # the sandbox itself failed, not the candidate

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = {Status.EVALUATED, Status.REJECTED, Status.DUPLICATE, Status.TIMEOUT, Status.FAILED}


class Origin(str, Enum):
    """Who wrote a candidate."""

    SEED = "seed"
    PROPOSER = "proposer"


@dataclass
class Candidate:
    """One proposed program and everything known about it."""

    id: str
    generation: int
    attempt: int
    origin: Origin
    name: str
    code: str
    thought: str = ""
    reply: str = ""
    model: str = ""
    status: Status = Status.PENDING
    stage: Stage | None = None
    category: str = ""
    reason: str = ""
    feedback: str = ""
    fitness: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    behaviour_fingerprint: str = ""
    duplicate_of: str = ""
    context_ids: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    log_tail: str = ""
    seq: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
