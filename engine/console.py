"""What a person watching a run sees: progress of the current candidate, tables per generation."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.candidate import Candidate, Status

_STATUS_STYLE = {
    Status.EVALUATED: "green",
    Status.REJECTED: "red",
    Status.TIMEOUT: "red",
    Status.FAILED: "magenta",
    Status.DUPLICATE: "yellow",
}


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return "-"


def candidate_row(candidate: Candidate) -> list[str]:
    style = _STATUS_STYLE.get(candidate.status, "")
    status = f"[{style}]{candidate.status.value}[/]" if style else candidate.status.value
    where = candidate.stage.value if candidate.stage and candidate.status is not Status.EVALUATED else ""
    reason = candidate.reason if candidate.status is not Status.EVALUATED else ""
    seconds = sum(v for v in candidate.timings.values() if isinstance(v, (int, float)))
    return [
        candidate.id,
        candidate.name[:32],
        status,
        fmt(candidate.fitness),
        fmt(candidate.metrics.get("reward")),
        fmt(candidate.metrics.get("kl")),
        f"{seconds:.0f}s" if seconds else "-",
        f"{where}: {reason[:70]}" if where else "",
    ]


def candidate_table(title: str, candidates: list[Candidate]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("id", "name", "status", "fitness", "reward", "KL", "time", "stage: reason"):
        table.add_column(column, overflow="fold")
    for candidate in candidates:
        table.add_row(*candidate_row(candidate))
    return table


class RichReporter:
    """Shows stage and step progress for each candidate and a table per generation.

    With several candidates judged at once (--workers), the live progress bar
    is replaced by one line per started and finished candidate.
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._progress: Progress | None = None
        self._task_id: Any = None
        self._started = 0.0
        self._lock = threading.RLock()
        self._active: set[str] = set()

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def generation_started(self, generation: int, total: int) -> None:
        self.console.rule(f"generation {generation} of {total}")

    def candidate_started(self, candidate: Candidate) -> None:
        with self._lock:
            self._active.add(candidate.id)
            if len(self._active) > 1:
                self._stop_progress()
                self.console.print(f"  {candidate.id} {candidate.name or '(unparsed reply)'} started")
                return
            self._start_progress(candidate)

    def _start_progress(self, candidate: Candidate) -> None:
        self._stop_progress()
        self._started = time.monotonic()
        label = f"{candidate.id} {candidate.name or '(unparsed reply)'}"
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._task_id = self._progress.add_task(label, total=None, detail="")
        self._progress.start()

    def stage(self, candidate: Candidate, label: str) -> None:
        with self._lock:
            if self._progress is not None and len(self._active) == 1:
                self._progress.update(self._task_id, detail=label, total=None, completed=0)

    def progress(self, candidate: Candidate, event: dict[str, Any]) -> None:
        with self._lock:
            self._show_progress(event)

    def _show_progress(self, event: dict[str, Any]) -> None:
        if self._progress is None or len(self._active) != 1:
            return
        total = event.get("total") or None
        self._progress.update(
            self._task_id, completed=event.get("step", 0), total=total, detail=str(event.get("message", ""))[:60]
        )

    def candidate_finished(self, candidate: Candidate) -> None:
        with self._lock:
            self._active.discard(candidate.id)
            self._stop_progress()
            self._print_finished(candidate)

    def _print_finished(self, candidate: Candidate) -> None:
        row = candidate_row(candidate)
        detail = f"fitness {row[3]}" if candidate.status is Status.EVALUATED else row[7]
        self.console.print(f"  {candidate.id} [bold]{candidate.name}[/] -> {row[2]} {detail}")

    def generation_finished(self, generation: int, candidates: list[Candidate]) -> None:
        self.console.print(candidate_table(f"generation {generation}", candidates))

    def message(self, text: str) -> None:
        self._stop_progress()
        self.console.print(text)

    def close(self) -> None:
        self._stop_progress()
