"""Every hostile corpus entry ends rejected or contained, in each sandbox backend.

Entries run through the real pipeline (static checks in the engine, unit tests
and, where the corpus expects it, training in the sandbox) against the
preference task's "tiny" preset. Each entry gets its own archive, so
equivalent entries are judged independently rather than as duplicates.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.archive import Archive
from engine.candidate import Candidate, Origin, Status
from engine.pipeline import Pipeline, PipelineLimits
from evaluators.registry import get_task
from sandbox.backend import Limits
from sandbox.protocol import Stage
from tests.corpus.hostile import BENIGN, HOSTILE
from tests.support.processes import leftover_processes

LATE_STAGES = {Stage.TRAIN.value, Stage.SANDBOX.value}


def make_backend(kind: str, run_id: str):
    if kind == "process":
        from sandbox.process_backend import ProcessBackend

        return ProcessBackend()
    from sandbox.backend import SandboxUnavailable

    try:
        from sandbox.docker_backend import DockerBackend

        return DockerBackend(run_id=run_id)
    except SandboxUnavailable as error:
        pytest.skip(f"Docker sandbox unavailable: {error}")


def judge_entry(entry, backend, tmp_path: Path, cache_dir: Path) -> Candidate:
    task = get_task("preference")
    settings = task.presets()["tiny"]
    run_dir = tmp_path / entry.id
    archive = Archive(run_dir / "archive.sqlite")
    limits = PipelineLimits(
        unit_test=Limits(timeout_s=20, memory_mb=3072, cpus=1),
        evaluate=Limits(timeout_s=60, memory_mb=6144, cpus=1),
    )
    pipeline = Pipeline(task, settings, backend, archive, run_dir, cache_dir, limits, seed=0)
    candidate = archive.insert(
        Candidate(id=entry.id, generation=1, attempt=1, origin=Origin.PROPOSER, name=entry.id.replace("-", "_"),
                  code=entry.code)
    )
    pipeline.validate(candidate)
    # only entries that the corpus expects to be stopped after the unit tests are trained
    if candidate.status is Status.VALIDATED and entry.expected_stages & LATE_STAGES:
        pipeline.judge(candidate)
    archive.close()
    return candidate


@pytest.mark.slow
@pytest.mark.parametrize("backend_kind", ["process", pytest.param("docker", marks=pytest.mark.docker)])
def test_hostile_corpus_contained(backend_kind, tmp_path, preference_tiny_cache):
    backend = make_backend(backend_kind, run_id="corpus-test")
    wrong = []
    for entry in HOSTILE:
        candidate = judge_entry(entry, backend, tmp_path, preference_tiny_cache)
        if candidate.status not in (Status.REJECTED, Status.TIMEOUT):
            wrong.append(f"{entry.id}: not rejected (status {candidate.status.value})")
        elif candidate.stage is None or candidate.stage.value not in entry.expected_stages:
            stage = candidate.stage.value if candidate.stage else None
            wrong.append(f"{entry.id}: rejected at {stage}, expected {sorted(entry.expected_stages)}: {candidate.reason}")
        elif not candidate.reason.strip():
            wrong.append(f"{entry.id}: rejected without a reason")
    assert wrong == []

    # nothing is left running: no child process here, no container with the test's label
    assert leftover_processes() == []
    if backend_kind == "docker":
        leftovers = backend.client.containers.list(all=True, filters={"label": "evolve.run_id=corpus-test"})
        assert leftovers == []


@pytest.mark.slow
def test_benign_corpus_passes_validation(tmp_path, preference_tiny_cache):
    backend = make_backend("process", run_id="corpus-test")
    for entry in BENIGN:
        candidate = judge_entry(entry, backend, tmp_path, preference_tiny_cache)
        assert candidate.status is Status.VALIDATED, f"{entry.id}: {candidate.stage} {candidate.reason}"
