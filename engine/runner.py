"""Builds a run from its configuration: run directory, archive, sandbox, proposer and task."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.archive import ARCHIVE_FILE, Archive
from engine.config import ConfigError, ProposerConfig, RunConfig, SandboxConfig, config_from_dict, merge
from engine.pipeline import Pipeline, PipelineLimits
from engine.proposer import Proposer
from evaluators.registry import get_task
from evaluators.task import Task
from sandbox.backend import BackendKind, Limits, SandboxBackend, SandboxUnavailable
from sandbox.process_backend import ProcessBackend, read_log_tail
from sandbox.protocol import LOG_FILE, PROGRESS_FILE, RESULT_FILE, Job, JobKind, ProgressTail

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """Raised for a problem that stops a run before or between candidates; the message names the fix."""


@dataclass
class RunContext:
    config: RunConfig
    run_dir: Path
    archive: Archive
    task: Task
    settings: Any
    backend: SandboxBackend
    backend_reason: str


def resolve_settings(task: Task, preset: str, overrides: dict[str, Any]) -> Any:
    """Return the task's settings for a preset with single values overridden."""
    presets = task.presets()
    name = preset or task.default_preset
    if name not in presets:
        raise ConfigError([f"preset {name!r} is not defined for task {task.name!r}; presets: {sorted(presets)}"])
    base = task.settings_to_dict(presets[name])
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ConfigError([f"unknown task setting(s) {unknown} for task {task.name!r}; settings: {sorted(base)}"])
    problems = []
    for key, value in overrides.items():
        current = base[key]
        if isinstance(current, bool) or current is None:
            base[key] = value
        elif isinstance(current, (int, float)) and not isinstance(value, (int, float)):
            problems.append(f"setting {key} = {value!r}: expected a number like {current!r}")
        elif isinstance(current, int) and isinstance(value, float) and not value.is_integer():
            problems.append(f"setting {key} = {value!r}: expected an integer like {current!r}")
        else:
            base[key] = type(current)(value) if isinstance(current, (int, float, str)) else value
    if problems:
        raise ConfigError(problems)
    try:
        return task.settings_from_dict(base)
    except (TypeError, ValueError) as error:
        raise ConfigError([f"invalid settings for task {task.name!r}: {error}"]) from None


def choose_backend(config: SandboxConfig, run_id: str) -> tuple[SandboxBackend, str]:
    """Return the sandbox backend to use and a sentence saying why."""
    if config.executor == "ray":
        return choose_ray_backend(config, run_id)
    if config.backend in ("docker", "auto"):
        try:
            from sandbox.docker_backend import DockerBackend

            backend = DockerBackend(image=config.image, run_id=run_id)
            return backend, f"docker: the Docker engine answered and image {config.image} is present"
        except SandboxUnavailable as error:
            if config.backend == "docker":
                raise RunError(str(error)) from None
            reason = f"process: Docker is not usable ({error})"
        except ImportError as error:
            if config.backend == "docker":
                raise RunError(f"the Docker backend cannot be loaded: {error}") from None
            reason = f"process: the Docker backend cannot be loaded ({error})"
    else:
        reason = "process: chosen with --sandbox process"
    if config.gpu:
        raise RunError("a GPU was requested (--gpu) but only the Docker backend assigns GPUs; use --sandbox docker")
    try:
        return ProcessBackend(require_network_isolation=not config.allow_network, warm=config.warm_start), reason
    except SandboxUnavailable as error:
        raise RunError(str(error)) from None


def choose_ray_backend(config: SandboxConfig, run_id: str) -> tuple[SandboxBackend, str]:
    """Return a backend that runs each job as a Ray task, in the sandbox that a probed node provides."""
    try:
        from sandbox.ray_backend import RayBackend
    except ImportError as error:
        raise RunError(f"--executor ray needs the ray package ({error}); install it with pip install 'evolve[ray]'") from None
    inner = None if config.backend == "auto" else BackendKind(config.backend)
    try:
        backend = RayBackend(inner, config.ray_address, run_id=run_id, image=config.image,
                             allow_network=config.allow_network, gpu=config.gpu,
                             warm_start=config.warm_start)
    except SandboxUnavailable as error:
        raise RunError(str(error)) from None
    return backend, f"ray: one Ray task per job on the cluster at {backend.address}, in the node's {backend.kind.value} sandbox"


def choose_proposer(config: ProposerConfig, archive: Archive | None = None, task: Task | None = None) -> Proposer:
    """Return the proposer that a config selects; an LLM proposer's ledger continues from the archive's totals."""
    kind = config.kind
    if kind == "auto":
        kind = "openai" if (config.base_url or os.environ.get(config.api_key_env)) else "offline"
    if kind == "openai":
        from engine.multi_proposer import build_llm_proposer

        try:
            return build_llm_proposer(config, archive.llm_totals() if archive is not None else None)
        except ValueError as error:
            raise RunError(str(error)) from None
    from engine.offline_proposer import OfflineProposer, PreferenceLossGrammar

    grammar = task.loss_grammar() if task is not None else None
    if grammar is None:
        grammar = PreferenceLossGrammar()
        if task is not None and tuple(task.interface.params) != tuple(grammar.params):
            # NOTE: the run still evaluates the task's seeds, but every offline proposal is rejected
            # at the static stage because it has the preference interface.
            logger.warning(
                "the offline proposer has no building blocks for task %r (its candidates take %s), so its "
                "proposals will be rejected; implement Task.loss_grammar() or use --proposer openai",
                task.name,
                ", ".join(task.interface.params),
            )
    return OfflineProposer(grammar=grammar)


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on the run directory for the life of the process."""
    handle = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunError(f"another evolve process is using {run_dir}; wait for it or stop it first") from None
    return handle


def open_run(config: RunConfig | None, resume_dir: Path | None, overrides: dict[str, Any]) -> RunContext:
    """Create a new run directory, or reopen one to resume, and build its components."""
    if resume_dir is not None:
        archive_path = resume_dir / ARCHIVE_FILE
        if not archive_path.exists():
            raise RunError(f"cannot resume {resume_dir}: it has no {ARCHIVE_FILE}. Pass a run directory made by evolve.")
        archive = Archive(archive_path)
        stored = archive.get_meta("config")
        # flags given with --resume change single values; the rest of each section stays as stored
        values = merge(dict(stored), overrides)
        config = config_from_dict(values, source=f"{resume_dir}/{ARCHIVE_FILE}")
        run_dir = resume_dir
    else:
        assert config is not None
        get_task(config.task)  # an unknown task name fails before any directory is made
        run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(config.task)
        if (run_dir / ARCHIVE_FILE).exists():
            raise RunError(f"{run_dir} already contains a run; resume it with --resume {run_dir} or choose another --run-dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        config = RunConfig(**{**config.__dict__, "run_dir": str(run_dir)})
        archive = Archive(run_dir / ARCHIVE_FILE)
        archive.set_meta("config", config.to_dict())
        archive.set_meta("run_id", run_dir.name)
        archive.set_meta("created_at", time.time())

    task = get_task(config.task)
    settings = resolve_settings(task, config.preset, config.settings)
    archive.set_meta("settings", task.settings_to_dict(settings))
    backend, reason = choose_backend(config.sandbox, archive.get_meta("run_id", run_dir.name))
    archive.set_meta("backend", backend.kind.value)
    return RunContext(config, run_dir, archive, task, settings, backend, reason)


def default_run_dir(task: str) -> Path:
    return Path("runs") / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"


def pipeline_limits(config: SandboxConfig) -> PipelineLimits:
    return PipelineLimits(
        unit_test=Limits(timeout_s=config.unit_test_timeout_s, memory_mb=config.unit_test_memory_mb, cpus=config.cpus),
        evaluate=Limits(
            timeout_s=config.train_timeout_s, memory_mb=config.train_memory_mb, cpus=config.cpus, gpu=config.gpu
        ),
    )


def build_pipeline(context: RunContext, on_stage=None, on_progress=None) -> Pipeline:
    return Pipeline(
        task=context.task,
        settings=context.settings,
        backend=context.backend,
        archive=context.archive,
        run_dir=context.run_dir,
        cache_dir=context.config.resolved_cache_dir(),
        limits=pipeline_limits(context.config.sandbox),
        seed=context.config.seed,
        on_stage=on_stage,
        on_progress=on_progress,
        task_ref=context.config.task,
    )


def prepare_task(
    task: Task, settings: Any, cache_dir: Path, job_dir: Path, on_progress=None, task_ref: str = ""
) -> None:
    """Build the task's cached model and data in a child process (trusted code, network allowed).

    Preparation may download from a model hub for users who have a network, so
    it keeps the environment; it never runs candidate code.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    for stale in (RESULT_FILE, PROGRESS_FILE):
        (job_dir / stale).unlink(missing_ok=True)
    job = Job(kind=JobKind.PREPARE, task=task_ref or task.name, settings=task.settings_to_dict(settings), cache_dir=str(cache_dir))
    job.write(job_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    tail = ProgressTail(job_dir / PROGRESS_FILE)
    with open(job_dir / LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "sandbox.worker", str(job_dir)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            while True:
                try:
                    process.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if on_progress is not None:
                        for event in tail.poll():
                            on_progress(event)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    result_path = job_dir / RESULT_FILE
    if process.returncode != 0 or not result_path.exists():
        tail_text = read_log_tail(job_dir / LOG_FILE, 2000)
        raise RunError(
            f"preparing task {task.name!r} failed (exit status {process.returncode}); "
            f"log: {job_dir / LOG_FILE}\n{tail_text}"
        )
    result = json.loads(result_path.read_text())
    if not result.get("ok"):
        raise RunError(f"preparing task {task.name!r} failed: {result.get('reason')}; log: {job_dir / LOG_FILE}")
