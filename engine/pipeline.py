"""Judges one candidate: static checks, duplicate detection, unit tests, fine-tune and score.

Every step writes the candidate to the archive before and after it runs, so
a candidate interrupted at any point resumes from its last finished step.
Candidate code is only analysed here (parsed, never run); running it happens
in a sandbox worker started through the backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.archive import Archive
from engine.candidate import Candidate, Origin, Status
from engine.fingerprint import behavioural_fingerprint, canonical_fingerprint
from evaluators.task import Task
from sandbox.backend import Limits, SandboxBackend
from sandbox.protocol import Job, JobKind, Stage, StageResult
from sandbox.static_check import StaticCheckError, check_source

logger = logging.getLogger(__name__)

# Reporter callbacks: a stage label for the candidate, and raw worker progress events.
StageCallback = Callable[[Candidate, str], None]
ProgressCallback = Callable[[Candidate, dict[str, Any]], None]


def settings_key(task_name: str, settings: dict[str, Any]) -> str:
    """Return a short stable hash of a task's settings, used to key caches."""
    payload = json.dumps({"task": task_name, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PipelineLimits:
    unit_test: Limits
    evaluate: Limits


class Pipeline:
    """Runs the stages of one candidate and records the outcome in the archive."""

    def __init__(
        self,
        task: Task,
        settings: Any,
        backend: SandboxBackend,
        archive: Archive,
        run_dir: Path,
        cache_dir: Path,
        limits: PipelineLimits,
        seed: int,
        on_stage: StageCallback | None = None,
        on_progress: ProgressCallback | None = None,
        task_ref: str = "",
    ) -> None:
        self.task = task
        # what the worker passes to get_task: a registered name or "module:Class"
        self.task_ref = task_ref or task.name
        self.settings = settings
        self.settings_dict = task.settings_to_dict(settings)
        self.backend = backend
        self.archive = archive
        self.run_dir = run_dir
        self.cache_dir = cache_dir
        self.limits = limits
        self.seed = seed
        self._on_stage = on_stage or (lambda candidate, label: None)
        self._on_progress = on_progress or (lambda candidate, event: None)
        self._hyperparameters = tuple(task.interface.hyperparameters)
        self._baseline_dir = cache_dir / "baselines" / task.name / settings_key(task.name, self.settings_dict)

    def judge(self, candidate: Candidate) -> Candidate:
        """Take a candidate from its current status to a final one."""
        if candidate.status is Status.PENDING:
            self._validate(candidate)
        if candidate.status in (Status.VALIDATED, Status.TRAINING):
            self._evaluate(candidate)
        return candidate

    def validate(self, candidate: Candidate) -> Candidate:
        """Run only the cheap stages (static checks, duplicates, unit tests) on a pending candidate."""
        if candidate.status is Status.PENDING:
            self._validate(candidate)
        return candidate

    # validation: static checks, fingerprint, unit tests

    def _validate(self, candidate: Candidate) -> None:
        self._on_stage(candidate, "static checks")
        try:
            check_source(candidate.code, self.task.interface.params, self._hyperparameters)
        except StaticCheckError as error:
            self._reject(candidate, Stage.STATIC, error.reason, error.category)
            return

        candidate.fingerprint = canonical_fingerprint(candidate.code, self._hyperparameters) or ""
        twin = self.archive.find_by_fingerprint(candidate.fingerprint)
        if twin is not None and twin.id != candidate.id:
            self._mark_duplicate(candidate, twin, "same code after normalising names, comments and literals")
            return
        self.archive.update(candidate)

        self._on_stage(candidate, "unit tests")
        result = self._run_job(candidate, JobKind.UNIT_TEST, self.limits.unit_test)
        candidate.timings["unit_test_s"] = round(result.wall_s, 3)
        if not result.ok:
            self._record_failure(candidate, result)
            return
        probe = result.metrics.get("probe")
        if isinstance(probe, list) and probe:
            candidate.behaviour_fingerprint = behavioural_fingerprint(probe)
            twin = self.archive.find_by_fingerprint(candidate.behaviour_fingerprint, "behaviour_fingerprint")
            if twin is not None and twin.id != candidate.id:
                self._mark_duplicate(candidate, twin, "same loss values on the probe grid")
                return
        candidate.metrics["unit_test"] = {k: v for k, v in result.metrics.items() if k != "probe"}
        candidate.status = Status.VALIDATED
        candidate.stage = Stage.UNIT_TEST
        self.archive.update(candidate)

    # evaluation: fine-tune and score, or a cached baseline

    def _evaluate(self, candidate: Candidate) -> None:
        cached = self._cached_baseline(candidate)
        if cached is not None:
            candidate.status = Status.EVALUATED
            candidate.stage = Stage.EVALUATE
            candidate.fitness = cached["fitness"]
            candidate.metrics.update(cached["metrics"])
            candidate.metrics["baseline_cache"] = True
            self.archive.update(candidate)
            return

        candidate.status = Status.TRAINING
        self.archive.update(candidate)
        self._on_stage(candidate, "fine-tune")
        result = self._run_job(candidate, JobKind.EVALUATE, self.limits.evaluate)
        candidate.timings["evaluate_s"] = round(result.wall_s, 3)
        if result.peak_rss_mb is not None:
            candidate.metrics["peak_rss_mb"] = round(result.peak_rss_mb, 1)
        if not result.ok:
            self._record_failure(candidate, result)
            return
        candidate.status = Status.EVALUATED
        candidate.stage = Stage.EVALUATE
        candidate.fitness = result.fitness
        candidate.metrics.update(result.metrics)
        candidate.log_tail = result.log_tail
        self.archive.update(candidate)
        self._store_baseline(candidate)
        logger.info("candidate %s (%s) evaluated: fitness %.4f", candidate.id, candidate.name, candidate.fitness)

    def _baseline_path(self, candidate: Candidate) -> Path | None:
        if candidate.origin is not Origin.SEED or not candidate.fingerprint:
            return None
        return self._baseline_dir / f"{candidate.fingerprint[:24]}-seed{self.seed}.json"

    def _cached_baseline(self, candidate: Candidate) -> dict[str, Any] | None:
        path = self._baseline_path(candidate)
        if path is None or not path.exists():
            return None
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            logger.warning("ignoring unreadable baseline cache %s", path)
            return None
        logger.info("seed %s: fitness %.4f taken from the baseline cache %s", candidate.name, cached["fitness"], path)
        return cached

    def _store_baseline(self, candidate: Candidate) -> None:
        path = self._baseline_path(candidate)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        metrics = {k: v for k, v in candidate.metrics.items() if k != "baseline_cache"}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fitness": candidate.fitness, "metrics": metrics}, default=str))
        tmp.replace(path)

    # helpers

    def _run_job(self, candidate: Candidate, kind: JobKind, limits: Limits) -> StageResult:
        job_dir = self.run_dir / "jobs" / candidate.id / kind.value
        if job_dir.exists():
            shutil.rmtree(job_dir)
        job_dir.mkdir(parents=True)
        job = Job(
            kind=kind,
            task=self.task_ref,
            settings=self.settings_dict,
            cache_dir=str(self.cache_dir),
            code=candidate.code,
            seed=self.seed,
            candidate_id=candidate.id,
        )
        return self.backend.run(job, job_dir, limits, on_progress=lambda event: self._on_progress(candidate, event))

    def _record_failure(self, candidate: Candidate, result: StageResult) -> None:
        status = Status.TIMEOUT if result.category == "timeout" else Status.REJECTED
        candidate.log_tail = result.log_tail
        if result.peak_rss_mb is not None:
            candidate.metrics["peak_rss_mb"] = round(result.peak_rss_mb, 1)
        self._reject(candidate, result.stage, result.reason, result.category, status)

    def _reject(
        self, candidate: Candidate, stage: Stage, reason: str, category: str, status: Status = Status.REJECTED
    ) -> None:
        candidate.status = status
        candidate.stage = stage
        candidate.reason = reason
        candidate.category = category
        self.archive.update(candidate)
        logger.info("candidate %s (%s) %s at %s: %s", candidate.id, candidate.name, status.value, stage.value, reason)

    def _mark_duplicate(self, candidate: Candidate, twin: Candidate, why: str) -> None:
        candidate.status = Status.DUPLICATE
        candidate.stage = Stage.DUPLICATE
        candidate.duplicate_of = twin.id
        candidate.fitness = twin.fitness
        candidate.metrics = {**twin.metrics, "duplicate_of": twin.id}
        candidate.reason = f"duplicate of {twin.id} ({twin.name}): {why}"
        candidate.category = "duplicate"
        self.archive.update(candidate)
        logger.info("candidate %s (%s) is a duplicate of %s (%s)", candidate.id, candidate.name, twin.id, twin.name)
