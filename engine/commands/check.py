"""`evolve check`: run the parse, static and unit-test stages on one candidate without a run.

Exit status: 0 when the candidate passes every stage, 1 when a stage rejects
it, 2 for a usage error (missing file, unknown task or preset) or when the
sandbox cannot run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from engine.report import mentioned_lines
from sandbox.protocol import Stage

console = Console()


@dataclass
class Verdict:
    """Outcome of checking one candidate: the first stage that rejected it, or none."""

    file: str
    task: str
    preset: str
    name: str = ""
    valid: bool = False
    stage: str = ""
    category: str = ""
    reason: str = ""
    line: int | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    log_tail: str = ""

    def passed(self, stage: Stage, seconds: float) -> None:
        self.stages.append({"stage": stage.value, "ok": True, "seconds": round(seconds, 3)})

    def reject(self, stage: Stage, category: str, reason: str, seconds: float, line: int | None = None) -> None:
        self.stages.append({"stage": stage.value, "ok": False, "seconds": round(seconds, 3)})
        self.valid = False
        self.stage = stage.value
        self.category = category
        self.reason = reason
        if line is None:
            line = next(iter(mentioned_lines(reason)), None)
        self.line = line


class SandboxError(RuntimeError):
    """Raised when the unit-test job cannot be started at all."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve check",
        description="Run the parse, static-check and unit-test stages on one candidate and print the verdict. "
        "FILE is a Python file (taken as the candidate code) or, with any other suffix, a raw LLM reply "
        "(parsed as the run would). Exit status: 0 valid, 1 rejected, 2 usage error or no sandbox.",
    )
    parser.add_argument("file", type=Path, metavar="FILE", help="a .py file with the code, or a file with a raw reply")
    parser.add_argument("--task", default="preference",
                        help="task whose interface and unit tests apply, a name or module:Class (default: preference)")
    parser.add_argument("--preset", default="", help="settings preset of the task (default: the task's own)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="wall-clock limit of the unit-test job (default: the run default, 60)")
    parser.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.file.is_file():
        console.print(
            f"[red]error:[/] file {escape(str(args.file))} not found; pass a .py file or a saved LLM reply",
            soft_wrap=True,
        )
        return 2

    from engine.config import ConfigError, SandboxConfig
    from engine.runner import resolve_settings
    from evaluators.registry import UnknownTaskError, get_task

    try:
        task = get_task(args.task)
        settings = resolve_settings(task, args.preset, {})
    except (UnknownTaskError, ConfigError) as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2

    sandbox = SandboxConfig()
    timeout_s = args.timeout if args.timeout is not None else sandbox.unit_test_timeout_s
    verdict = Verdict(file=str(args.file), task=task.name, preset=args.preset or task.default_preset)
    text = args.file.read_text(encoding="utf-8", errors="replace")
    try:
        run_stages(verdict, text, args.file.suffix == ".py", task, settings, args.task, timeout_s, sandbox)
    except SandboxError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2

    if args.json:
        print(json.dumps(verdict.__dict__, indent=2))
    else:
        print_verdict(verdict)
    return 0 if verdict.valid else 1


def run_stages(verdict: Verdict, text: str, is_code: bool, task, settings, task_ref: str, timeout_s: float,
               sandbox) -> None:
    """Fill `verdict` by running the stages in order, stopping at the first rejection."""
    from engine.reply import ReplyParseError, parse_reply
    from sandbox.static_check import StaticCheckError, check_source

    # parse: a raw reply goes through the run's parser; a .py file is the code itself
    started = time.monotonic()
    if is_code:
        code = text
        verdict.name = Path(verdict.file).stem
    else:
        try:
            proposal = parse_reply(text)
        except ReplyParseError as error:
            reason = f"the reply could not be parsed: {error.reason}"
            verdict.reject(Stage.PARSE, "parse", reason, time.monotonic() - started)
            return
        code = proposal.code
        verdict.name = proposal.name
        verdict.warnings = list(proposal.warnings)
        verdict.passed(Stage.PARSE, time.monotonic() - started)

    # static checks, in this process: pure syntax-tree analysis, the code is never run here
    started = time.monotonic()
    try:
        check_source(code, task.interface.params, tuple(task.interface.hyperparameters))
    except StaticCheckError as error:
        line = getattr(error, "line", None)
        verdict.reject(Stage.STATIC, error.category, error.reason, time.monotonic() - started, line)
        return
    verdict.passed(Stage.STATIC, time.monotonic() - started)

    # unit tests, in a sandboxed child process
    result = run_unit_test_job(code, task, settings, task_ref, timeout_s, sandbox)
    verdict.log_tail = result.log_tail
    if not result.ok:
        verdict.reject(result.stage, result.category, result.reason, result.wall_s)
        return
    verdict.passed(Stage.UNIT_TEST, result.wall_s)
    verdict.valid = True


def run_unit_test_job(code: str, task, settings, task_ref: str, timeout_s: float, sandbox):
    """Run the task's unit tests on `code` through the process backend and return the StageResult."""
    from engine.config import default_cache_dir
    from sandbox.backend import Limits, SandboxUnavailable
    from sandbox.process_backend import ProcessBackend
    from sandbox.protocol import Job, JobKind

    try:
        # one job only: a fork server would import more than this job needs and save nothing
        backend = ProcessBackend(require_network_isolation=not sandbox.allow_network, warm=False)
    except SandboxUnavailable as error:
        raise SandboxError(str(error)) from None
    job = Job(
        kind=JobKind.UNIT_TEST,
        task=task_ref,
        settings=task.settings_to_dict(settings),
        cache_dir=str(default_cache_dir()),
        code=code,
        candidate_id="check",
    )
    limits = Limits(timeout_s=timeout_s, memory_mb=sandbox.unit_test_memory_mb, cpus=sandbox.cpus)
    with tempfile.TemporaryDirectory(prefix="evolve-check-") as job_dir:
        return backend.run(job, Path(job_dir), limits)


def print_verdict(verdict: Verdict) -> None:
    seconds = sum(stage["seconds"] for stage in verdict.stages)
    label = escape(f"{verdict.name} ({verdict.file}, task {verdict.task}, preset {verdict.preset})")
    for warning in verdict.warnings:
        console.print(f"[yellow]parser:[/] {escape(warning)}")
    if verdict.valid:
        passed = ", ".join(stage["stage"] for stage in verdict.stages)
        console.print(f"[green]valid[/]: {label} passed {passed} in {seconds:.1f} s")
        return
    category = escape(verdict.category or "no category")
    console.print(f"[red]rejected[/] at stage [bold]{verdict.stage}[/] ({category}): {label}")
    console.print(f"  reason: {escape(verdict.reason)}")
    if verdict.line is not None:
        console.print(f"  line:   {verdict.line}")
    if verdict.log_tail.strip() and verdict.stage == Stage.SANDBOX.value:
        console.print("  sandbox log tail:")
        console.print(escape(verdict.log_tail.strip()[-1500:]))
