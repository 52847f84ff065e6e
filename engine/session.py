"""One invocation of `evolve`: open or resume a run, prepare the task, evolve, summarize."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.candidate import Status
from engine.config import RunConfig
from engine.console import RichReporter, candidate_table, fmt
from engine.loop import Evolution, LoopOptions, SeedsFailed, summarize
from engine.prompts import ContextOptions
from engine.proposer import ProposerStopped
from engine.runner import RunError, build_pipeline, choose_proposer, lock_run_dir, open_run, prepare_task

logger = logging.getLogger(__name__)


def run_session(
    config: RunConfig | None,
    resume_dir: Path | None,
    overrides: dict[str, Any],
    log_level: str,
    console: Console,
) -> int:
    """Run or resume an evolution; return the process exit code."""
    from engine.cli import configure_logging

    context = open_run(config, resume_dir, overrides)
    lock = lock_run_dir(context.run_dir)
    configure_logging(context.run_dir, log_level)
    config = context.config
    archive = context.archive
    reporter = RichReporter(console)
    started = time.time()
    verb = "resuming" if resume_dir else "starting"
    logger.info("%s run %s: task %s, %d generations", verb, context.run_dir, config.task, config.generations)
    archive.log_event("start", {"resume": resume_dir is not None, "generations": config.generations})
    console.print(f"[bold]{verb} run[/] {context.run_dir}  task [bold]{config.task}[/]")
    console.print(f"sandbox: {context.backend_reason}")
    console.print(f"  {context.backend.describe()}")
    removed = context.backend.cleanup_leftovers(archive.get_meta("run_id", context.run_dir.name))
    if removed:
        console.print(f"removed {removed} leftover sandbox container(s) of an earlier crash")

    try:
        proposer = choose_proposer(config.proposer, archive, context.task)
        console.print(f"proposer: {proposer.name}")
        archive.set_meta("proposer", proposer.name)

        # prepare cached model and data once per task and settings
        cache_dir = config.resolved_cache_dir()
        console.print(f"preparing task data and model (cache: {cache_dir}) ...")
        prepare_started = time.monotonic()
        prepare_task(context.task, context.settings, cache_dir, context.run_dir / "jobs" / "prepare",
                     on_progress=lambda event: logger.debug("prepare: %s", event), task_ref=config.task)
        console.print(f"  ready in {time.monotonic() - prepare_started:.0f} s")

        pipeline = build_pipeline(context, on_stage=reporter.stage, on_progress=reporter.progress)
        options = LoopOptions(
            generations=config.generations,
            max_attempts=config.max_attempts,
            seed=config.seed,
            time_budget_s=config.time_budget_min * 60.0,
            population=config.population,
            workers=config.workers,
            context=ContextOptions.from_config(config.proposer),
        )
        evolution = Evolution(context.task, context.settings, archive, pipeline, proposer, reporter, options)

        # seeds: inserted once, evaluated (or taken from the baseline cache) before generation 1
        evolution.add_seeds(_seed_programs(context.task, config.seed_group))
        seed_ids = {seed.id for seed in archive.seeds()}
        resumed = [candidate for candidate in archive.unfinished() if candidate.id not in seed_ids]
        console.rule("seeds, and candidates the interrupted run left unfinished" if resumed else "seeds")
        evolution.judge_unfinished()
        console.print(candidate_table("seed programs (measured on this task)", archive.seeds()))
        evolution.check_seeds()

        evolution.run()
    except KeyboardInterrupt:
        reporter.close()
        archive.set_meta("status", "interrupted")
        archive.log_event("interrupted", {"after_s": time.time() - started})
        console.print(f"\n[yellow]interrupted.[/] Nothing was lost; continue with: evolve --resume {context.run_dir}")
        return 130
    except ProposerStopped as stopped:
        reporter.close()
        archive.set_meta("status", "stopped")
        archive.log_event("stopped", {"reason": type(stopped).__name__, "message": str(stopped)})
        completed = archive.get_meta("completed_generations", 0)
        console.print(f"\n[red]stopped:[/] {escape(str(stopped))}")
        console.print(f"{completed} generation(s) completed. Nothing was lost; continue with: "
                      f"evolve --resume {context.run_dir}")
        return stopped.exit_code
    except SeedsFailed as failed:
        reporter.close()
        archive.set_meta("status", "stopped")
        archive.log_event("stopped", {"reason": "SeedsFailed", "message": str(failed)})
        console.print(f"\n[red]stopped:[/] {escape(str(failed)).replace('RUN_DIR', str(context.run_dir))}")
        console.print(f"Fix the cause, then continue with: evolve --resume {context.run_dir} (the seeds are judged again)")
        return 1
    except RunError:
        reporter.close()
        archive.set_meta("status", "failed")
        raise
    finally:
        lock.close()

    reporter.close()
    archive.set_meta("status", "finished")
    archive.log_event("finish", {"wall_s": time.time() - started})
    _print_summary(console, context.run_dir, archive)
    return 0


def _seed_programs(task, group: str):
    try:
        seeds = task.seeds(group or "baselines")
    except ValueError as error:
        raise RunError(f"cannot load the seed programs: {error}") from None
    if not seeds:
        raise RunError(f"task {task.name!r} has no seed programs in group {group!r}")
    return seeds


def _print_summary(console: Console, run_dir: Path, archive) -> None:
    summary = summarize(archive)
    proposals = list(archive.iter_proposals())
    console.print(candidate_table("all proposals", proposals))
    counts = Table(title="candidates by status", title_justify="left")
    counts.add_column("status")
    counts.add_column("count", justify="right")
    for status, count in sorted(summary["counts"].items()):
        counts.add_row(status, str(count))
    console.print(counts)
    best = summary["best"]
    best_seed = summary["best_seed"]
    if best_seed is not None:
        console.print(f"best seed:      {best_seed.name}  fitness {fmt(best_seed.fitness)}")
    if best is not None:
        console.print(f"best candidate: [bold]{best.name}[/] ({best.id})  fitness {fmt(best.fitness)}")
        code_path = run_dir / "best_candidate.py"
        code_path.write_text(best.code)
        console.print(f"its code:       {code_path}")
    else:
        evaluated = sum(1 for c in proposals if c.status is Status.EVALUATED)
        console.print(f"no proposal was evaluated ({evaluated} of {len(proposals)})")
    console.print(f"archive:        {run_dir / 'archive.sqlite'}  (evolve show {run_dir})")
