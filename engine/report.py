"""Read-only queries over a run's archive, shared by the audit, show, plot and rerun commands.

Everything here reads the archive through a read-only SQLite connection, so
it works on a run that is still going or was killed, and never changes it.
"""

from __future__ import annotations

import difflib
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.archive import ARCHIVE_FILE, Archive
from engine.candidate import Candidate, Origin, Status
from sandbox.protocol import Stage

# Statuses of candidates that were judged and not evaluated.
REJECTED_STATUSES = (Status.REJECTED, Status.TIMEOUT, Status.FAILED, Status.DUPLICATE)

# Stages in the order a candidate meets them, for tables.
STAGE_ORDER = (Stage.PARSE, Stage.STATIC, Stage.DUPLICATE, Stage.UNIT_TEST, Stage.SANDBOX, Stage.TRAIN, Stage.EVALUATE)
UNKNOWN_STAGE = "unknown"

# Event kind of a rerun result written by `evolve rerun`.
RERUN_EVENT = "rerun"

_ID = r"(?:seed-[A-Za-z0-9_]+|g\d{3}-a\d{2})"
_DUPLICATE_PREFIX = re.compile(rf"^duplicate of {_ID} \([^)]*\)")
_BRACKETED = re.compile(r"\[[^\[\]]*\]")
_NUMBER = re.compile(r"(?<![A-Za-z_])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_LINE_MENTION = re.compile(r"\b(?:candidate )?line (\d+)\b")
_PATTERN_CHARS = 160


class RunDirError(ValueError):
    """Raised when a path is not a readable run directory."""


def open_run_archive(run_dir: Path) -> Archive:
    """Open a run's archive read-only; raise RunDirError naming the problem and the expected directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(
            f"run directory {run_dir} not found; pass a directory made by `evolve`, such as runs/<task>-<time>"
        )
    if not (run_dir / ARCHIVE_FILE).is_file():
        raise RunDirError(f"{run_dir} contains no {ARCHIVE_FILE}; pass a directory made by `evolve`")
    try:
        archive = Archive.open_run(run_dir, read_only=True)
        archive.count()
    except sqlite3.DatabaseError as error:
        raise RunDirError(f"{run_dir / ARCHIVE_FILE} cannot be read as an evolve archive: {error}") from None
    return archive


def find_candidate(archive: Archive, candidate_id: str) -> Candidate:
    """Return the candidate with this id, or raise KeyError naming the closest ids."""
    candidate = archive.get(candidate_id)
    if candidate is not None:
        return candidate
    ids = [c.id for c in archive.candidates()]
    close = difflib.get_close_matches(candidate_id, ids, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise KeyError(f"no candidate {candidate_id!r} in this run.{hint} `evolve show RUN_DIR` lists the ids.")


def stage_name(candidate: Candidate) -> str:
    return candidate.stage.value if candidate.stage is not None else UNKNOWN_STAGE


def stage_rank(name: str) -> int:
    names = [stage.value for stage in STAGE_ORDER]
    return names.index(name) if name in names else len(names)


# rejections


def normalize_reason(reason: str) -> str:
    """Reduce a rejection reason to a pattern shared by candidates that failed the same way.

    Candidate ids, bracketed lists (rows, shapes) and numbers are replaced,
    so "non-finite in rows [0, 3]" and "non-finite in rows [1]" match.
    """
    text = reason.strip().splitlines()[0] if reason.strip() else ""
    text = _DUPLICATE_PREFIX.sub("duplicate of ID", text)
    text = re.sub(_ID, "ID", text)
    text = _BRACKETED.sub("[...]", text)
    text = _NUMBER.sub("N", text)
    text = re.sub(r"\s+", " ", text)
    if len(text) > _PATTERN_CHARS:
        text = text[: _PATTERN_CHARS - 3] + "..."
    return text


@dataclass
class RejectionGroup:
    """Rejected candidates that failed at the same stage, in the same category, for the same reason pattern."""

    stage: str
    category: str
    pattern: str
    candidate_ids: list[str] = field(default_factory=list)
    example: str = ""

    @property
    def count(self) -> int:
        return len(self.candidate_ids)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "category": self.category,
            "pattern": self.pattern,
            "count": self.count,
            "candidate_ids": self.candidate_ids,
            "example": self.example,
        }


def rejected_candidates(
    archive: Archive, stage: str | None = None, reason: str | None = None, generation: int | None = None
) -> list[Candidate]:
    """Return the rejected, timed-out, failed and duplicate candidates that match every given filter."""
    statuses = tuple(status.value for status in REJECTED_STATUSES)
    where = f"status IN ({', '.join('?' for _ in statuses)})"
    params: list[Any] = list(statuses)
    if stage is not None:
        where += " AND stage=?"
        params.append(stage)
    if generation is not None:
        where += " AND generation=?"
        params.append(generation)
    selected = archive.candidates(where, tuple(params))
    if reason:
        needle = reason.lower()
        selected = [c for c in selected if needle in c.reason.lower() or needle in c.category.lower()]
    return selected


def group_rejections(candidates: list[Candidate]) -> list[RejectionGroup]:
    """Group candidates by stage, category and reason pattern; largest groups first within a stage."""
    groups: dict[tuple[str, str, str], RejectionGroup] = {}
    for candidate in candidates:
        key = (stage_name(candidate), candidate.category, normalize_reason(candidate.reason))
        group = groups.get(key)
        if group is None:
            group = groups[key] = RejectionGroup(*key, example=candidate.reason)
        group.candidate_ids.append(candidate.id)
    return sorted(groups.values(), key=lambda g: (stage_rank(g.stage), -g.count, g.category, g.pattern))


def count_by_stage(candidates: list[Candidate]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for candidate in sorted(candidates, key=lambda c: stage_rank(stage_name(c))):
        counts[stage_name(candidate)] = counts.get(stage_name(candidate), 0) + 1
    return counts


def mentioned_lines(reason: str) -> list[int]:
    """Return the candidate line numbers a reason names ("line 4", "candidate line 4"), in order, without repeats."""
    lines: list[int] = []
    for match in _LINE_MENTION.finditer(reason):
        number = int(match.group(1))
        if number not in lines:
            lines.append(number)
    return lines


# leaderboard, lineage and totals


def leaderboard(archive: Archive) -> list[Candidate]:
    """Return the evaluated candidates, seeds included, best fitness first."""
    evaluated = [c for c in archive.candidates("status=?", (Status.EVALUATED.value,)) if c.fitness is not None]
    return sorted(evaluated, key=lambda c: (-c.fitness, c.seq))


def top_proposals(archive: Archive, count: int) -> list[Candidate]:
    """Return the `count` best evaluated proposals (seeds excluded)."""
    return [c for c in leaderboard(archive) if c.origin is Origin.PROPOSER][:count]


def context_of(archive: Archive, candidate: Candidate) -> list[Candidate]:
    """Return the candidates that were in the proposer's context when `candidate` was proposed."""
    known = {c.id: c for c in archive.candidates()}
    return [known[i] for i in candidate.context_ids if i in known]


@dataclass
class RunTotals:
    """Totals of a run so far: candidates by status, time, proposer use and reruns.

    Attributes:
        counts: candidates per status value.
        wall_s: seconds the engine ran, summed over its sessions (start to
            finish, or to the last archive write when a session was killed).
        sessions: how many times the run was started or resumed.
        llm: calls, prompt_tokens, completion_tokens, cost_usd and retries
            over every recorded proposer call.
        generations: completed generations.
        status: the run status stored by the engine ("finished",
            "interrupted", "failed"), or "running or killed" when none is stored.
        reruns: results written by `evolve rerun`.
    """

    counts: dict[str, int]
    wall_s: float
    sessions: int
    llm: dict[str, float]
    generations: int
    status: str
    reruns: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def wall_time(archive: Archive) -> tuple[float, int]:
    """Return the engine's running time in seconds and the number of sessions.

    Each "start" event opens a session. It ends at the next "finish" or
    "interrupted" event, or else at the last candidate write before the
    next start (a killed or still running session).
    """
    events = [e for e in archive.events() if e["kind"] in ("start", "finish", "interrupted")]
    writes = sorted(c.updated_at for c in archive.candidates())
    total = 0.0
    sessions = 0
    for index, event in enumerate(events):
        if event["kind"] != "start":
            continue
        sessions += 1
        later = events[index + 1] if index + 1 < len(events) else None
        if later is not None and later["kind"] != "start":
            end = later["created_at"]
        else:
            limit = later["created_at"] if later is not None else float("inf")
            inside = [t for t in writes if event["created_at"] <= t < limit]
            end = inside[-1] if inside else event["created_at"]
        total += max(0.0, end - event["created_at"])
    if sessions == 0 and writes:
        total = writes[-1] - min(c.created_at for c in archive.candidates())
    return total, sessions


def run_totals(archive: Archive) -> RunTotals:
    counts: dict[str, int] = {}
    for candidate in archive.candidates():
        counts[candidate.status.value] = counts.get(candidate.status.value, 0) + 1
    wall_s, sessions = wall_time(archive)
    return RunTotals(
        counts=counts,
        wall_s=wall_s,
        sessions=sessions,
        llm=archive.llm_totals(),
        generations=archive.get_meta("completed_generations", 0),
        status=archive.get_meta("status", "running or killed"),
        reruns=len(archive.events(RERUN_EVENT)),
    )


def best_so_far(candidates: list[Candidate]) -> list[tuple[int, float]]:
    """Return (generation, best fitness up to it) for each generation with an evaluated proposal."""
    best: float | None = None
    points = []
    by_generation: dict[int, float] = {}
    for candidate in candidates:
        if candidate.origin is not Origin.PROPOSER or candidate.status is not Status.EVALUATED:
            continue
        if candidate.fitness is None:
            continue
        current = by_generation.get(candidate.generation, candidate.fitness)
        by_generation[candidate.generation] = max(candidate.fitness, current)
    for generation in sorted(by_generation):
        best = by_generation[generation] if best is None else max(best, by_generation[generation])
        points.append((generation, best))
    return points


def total_seconds(candidate: Candidate) -> float:
    return sum(v for v in candidate.timings.values() if isinstance(v, (int, float)))


def reruns_of(archive: Archive, candidate_id: str | None = None) -> list[dict[str, Any]]:
    """Return the rerun results recorded by `evolve rerun`, oldest first."""
    found = []
    for event in archive.events(RERUN_EVENT):
        if candidate_id is None or event["detail"].get("candidate_id") == candidate_id:
            found.append({**event["detail"], "created_at": event["created_at"]})
    return found


def candidate_summary(candidate: Candidate) -> dict[str, Any]:
    """Return the short JSON form of a candidate used in tables."""
    return {
        "id": candidate.id,
        "name": candidate.name,
        "origin": candidate.origin.value,
        "generation": candidate.generation,
        "attempt": candidate.attempt,
        "status": candidate.status.value,
        "stage": candidate.stage.value if candidate.stage else None,
        "fitness": candidate.fitness,
        "reward": candidate.metrics.get("reward"),
        "kl": candidate.metrics.get("kl"),
        "seconds": round(total_seconds(candidate), 3),
    }


def candidate_record(candidate: Candidate) -> dict[str, Any]:
    """Return every stored field of a candidate as JSON-ready values."""
    record = dict(candidate.__dict__)
    record["origin"] = candidate.origin.value
    record["status"] = candidate.status.value
    record["stage"] = candidate.stage.value if candidate.stage else None
    return record
