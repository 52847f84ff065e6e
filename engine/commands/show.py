"""`evolve show`: leaderboard, lineage of the best proposals and totals of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from engine.archive import Archive
from engine.candidate import Candidate, Origin, Status
from engine.console import fmt
from engine.report import (
    RunDirError,
    RunTotals,
    candidate_summary,
    context_of,
    leaderboard,
    open_run_archive,
    run_totals,
    top_proposals,
    total_seconds,
)

console = Console()
_CONTEXT_SHOWN = 5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve show",
        description="Show the leaderboard of evaluated candidates, what the proposer saw before writing the best "
        "proposals, and the run's totals. Reads the archive only.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory (contains archive.sqlite)")
    parser.add_argument("--top", type=int, default=20, metavar="N", help="leaderboard rows (default: 20)")
    parser.add_argument("--lineage", type=int, default=3, metavar="K",
                        help="best proposals whose context is listed (default: 3)")
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
        board = leaderboard(archive)[: max(0, args.top)]
        lineage = [(c, context_of(archive, c)) for c in top_proposals(archive, max(0, args.lineage))]
        totals = run_totals(archive)
        config = archive.get_meta("config") or {}
        if args.json:
            payload = {
                "run_dir": str(args.run_dir),
                "task": config.get("task"),
                "settings": archive.get_meta("settings"),
                "proposer": archive.get_meta("proposer"),
                "backend": archive.get_meta("backend"),
                "leaderboard": [candidate_summary(c) for c in board],
                "lineage": [
                    {**candidate_summary(c), "context": [candidate_summary(p) for p in context]}
                    for c, context in lineage
                ],
                "totals": totals.to_dict(),
            }
            print(json.dumps(payload, indent=2))
            return 0
        print_header(archive, args.run_dir, config)
        console.print(leaderboard_table(board))
        if lineage:
            console.print(lineage_tree(lineage))
        print_totals(totals)
        return 0
    finally:
        archive.close()


def preset_name(config: dict) -> str:
    """Return the run's preset, naming the task's default preset when the run chose none."""
    if config.get("preset"):
        return str(config["preset"])
    from evaluators.registry import get_task

    try:
        return get_task(str(config.get("task"))).default_preset
    except ValueError:
        return "the task's default"  # the task's plugin is not installed here


def print_header(archive: Archive, run_dir: Path, config: dict) -> None:
    settings = archive.get_meta("settings") or {}
    beta = f", beta {settings['beta']}" if "beta" in settings else ""
    console.print(
        f"[bold]{escape(str(run_dir))}[/]  task {escape(str(config.get('task')))}"
        f" (preset {escape(preset_name(config))}{beta}), proposer "
        f"{escape(str(archive.get_meta('proposer', '-')))}, sandbox {escape(str(archive.get_meta('backend', '-')))}"
    )


def leaderboard_table(board: list[Candidate]) -> Table:
    table = Table(title="leaderboard (evaluated candidates, best first; seeds marked)", title_justify="left")
    numeric = ("#", "gen", "fitness", "reward", "KL", "time")
    for column in ("#", "id", "name", "origin", "gen", "fitness", "reward", "KL", "time"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for rank, candidate in enumerate(board, start=1):
        seed = candidate.origin is Origin.SEED
        seconds = total_seconds(candidate)
        cached = " (cached)" if candidate.metrics.get("baseline_cache") else ""
        table.add_row(
            str(rank),
            candidate.id,
            escape(candidate.name[:32]),
            f"[cyan]seed[/]{cached}" if seed else "proposal",
            str(candidate.generation),
            fmt(candidate.fitness),
            fmt(candidate.metrics.get("reward")),
            fmt(candidate.metrics.get("kl")),
            f"{seconds:.0f} s" if seconds else "-",
        )
    return table


def lineage_tree(lineage: list[tuple[Candidate, list[Candidate]]]) -> Tree:
    """Show, for each top proposal, the evaluated candidates its proposer had in context, best first."""
    tree = Tree("[bold]lineage[/]: what the proposer had in context when writing the best proposals")
    for candidate, context in lineage:
        evaluated = sorted(
            (c for c in context if c.status is Status.EVALUATED and c.fitness is not None), key=lambda c: -c.fitness
        )
        seeds = sum(1 for c in context if c.origin is Origin.SEED)
        others = len(context) - len(evaluated)
        branch = tree.add(
            f"{candidate.id} [bold]{escape(candidate.name)}[/] fitness {fmt(candidate.fitness)}: "
            f"{len(context)} in context ({seeds} seeds, {len(evaluated)} evaluated, {others} not evaluated)"
        )
        for parent in evaluated[:_CONTEXT_SHOWN]:
            kind = "seed" if parent.origin is Origin.SEED else f"gen {parent.generation}"
            branch.add(f"{parent.id} {escape(parent.name)} ({kind}) fitness {fmt(parent.fitness)}")
        if len(evaluated) > _CONTEXT_SHOWN:
            branch.add(f"and {len(evaluated) - _CONTEXT_SHOWN} more evaluated")
    return tree


def print_totals(totals: RunTotals) -> None:
    table = Table(title="totals", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for status, count in sorted(totals.counts.items()):
        table.add_row(f"candidates {status}", str(count))
    table.add_row("run status", totals.status)
    table.add_row("generations completed", str(totals.generations))
    table.add_row("wall time", f"{totals.wall_s / 60:.1f} min over {totals.sessions} session(s)")
    llm = totals.llm
    table.add_row("LLM calls", str(llm["calls"]))
    table.add_row("tokens (prompt + completion)", f"{llm['prompt_tokens']} + {llm['completion_tokens']}")
    table.add_row("retries", str(llm["retries"]))
    table.add_row("cost", f"${llm['cost_usd']:.4f}")
    table.add_row("reruns recorded", str(totals.reruns))
    console.print(table)
