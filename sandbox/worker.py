"""Worker entry point that runs one job inside a sandbox process or container.

Usage: python -m sandbox.worker JOB_DIR

Reads JOB_DIR/job.json, runs the job and writes JOB_DIR/result.json. It never
imports the engine. Candidate code is checked statically again here before it
is compiled with RestrictedPython, so a bypass of the engine's check still
meets the same policy.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

from sandbox.protocol import PROGRESS_FILE, Job, JobKind, Stage, StageResult

logger = logging.getLogger("sandbox.worker")


def _peak_rss_mb() -> float | None:
    try:
        import resource

        # ru_maxrss is in KiB on Linux.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return None


class _ProgressWriter:
    """Appends progress events as JSON lines that the engine tails."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __call__(self, step: int, total: int, message: str) -> None:
        with open(self._path, "a") as handle:
            handle.write(json.dumps({"t": time.time(), "step": step, "total": total, "message": message}) + "\n")


def run_job(job: Job, job_dir: Path) -> StageResult:
    """Run one job and return its result; candidate faults become rejections."""
    from evaluators.registry import get_task
    from evaluators.task import CandidateRejected
    from sandbox.loader import load_candidate
    from sandbox.static_check import StaticCheckError, check_source

    task = get_task(job.task)
    settings = task.settings_from_dict(job.settings)
    cache_dir = Path(job.cache_dir)
    progress = _ProgressWriter(job_dir / PROGRESS_FILE)

    if job.kind is JobKind.PREPARE:
        task.prepare(settings, cache_dir, progress)
        return StageResult(ok=True, stage=Stage.SANDBOX)

    # static checks again, then load the candidate under RestrictedPython
    hyperparameters = task.hyperparameter_values(settings)
    try:
        check_source(job.code, task.interface.params, tuple(hyperparameters))
        candidate = load_candidate(job.code, task.interface.params, hyperparameters)
    except StaticCheckError as error:
        return StageResult(ok=False, stage=Stage.STATIC, reason=error.reason, category=error.category)

    stage = Stage.UNIT_TEST if job.kind is JobKind.UNIT_TEST else Stage.TRAIN
    try:
        if job.kind is JobKind.UNIT_TEST:
            metrics = task.unit_test(candidate, settings)
            return StageResult(ok=True, stage=stage, metrics=metrics)
        work_dir = job_dir / "work"
        work_dir.mkdir(exist_ok=True)
        outcome = task.evaluate(candidate, settings, cache_dir, work_dir, progress, job.seed)
        return StageResult(ok=True, stage=Stage.EVALUATE, fitness=outcome.fitness, metrics=outcome.metrics)
    except CandidateRejected as rejection:
        failed_stage = Stage(rejection.stage) if rejection.stage else stage
        return StageResult(
            ok=False, stage=failed_stage, reason=rejection.reason, category=rejection.category
        )
    except Exception as error:  # noqa: BLE001 - any candidate fault must become a recorded rejection
        frames = traceback.extract_tb(error.__traceback__)
        candidate_frames = [frame for frame in frames if frame.filename == "<candidate>"]
        where = f" (candidate line {candidate_frames[-1].lineno})" if candidate_frames else ""
        reason = f"{type(error).__name__}: {error}{where}"
        return StageResult(ok=False, stage=stage, reason=reason, category=_categorize(error))


def _categorize(error: Exception) -> str:
    text = str(error)
    if "dtype" in text or "device" in text or "same type" in text or "BFloat16" in text:
        return "dtype_device"
    if isinstance(error, MemoryError) or "out of memory" in text.lower():
        return "oom"
    return "exception"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sandbox.worker JOB_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_dir = Path(argv[0])
    start = time.monotonic()
    job = Job.read(job_dir)
    result = run_job(job, job_dir)
    result.wall_s = time.monotonic() - start
    result.peak_rss_mb = _peak_rss_mb()
    result.write(job_dir)
    logger.info("job %s finished: ok=%s stage=%s", job.kind.value, result.ok, result.stage.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
