"""`evolve rerun`: judge one candidate again with the run's stored settings, to measure fitness noise.

The rerun goes through the same Pipeline and sandbox backend as the run, on a
copy of the candidate in a scratch archive under RUN_DIR/reruns/, so the
original row is never changed. The result is appended to the run's events
table as a "rerun" event, which `evolve audit RUN_DIR ID` and `evolve show` read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from engine.archive import Archive
from engine.candidate import Candidate, Origin, Status
from engine.console import fmt
from engine.report import RERUN_EVENT, RunDirError, find_candidate, open_run_archive

console = Console()
_METRICS_KEPT = ("reward", "kl", "accuracy", "reward_gain", "peak_rss_mb", "train_s", "eval_s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve rerun",
        description="Judge one candidate again (static checks, unit tests, fine-tune and score) with the run's "
        "stored task settings, limits and sandbox, and compare the fitness with the original. The original "
        "row is not changed; the result is recorded as a 'rerun' event in the run's archive.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (contains archive.sqlite)")
    parser.add_argument("candidate_id", metavar="ID", help="candidate id, such as g003-a02 or seed-dpo")
    parser.add_argument("--seed", type=int, help="training seed (default: the run's seed); the task's data "
                        "settings, including its own seed setting, stay as stored")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        archive = open_run_archive(args.run_dir)
    except RunDirError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2
    try:
        original = find_candidate(archive, args.candidate_id)
        stored_config = archive.get_meta("config")
        stored_settings = archive.get_meta("settings")
        run_id = archive.get_meta("run_id", args.run_dir.name)
        stored_backend = archive.get_meta("backend", "")
    except KeyError as error:
        console.print(f"[red]error:[/] {escape(error.args[0])}", soft_wrap=True)
        return 2
    finally:
        archive.close()
    if not original.code.strip():
        console.print(
            f"[red]error:[/] candidate {original.id} has no code (its reply could not be parsed); nothing to rerun",
            soft_wrap=True,
        )
        return 1
    if stored_config is None or stored_settings is None:
        console.print(
            "[red]error:[/] the archive contains no run configuration or task settings; was the run started?",
            soft_wrap=True,
        )
        return 2

    from engine.config import ConfigError, config_from_dict
    from engine.runner import RunError
    from evaluators.registry import UnknownTaskError

    try:
        config = config_from_dict(stored_config, source=f"{args.run_dir}/archive.sqlite")
        seed = config.seed if args.seed is None else args.seed
        if not args.json:
            console.print(f"rerunning {original.id} ({escape(original.name)}) with seed {seed} ...")
        rerun = rerun_candidate(args.run_dir, original, config, stored_settings, stored_backend, str(run_id), seed)
    except (ConfigError, RunError, UnknownTaskError, ValueError) as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2

    detail = rerun_detail(original, rerun, seed, config.seed)
    writer = Archive.open_run(args.run_dir, read_only=False)
    try:
        writer.log_event(RERUN_EVENT, detail)
    finally:
        writer.close()

    if args.json:
        print(json.dumps(detail, indent=2))
    else:
        print_comparison(detail)
    return 0 if rerun.status is Status.EVALUATED else 1


def rerun_candidate(
    run_dir: Path,
    original: Candidate,
    config,
    stored_settings: dict[str, Any],
    stored_backend: str,
    run_id: str,
    seed: int,
) -> Candidate:
    """Judge a fresh copy of `original` in a scratch archive with the run's settings; return the copy."""
    from engine.pipeline import Pipeline
    from engine.runner import choose_backend, pipeline_limits, prepare_task
    from evaluators.registry import get_task

    task = get_task(config.task)
    settings = task.settings_from_dict(stored_settings)
    # the backend the run really used, not "auto", which may choose differently today
    sandbox = dataclasses.replace(config.sandbox, backend=stored_backend) if stored_backend else config.sandbox
    backend, _ = choose_backend(sandbox, f"{run_id}-rerun")
    scratch_dir = run_dir / "reruns" / f"{original.id}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    scratch_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = config.resolved_cache_dir()
    prepare_task(task, settings, cache_dir, scratch_dir / "jobs" / "prepare", task_ref=config.task)

    # A fresh copy starts at PENDING. It is marked as a proposal because the
    # pipeline takes a seed's fitness from the baseline cache instead of training it.
    copy = Candidate(
        id=original.id,
        generation=original.generation,
        attempt=original.attempt,
        origin=Origin.PROPOSER,
        name=original.name,
        code=original.code,
        thought=original.thought,
        model=original.model,
    )
    scratch = Archive(scratch_dir / "archive.sqlite")
    try:
        scratch.set_meta("rerun_of", {"run_dir": str(run_dir), "candidate_id": original.id, "seed": seed})
        scratch.insert(copy)
        pipeline = Pipeline(
            task=task,
            settings=settings,
            backend=backend,
            archive=scratch,
            run_dir=scratch_dir,
            cache_dir=cache_dir,
            limits=pipeline_limits(sandbox),
            seed=seed,
            task_ref=config.task,
        )
        pipeline.judge(copy)
    finally:
        scratch.close()
    copy.metrics["rerun_dir"] = str(scratch_dir)
    return copy


def rerun_detail(original: Candidate, rerun: Candidate, seed: int, run_seed: int) -> dict[str, Any]:
    """Return the JSON record of a rerun: both outcomes and the fitness difference."""
    difference = None
    if original.fitness is not None and rerun.fitness is not None and rerun.status is Status.EVALUATED:
        difference = rerun.fitness - original.fitness
    return {
        "candidate_id": original.id,
        "name": original.name,
        "seed": seed,
        "run_seed": run_seed,
        "original_status": original.status.value,
        "original_fitness": original.fitness,
        "original_metrics": {k: original.metrics[k] for k in _METRICS_KEPT if k in original.metrics},
        "rerun_status": rerun.status.value,
        "rerun_stage": rerun.stage.value if rerun.stage else None,
        "rerun_category": rerun.category,
        "rerun_reason": rerun.reason,
        "rerun_fitness": rerun.fitness if rerun.status is Status.EVALUATED else None,
        "rerun_metrics": {k: rerun.metrics[k] for k in _METRICS_KEPT if k in rerun.metrics},
        "difference": difference,
        "rerun_timings": dict(rerun.timings),
        "rerun_dir": rerun.metrics.get("rerun_dir", ""),
    }


def print_comparison(detail: dict[str, Any]) -> None:
    console.print(f"[bold]{detail['candidate_id']}[/] {escape(detail['name'])}, seed {detail['seed']} "
                  f"(run seed {detail['run_seed']})")
    console.print(f"  original: {detail['original_status']}, fitness {fmt(detail['original_fitness'])}")
    if detail["rerun_status"] == Status.EVALUATED.value:
        console.print(f"  rerun:    evaluated, fitness {fmt(detail['rerun_fitness'])}")
    else:
        reason = escape(detail["rerun_reason"])
        console.print(f"  rerun:    {detail['rerun_status']} at {detail['rerun_stage']}: {reason}")
    if detail["difference"] is not None:
        console.print(f"  difference (rerun - original): {detail['difference']:+.4f}")
    for key in ("reward", "kl"):
        if key in detail["original_metrics"] or key in detail["rerun_metrics"]:
            before, after = detail["original_metrics"].get(key), detail["rerun_metrics"].get(key)
            console.print(f"  {key}: {fmt(before)} -> {fmt(after)}")
    console.print(f"  jobs and logs: {escape(detail['rerun_dir'])}")
