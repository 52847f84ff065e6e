"""`evolve train`: fine-tune once with a library loss or a candidate file and report its fitness.

A library loss runs as its seed program (seeds/preference/<name>.py, or
seeds/preference/as_written/<name>.py for `--form as_written`), through the
same Pipeline as an evolved candidate: static checks, unit tests in the
sandbox, then fine-tune and score in the sandbox. Its fitness is therefore
comparable with the candidates of a run that uses the same task settings and
seed. The candidate is judged in a scratch archive under
CACHE_DIR/train/<name>-<time>/, and it always trains: the baseline cache of
seed programs is neither read nor written. Each result is appended to
CACHE_DIR/train_history.jsonl.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.cli import parse_setting
from engine.console import fmt

console = Console(width=None if sys.stdout.isatty() else 160)

HISTORY_FILE = "train_history.jsonl"
_TIME_METRICS = ("load_s", "train_s", "eval_s")
_HISTORY_SHOWN = 10


@dataclass(frozen=True)
class LossProgram:
    """The code of a loss to train or analyse, and where it came from.

    Attributes:
        name: the canonical library name, or the file's stem.
        code: the program, in the form evolved candidates have.
        source: "library" or "file".
        path: the file the code was read from.
        form: the LossForm value of a library loss ("beta_consistent" or "as_written"); "" for a file.
        title: the loss's name in its source; "" for a file.
        formula: the library formula of that form; "" for a file.
    """

    name: str
    code: str
    source: str
    path: str
    form: str = ""
    title: str = ""
    formula: str = ""

    @property
    def label(self) -> str:
        if self.source == "file":
            return f"{self.name} ({self.path})"
        if not self.form:
            return f"{self.name} ({self.path})"
        return f"{self.name} ({self.title}, {self.form.replace('_', '-')} form)"


def resolve_loss_program(text: str, form: str | None = None, task=None) -> LossProgram:
    """Return the program named by `text`: a .py file, a preference library loss, or a seed of `task`.

    Raises:
        ValueError: for a missing file, `form` given with a file, or an unknown name
            (UnknownLossError, with the closest name and the known ones).
    """
    from evaluators.preference.losses import LossForm, get_loss_spec
    from seeds import SEEDS_DIR, read_seed

    path = Path(text).expanduser()
    if text.endswith(".py") or path.is_file():
        if not path.is_file():
            raise ValueError(f"loss file {text} not found; pass a .py file with one loss function or a library name")
        if form is not None:
            raise ValueError(f"--form {form} applies to library losses only; the file {text} runs as written")
        return LossProgram(path.stem, path.read_text(encoding="utf-8"), "file", str(path))

    if task is not None and task.name != "preference":
        if form is not None:
            raise ValueError(f"--form applies to the preference loss library only, not to task {task.name!r}")
        seeds = {seed.name: seed for seed in task.seeds()}
        if text not in seeds:
            raise ValueError(
                f"unknown loss {text!r} for task {task.name!r}; its seed programs are {', '.join(sorted(seeds))}, "
                "or pass a .py file"
            )
        return LossProgram(text, seeds[text].code, "library", f"seed program of task {task.name}")

    try:
        chosen = LossForm(form or LossForm.BETA_CONSISTENT.value)
    except ValueError:
        raise ValueError(f"unknown --form {form!r}; expected beta_consistent or as_written") from None
    spec = get_loss_spec(text)
    folder = SEEDS_DIR / "preference"
    seed_path = folder / "as_written" / f"{spec.name}.py" if chosen is LossForm.AS_WRITTEN and spec.has_two_forms else None
    seed_path = seed_path or folder / f"{spec.name}.py"
    seed = read_seed(seed_path)
    return LossProgram(
        spec.name, seed.code, "library", str(seed_path), chosen.value, spec.title, spec.forms[chosen].formula
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve train",
        description="Fine-tune once with a library loss (by name or alias, such as dpo, slic, ipo, kto_pair, "
        "lrml or discopop) or a candidate .py file, through the same checks, unit tests and sandboxed "
        "evaluation as an evolved candidate, and report its fitness. Exit status: 0 evaluated, 1 rejected "
        "or failed, 2 usage error.",
    )
    parser.add_argument("--loss", required=True, metavar="NAME|FILE",
                        help="library loss name or alias, or a .py file with one loss function")
    parser.add_argument("--task", default="preference", help="task to train on (default: preference)")
    parser.add_argument("--preset", default="", help="settings preset of the task (default: the task's own, "
                        "cpu for preference; tiny trains 2 steps for tests)")
    parser.add_argument("--set", dest="settings", action="append", type=parse_setting, default=[],
                        metavar="KEY=VALUE", help="override one task setting, e.g. --set beta=0.05 (repeatable)")
    parser.add_argument("--form", choices=("beta_consistent", "as_written"),
                        help="version of a discovered loss: the authors' beta-consistent rewrite, or the code as "
                        "the LLM wrote it during the DiscoPOP search (default: beta_consistent)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0, as a run's default)")
    parser.add_argument("--sandbox", choices=("auto", "process", "docker"), default="auto",
                        help="where the loss code runs (default auto: docker when the Docker engine responds and the sandbox "
                        "image exists, else process)")
    parser.add_argument("--train-timeout", type=float, default=900.0, metavar="SECONDS",
                        help="wall-clock limit of the fine-tune plus scoring job (default: 900, as in a run)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="cache for models, data, job folders and train_history.jsonl (default: ~/.cache/evolve)")
    parser.add_argument("--no-history", action="store_true", help=f"do not append the result to {HISTORY_FILE}")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.train_timeout > 0:
        console.print(f"[red]error:[/] invalid --train-timeout {args.train_timeout}: expected a positive number "
                      "of seconds", soft_wrap=True)
        return 2

    from engine.config import ConfigError, SandboxConfig, default_cache_dir
    from engine.runner import RunError, choose_backend, resolve_settings
    from evaluators.registry import UnknownTaskError, get_task

    try:
        task = get_task(args.task)
        settings = resolve_settings(task, args.preset, dict(args.settings))
        program = resolve_loss_program(args.loss, args.form, task)
    except (UnknownTaskError, ConfigError, ValueError) as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2

    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().resolve()
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", program.name).strip("_") or "loss"
    run_name = f"{slug}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    sandbox = SandboxConfig(backend=args.sandbox, train_timeout_s=args.train_timeout)
    try:
        backend, backend_reason = choose_backend(sandbox, run_name)
    except RunError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 2
    work_dir = new_work_dir(cache_dir / "train", run_name)

    preset = args.preset or task.default_preset
    if not args.json:
        console.print(f"training {escape(program.label)} on task {task.name}, preset {preset}, seed {args.seed}")
        console.print(f"  sandbox: {escape(backend_reason)}")
    try:
        candidate = train_program(program, f"train-{slug}", task, args.task, settings, backend, sandbox, cache_dir,
                                  work_dir, args.seed, show_progress=not args.json)
    except RunError as error:
        console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True)
        return 1

    record = history_record(program, candidate, task, preset, settings, dict(args.settings), args.seed,
                            backend.kind.value, work_dir)
    history_path = cache_dir / HISTORY_FILE
    if not args.no_history:
        append_history(history_path, record)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print_result(record, candidate)
        if not args.no_history:
            print_history(history_path, record)
    return 0 if record["status"] == "evaluated" else 1


def new_work_dir(parent: Path, name: str) -> Path:
    """Create and return parent/name, or parent/name-2, -3 ... when a training started in the same second."""
    parent.mkdir(parents=True, exist_ok=True)
    for index in range(1, 1000):
        path = parent / (name if index == 1 else f"{name}-{index}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a new work directory {parent / name}: 999 of that name exist")


def train_program(program: LossProgram, candidate_id: str, task, task_ref: str, settings, backend, sandbox,
                  cache_dir: Path, work_dir: Path, seed: int, show_progress: bool = True):
    """Prepare the task, then judge the program as a fresh candidate in a scratch archive; return the candidate.

    Raises:
        RunError: when preparing the task's model and data fails.
    """
    from engine.archive import Archive
    from engine.candidate import Candidate, Origin
    from engine.console import RichReporter
    from engine.pipeline import Pipeline
    from engine.runner import pipeline_limits, prepare_task

    work_dir.mkdir(parents=True, exist_ok=True)
    prepare_task(task, settings, cache_dir, work_dir / "jobs" / "prepare", task_ref=task_ref)

    # Marked as a proposal: the pipeline takes a seed program's fitness from the baseline
    # cache instead of training it, and this command always trains.
    candidate = Candidate(id=candidate_id, generation=0, attempt=0, origin=Origin.PROPOSER,
                          name=program.name, code=program.code, thought=program.label)
    reporter = RichReporter(console) if show_progress else None
    archive = Archive(work_dir / "archive.sqlite")
    try:
        archive.insert(candidate)
        pipeline = Pipeline(
            task=task,
            settings=settings,
            backend=backend,
            archive=archive,
            run_dir=work_dir,
            cache_dir=cache_dir,
            limits=pipeline_limits(sandbox),
            seed=seed,
            on_stage=reporter.stage if reporter else None,
            on_progress=reporter.progress if reporter else None,
            task_ref=task_ref,
        )
        if reporter:
            reporter.candidate_started(candidate)
        pipeline.judge(candidate)
    finally:
        if reporter:
            reporter.close()
        archive.close()
    return candidate


def history_record(program: LossProgram, candidate, task, preset: str, settings, overrides: dict[str, Any],
                   seed: int, backend: str, work_dir: Path) -> dict[str, Any]:
    """Return the JSON record of one training: what ran, with which settings, and its outcome."""
    from engine.candidate import Status
    from engine.pipeline import settings_key

    settings_dict = task.settings_to_dict(settings)
    metrics = candidate.metrics
    evaluated = candidate.status is Status.EVALUATED
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "loss": program.name,
        "source": program.source,
        "form": program.form,
        "file": program.path,
        "task": task.name,
        "preset": preset,
        "overrides": overrides,
        # the full settings, because a preset's values may change between versions of evolve
        "settings": settings_dict,
        "settings_key": settings_key(task.name, settings_dict),
        "seed": seed,
        "backend": backend,
        "status": candidate.status.value,
        "stage": candidate.stage.value if candidate.stage else None,
        "reason": candidate.reason,
        "fitness": candidate.fitness if evaluated else None,
        "reward": metrics.get("reward"),
        "kl": metrics.get("kl"),
        "reward_reference": metrics.get("reward_reference"),
        "reward_gain": metrics.get("reward_gain"),
        "steps": metrics.get("steps"),
        "times_s": {
            **{key: round(metrics[key], 2) for key in _TIME_METRICS if isinstance(metrics.get(key), (int, float))},
            **candidate.timings,
        },
        "work_dir": str(work_dir),
    }


def append_history(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line; the log is only ever appended to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def read_history(path: Path) -> list[dict[str, Any]]:
    """Return the records of the log, oldest first, skipping lines that are not JSON objects."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def print_result(record: dict[str, Any], candidate) -> None:
    if record["status"] != "evaluated":
        console.print(f"[red]{record['status']}[/] at stage {record['stage']}: {escape(record['reason'])}",
                      soft_wrap=True)
        if candidate.log_tail.strip():
            console.print("  log tail:")
            console.print(escape(candidate.log_tail.strip()[-1500:]))
        console.print(f"  jobs and logs: {escape(record['work_dir'])}")
        return
    console.print(f"  fitness: [bold]{fmt(record['fitness'])}[/]")
    if record["reward"] is not None:
        gain = record["reward_gain"]
        gain_text = f", gain {gain:+.4f}" if isinstance(gain, (int, float)) else ""
        console.print(f"  reward:  {fmt(record['reward'])} (reference model {fmt(record['reward_reference'])}{gain_text})")
    if record["kl"] is not None:
        console.print(f"  KL:      {fmt(record['kl'], 3)} nats")
    times = record["times_s"]
    parts = [f"{label} {times[key]:.1f} s" for key, label in
             (("unit_test_s", "unit tests"), ("train_s", "training"), ("eval_s", "scoring"),
              ("evaluate_s", "whole evaluation job")) if isinstance(times.get(key), (int, float))]
    console.print(f"  time:    {', '.join(parts)}")
    console.print(f"  jobs and logs: {escape(record['work_dir'])}")


def print_history(path: Path, record: dict[str, Any]) -> None:
    """Print the logged trainings with the same task and settings as `record`, whose fitness is comparable."""
    same = [r for r in read_history(path) if r.get("task") == record["task"]
            and r.get("settings_key") == record["settings_key"]]
    if len(same) < 2:
        return
    table = Table(title=f"trainings with these settings in {path} (last {_HISTORY_SHOWN})", title_justify="left")
    for column in ("time", "loss", "form", "seed", "status", "fitness", "reward", "KL"):
        table.add_column(column)
    for entry in same[-_HISTORY_SHOWN:]:
        table.add_row(str(entry.get("time", "")), str(entry.get("loss", "")), str(entry.get("form") or "file"),
                      str(entry.get("seed", "")), str(entry.get("status", "")), fmt(entry.get("fitness")),
                      fmt(entry.get("reward")), fmt(entry.get("kl"), 3))
    console.print(table)
