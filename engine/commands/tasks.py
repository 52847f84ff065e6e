"""`evolve tasks`: list the registered tasks."""

from __future__ import annotations

import argparse

from rich.console import Console

console = Console()


def main(argv: list[str]) -> int:
    from evaluators.registry import get_task, list_tasks

    parser = argparse.ArgumentParser(prog="evolve tasks", description="List the registered tasks.")
    parser.parse_args(argv)
    for name in list_tasks():
        try:
            description = get_task(name).description
        except Exception as error:  # noqa: BLE001 - a broken plugin must not hide the others
            description = f"(cannot be loaded: {type(error).__name__}: {error})"
        console.print(f"[bold]{name}[/]  {description}")
    return 0
