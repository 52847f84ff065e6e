"""`evolve audit`: why candidates were rejected, grouped by stage and reason, or one candidate in full."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.archive import Archive
from engine.candidate import Candidate, Status
from engine.console import fmt
from sandbox.protocol import Stage
from engine.report import (
    STAGE_ORDER,
    RunDirError,
    candidate_record,
    count_by_stage,
    find_candidate,
    group_rejections,
    mentioned_lines,
    open_run_archive,
    rejected_candidates,
    reruns_of,
)

console = Console()
_IDS_SHOWN = 4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve audit",
        description="List the rejected, timed-out, failed and duplicate candidates of a run, grouped by stage "
        "and reason; with ID, show one candidate in full. Reads the archive only.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (contains archive.sqlite)")
    parser.add_argument("candidate_id", nargs="?", metavar="ID", help="candidate id, such as g003-a02 or seed-dpo")
    parser.add_argument("--stage", choices=[stage.value for stage in STAGE_ORDER], help="only rejections at this stage")
    parser.add_argument("--reason", metavar="SUBSTRING", help="only rejections whose reason or category contains it "
                        "(case-insensitive)")
    parser.add_argument("--generation", type=int, metavar="N", help="only candidates of generation N")
    parser.add_argument("--log-lines", type=int, default=30, metavar="N",
                        help="lines of the sandbox log tail shown with ID (default: 30)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        archive = open_run_archive(args.run_dir)
    except RunDirError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2
    try:
        if args.candidate_id:
            try:
                candidate = find_candidate(archive, args.candidate_id)
            except KeyError as error:
                console.print(f"[red]error:[/] {escape(error.args[0])}", soft_wrap=True)
                return 2
            return show_candidate(archive, candidate, args)
        return show_rejections(archive, args)
    finally:
        archive.close()


# the grouped list


def show_rejections(archive: Archive, args: argparse.Namespace) -> int:
    selected = rejected_candidates(archive, args.stage, args.reason, args.generation)
    groups = group_rejections(selected)
    by_stage = count_by_stage(selected)
    filters = {"stage": args.stage, "reason": args.reason, "generation": args.generation}
    total = archive.count()
    if args.json:
        payload = {
            "run_dir": str(args.run_dir),
            "task": (archive.get_meta("config") or {}).get("task"),
            "candidates": total,
            "rejected": len(selected),
            "filters": {key: value for key, value in filters.items() if value is not None},
            "by_stage": by_stage,
            "groups": [group.to_dict() for group in groups],
            "rejections": [
                {"id": c.id, "name": c.name, "generation": c.generation, "status": c.status.value,
                 "stage": c.stage.value if c.stage else None, "category": c.category, "reason": c.reason,
                 "duplicate_of": c.duplicate_of}
                for c in selected
            ],
        }
        print(json.dumps(payload, indent=2))
        return 0

    active = ", ".join(f"{key} {value}" for key, value in filters.items() if value is not None)
    console.print(
        f"[bold]{escape(str(args.run_dir))}[/]: {len(selected)} of {total} candidates rejected, timed out, failed "
        f"or duplicate" + (f" (filtered by {escape(active)})" if active else "")
    )
    if not selected:
        return 0
    stages = Table(title="by stage", title_justify="left")
    stages.add_column("stage")
    stages.add_column("count", justify="right")
    for stage, count in by_stage.items():
        stages.add_row(stage, str(count))
    console.print(stages)

    table = Table(title="by reason", title_justify="left")
    for column in ("stage", "category", "count", "reason (numbers and lists replaced)", "candidates"):
        table.add_column(column, overflow="fold")
    for group in groups:
        ids = ", ".join(group.candidate_ids[:_IDS_SHOWN])
        if group.count > _IDS_SHOWN:
            ids += f" and {group.count - _IDS_SHOWN} more"
        table.add_row(group.stage, group.category or "-", str(group.count), escape(group.pattern), ids)
    console.print(table)
    console.print("one candidate in full: evolve audit RUN_DIR ID")
    return 0


# one candidate in full


def offending_lines(archive: Archive, candidate: Candidate) -> list[int]:
    """Return the code lines a rejection points to: named in its reason, or found by the static check again.

    The static check is pure syntax-tree analysis, so running it here never runs candidate code.
    """
    lines = mentioned_lines(candidate.reason)
    if lines or not candidate.code or candidate.stage is not Stage.STATIC:
        return lines
    from evaluators.registry import UnknownTaskError, get_task
    from sandbox.static_check import StaticCheckError, check_source

    task_name = (archive.get_meta("config") or {}).get("task", "")
    try:
        interface = get_task(task_name).interface
    except (UnknownTaskError, ValueError):
        return []
    try:
        check_source(candidate.code, interface.params, tuple(interface.hyperparameters))
    except StaticCheckError as error:
        found = sorted({v.line for v in error.violations if v.line is not None})
        return found or ([error.line] if error.line is not None else [])
    return []


def show_candidate(archive: Archive, candidate: Candidate, args: argparse.Namespace) -> int:
    lines = offending_lines(archive, candidate)
    reruns = reruns_of(archive, candidate.id)
    if args.json:
        record = candidate_record(candidate)
        record["offending_lines"] = lines
        record["reruns"] = reruns
        print(json.dumps(record, indent=2, default=str))
        return 0

    console.rule(f"{candidate.id} {escape(candidate.name)}")
    console.print(
        f"generation {candidate.generation}, attempt {candidate.attempt}, {candidate.origin.value}"
        + (f", model {escape(candidate.model)}" if candidate.model else "")
        + f"; status [bold]{candidate.status.value}[/]"
        + (f", fitness {fmt(candidate.fitness)}" if candidate.fitness is not None else "")
    )
    _section("thought", candidate.thought or "(none)")

    marked = ", ".join(str(line) for line in lines)
    console.print("\n[bold]code[/]" + (f"  (line {marked} marked >>)" if lines else ""))
    if candidate.code:
        console.print(numbered_code(candidate.code, set(lines)), highlight=False)
    else:
        console.print("(no code: the reply could not be parsed; raw reply below)")
        console.print(escape(candidate.reply), highlight=False)

    if candidate.stage is not None and candidate.status is not Status.EVALUATED:
        console.print("\n[bold]failed check[/]")
        console.print(f"  stage:    {candidate.stage.value}")
        console.print(f"  category: {escape(candidate.category or '-')}")
        console.print(f"  reason:   {escape(candidate.reason or '-')}")
        if candidate.duplicate_of:
            console.print(f"  duplicate of: {candidate.duplicate_of} (evolve audit RUN_DIR {candidate.duplicate_of})")
    _section("feedback sent to the proposer", candidate.feedback or "(none yet)")

    console.print("\n[bold]resources[/]")
    for key, value in resource_use(candidate).items():
        console.print(f"  {key}: {value}")
    for rerun in reruns:
        console.print(f"  rerun with seed {rerun.get('seed')}: fitness {fmt(rerun.get('rerun_fitness'))} "
                      f"(original {fmt(rerun.get('original_fitness'))})")

    tail = candidate.log_tail.strip().splitlines()[-args.log_lines:] if args.log_lines > 0 else []
    _section(f"sandbox log tail (last {len(tail)} lines)", "\n".join(tail) if tail else "(empty)")
    return 0


def numbered_code(code: str, marked: set[int]) -> str:
    """Return the code with right-aligned line numbers and ">>" before each marked line, as rich markup."""
    lines = code.splitlines()
    width = len(str(len(lines)))
    rendered = []
    for number, text in enumerate(lines, start=1):
        if number in marked:
            rendered.append(f"[bold red]{number:>{width}} >> {escape(text)}[/]")
        else:
            rendered.append(f"{number:>{width}}    {escape(text)}")
    return "\n".join(rendered)


def resource_use(candidate: Candidate) -> dict[str, Any]:
    """Return the stage timings and memory peak recorded for a candidate."""
    use: dict[str, Any] = dict(candidate.timings)
    peak = candidate.metrics.get("peak_rss_mb")
    use["peak_rss_mb"] = peak if peak is not None else "not recorded (measured for training jobs only)"
    for key in ("load_s", "train_s", "eval_s"):
        if key in candidate.metrics:
            use[key] = candidate.metrics[key]
    return use


def _section(title: str, body: str) -> None:
    console.print(f"\n[bold]{title}[/]")
    console.print(escape(body), highlight=False)
