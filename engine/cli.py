"""The `evolve` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from engine.config import ConfigError, config_from_dict, load_config_file, merge

logger = logging.getLogger("engine")
# a wide console when output goes to a file or pipe, so that tables stay readable
console = Console(width=None if sys.stdout.isatty() else 160)

# Each subcommand lives in engine/commands/<name>.py and exposes main(argv) -> exit code.
SUBCOMMANDS = {
    "tasks": "list the registered tasks",
    "check": "run the parse, static and unit-test stages on one candidate file or reply",
    "audit": "rejected candidates of a run, grouped by stage and reason",
    "show": "leaderboard, lineage and totals of a run",
    "plot": "PNG plots of a run: fitness by generation, loss shapes, training curves",
    "export": "write a candidate as a standalone module with a TRL trainer subclass",
    "rerun": "re-evaluate one candidate with the same settings and seed",
    "train": "fine-tune once with a library loss and report its fitness",
    "analyze": "plot a loss and its gradient over rho for a beta sweep",
    "sandbox": "build the sandbox image or check its isolation",
    "heldout": "evaluate a candidate on another task or preset",
}

_EPILOG = """
other commands (evolve COMMAND --help for details):
{commands}

examples:
  evolve --task preference --generations 2
  evolve --resume runs/preference-20261204-101500
  evolve --task preference --proposer openai --model gpt-4o --generations 100
"""


def parse_setting(text: str) -> tuple[str, Any]:
    """Parse KEY=VALUE, reading VALUE as TOML (numbers, booleans, quoted strings) or a plain string."""
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def build_run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evolve",
        description="Evolve training objectives with an LLM; every candidate is checked and run in a sandbox.",
        epilog=_EPILOG.format(
            commands="\n".join(f"  evolve {name:<10} {text}" for name, text in available_commands().items())
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--task", help="task to evolve (default: preference; see `evolve tasks`)")
    run.add_argument("--preset", help="settings preset of the task (default: the task's own, cpu for preference)")
    run.add_argument("--set", dest="settings", action="append", type=parse_setting, default=[], metavar="KEY=VALUE",
                     help="override one task setting, e.g. --set beta=0.1 (repeatable)")
    run.add_argument("--generations", type=int, help="generations to run; each evaluates --population candidates (default: 10)")
    run.add_argument("--max-attempts", type=int, help="proposals per generation before giving up on it (default: 4)")
    run.add_argument("--population", type=int, help="candidates evaluated per generation (default: 1, as the study)")
    run.add_argument("--workers", type=int, help="candidates judged at the same time, one sandbox job each (default: 1)")
    run.add_argument("--seed", type=int, help="random seed of proposer and training (default: 0)")
    run.add_argument("--seeds", dest="seed_group", help="seed programs of the first prompt: baselines or discovered")
    run.add_argument("--time-budget", type=float, metavar="MINUTES",
                     help="start no new generation after this many minutes (default: no limit)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved plan (task settings, study hyperparameters, estimated time) and exit "
                          "without loading models or data")
    run.add_argument("--config", type=Path, help="TOML file with run settings; flags override it")
    run.add_argument("--run-dir", help="directory for the archive and job folders (default: runs/<task>-<time>)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run where it stopped")
    run.add_argument("--cache-dir", help="cache for models, data and baseline fitness (default: ~/.cache/evolve)")

    proposer = parser.add_argument_group("proposer")
    proposer.add_argument("--proposer", choices=("auto", "offline", "openai"),
                          help="who writes candidates: the built-in offline generator or an OpenAI-compatible "
                               "endpoint (default auto: openai when --base-url or the API key is set)")
    models = proposer.add_mutually_exclusive_group()
    models.add_argument("--model", action="append", metavar="NAME",
                        help="model name at the endpoint (default: gpt-4o-mini); repeat it to sample several "
                             "models with equal weight")
    models.add_argument("--models", type=_models_argument, metavar="NAME:WEIGHT,...",
                        help='several models with weights, e.g. "gpt-4o:0.7,claude-sonnet-4:0.3"')
    proposer.add_argument("--model-selection", choices=("weighted", "bandit"),
                          help="how each call picks a model when there are several: random by weight, or a "
                               "Thompson-sampling bandit favouring models whose candidates raise the best "
                               "fitness (default: weighted)")
    proposer.add_argument("--model-temperature", action="append", type=_model_temperature, default=[],
                          metavar="NAME=T", help="sampling temperature of one model given with --model or "
                                                  "--models (repeatable)")
    proposer.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    proposer.add_argument("--api-key-env", help="environment variable holding the API key (default: OPENAI_API_KEY)")
    proposer.add_argument("--temperature", type=float, help="sampling temperature (default: 1.0)")
    proposer.add_argument("--max-completion-tokens", type=int, metavar="N",
                          help="completion token limit of each call (default: 2048)")
    proposer.add_argument("--timeout", type=float, metavar="SECONDS",
                          help="seconds to wait for one HTTP response (default: 120)")
    proposer.add_argument("--max-retries", type=int, metavar="N",
                          help="retries of one call after 429, 5xx, timeouts, connection errors and empty or "
                               "cut-off replies (default: 6)")
    proposer.add_argument("--retry-budget", type=int, metavar="N",
                          help="retries allowed over this session, all calls together (default: 30)")
    proposer.add_argument("--circuit-breaker", type=int, metavar="N",
                          help="stop after N consecutive failed requests to an endpoint: connection errors, timeouts, "
                               "5xx and malformed bodies, not 429 (default: 4)")
    proposer.add_argument("--max-cost", type=float, metavar="USD",
                          help="stop before a call that could take the run's LLM cost above this many US dollars "
                               "(default: no limit)")
    proposer.add_argument("--max-tokens", type=int, metavar="N",
                          help="stop before a call that could take the run's prompt plus completion tokens above "
                               "N (default: no limit)")
    proposer.add_argument("--price-table", type=Path, metavar="FILE",
                          help="TOML or JSON file of model prices in USD per million tokens, added to the "
                               "built-in table (see docs/llm.md)")
    proposer.add_argument("--context", choices=("all", "top-k"),
                          help="earlier proposals shown in the prompt: all of them, or the top K by fitness "
                               "(default: all)")
    proposer.add_argument("--top-k", type=int, metavar="K",
                          help="how many of the best proposals --context top-k shows; implies it (default: 5)")
    proposer.add_argument("--context-order", choices=("chronological", "sorted"),
                          help="order of the shown proposals: as proposed, or by fitness with the best last "
                               "(default: chronological)")
    proposer.add_argument("--no-thoughts", dest="include_thoughts", action="store_false", default=None,
                          help="leave out the thought of earlier replies")
    proposer.add_argument("--no-invalid", dest="include_invalid", action="store_false", default=None,
                          help="leave out invalid proposals and their errors")
    proposer.add_argument("--context-window", type=int, metavar="TOKENS",
                          help="the model's context window; the oldest (or, when sorted, the worst) proposals "
                               "are left out until the prompt and the completion fit (default: no trimming)")

    sandbox = parser.add_argument_group("sandbox")
    sandbox.add_argument("--sandbox", choices=("auto", "process", "docker"),
                         help="where candidate code runs (default auto: docker when the Docker engine responds and the image exists)")
    sandbox.add_argument("--unit-test-timeout", type=float, metavar="SECONDS",
                         help="wall-clock limit of the unit-test stage (default: 60)")
    sandbox.add_argument("--train-timeout", type=float, metavar="SECONDS",
                         help="wall-clock limit of one fine-tune plus scoring (default: 900)")
    sandbox.add_argument("--gpu", action="store_true", default=None, help="give each evaluation one GPU (docker only)")
    sandbox.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=None,
                         help="process sandbox: fork each job from a worker that has imported torch and the "
                              "task's modules once (default); --no-warm-start starts a fresh interpreter per job")
    sandbox.add_argument("--executor", choices=("local", "ray"),
                         help="where jobs start: local child processes or containers, or one Ray task per job on "
                              "a Ray cluster, in the node's sandbox (default: local)")
    sandbox.add_argument("--ray-address", metavar="HOST:PORT",
                         help="address of the Ray cluster, as `ray start --head` prints it, or auto for the "
                              "cluster started on this machine; implies --executor ray (default: auto)")

    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"),
                        help="level of the run's engine.log (default: INFO)")
    return parser


def _overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    top = {
        "task": args.task,
        "preset": args.preset,
        "generations": args.generations,
        "max_attempts": args.max_attempts,
        "population": args.population,
        "workers": args.workers,
        "seed": args.seed,
        "seed_group": args.seed_group,
        "run_dir": args.run_dir,
        "cache_dir": args.cache_dir,
        "time_budget_min": args.time_budget,
    }
    values: dict[str, Any] = {k: v for k, v in top.items() if v is not None}
    if args.settings:
        values["settings"] = dict(args.settings)
    proposer = {
        "kind": args.proposer,
        "base_url": args.base_url,
        "api_key_env": args.api_key_env,
        "temperature": args.temperature,
        "max_tokens": args.max_completion_tokens,
        "timeout_s": args.timeout,
        "max_retries": args.max_retries,
        "retry_budget": args.retry_budget,
        "circuit_breaker": args.circuit_breaker,
        "max_cost_usd": args.max_cost,
        "max_run_tokens": args.max_tokens,
        "price_table": str(args.price_table.resolve()) if args.price_table else None,
        "model_selection": args.model_selection,
        "context": "top-k" if args.top_k is not None and args.context is None else args.context,
        "top_k": args.top_k,
        "context_order": args.context_order,
        "include_thoughts": args.include_thoughts,
        "include_invalid": args.include_invalid,
        "context_window": args.context_window,
        **_model_overrides(args),
    }
    sandbox = {
        "backend": args.sandbox,
        "unit_test_timeout_s": args.unit_test_timeout,
        "train_timeout_s": args.train_timeout,
        "gpu": args.gpu,
        "warm_start": args.warm_start,
        "executor": "ray" if args.executor is None and args.ray_address is not None else args.executor,
        "ray_address": args.ray_address,
    }
    if any(v is not None for v in proposer.values()):
        values["proposer"] = {k: v for k, v in proposer.items() if v is not None}
    if any(v is not None for v in sandbox.values()):
        values["sandbox"] = {k: v for k, v in sandbox.items() if v is not None}
    return values


def _models_argument(text: str) -> list[dict[str, Any]]:
    from engine.multi_proposer import parse_models

    try:
        return parse_models(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _model_temperature(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    if sep and name:
        try:
            return name, float(value)
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected NAME=TEMPERATURE such as gpt-4o=0.7, got {text!r}")


def _model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Return the model, models and per-model temperature settings of the proposer flags."""
    if args.models is not None:
        entries = [dict(entry) for entry in args.models]
    elif args.model and len(args.model) > 1:
        entries = [{"name": name, "weight": 1.0} for name in args.model]
    else:
        entries = []
    overrides: dict[str, Any] = {}
    if entries:
        overrides["models"] = entries
    elif args.model:
        overrides["model"] = args.model[0]

    temperatures = dict(args.model_temperature)
    unknown = sorted(set(temperatures) - {entry["name"] for entry in entries} - set(args.model or []))
    if unknown:
        raise ConfigError([f"--model-temperature names {unknown}, which are not given with --model or --models"])
    for entry in entries:
        if entry["name"] in temperatures:
            entry["temperature"] = temperatures[entry["name"]]
    if not entries and args.model and args.model[0] in temperatures:
        overrides["temperature"] = temperatures[args.model[0]]
    return overrides


def configure_logging(run_dir: Path | None, level: str) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    from rich.logging import RichHandler

    console_handler = RichHandler(console=console, show_path=False, show_time=False)
    console_handler.setLevel(logging.WARNING)
    root.addHandler(console_handler)
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "engine.log")
        file_handler.setLevel(getattr(logging, level))
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    for noisy in ("httpx", "httpx2", "httpcore", "openai", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_command(argv: list[str]) -> int:
    parser = build_run_parser()
    args = parser.parse_args(argv)

    from engine.runner import RunError
    from engine.session import run_session
    from evaluators.registry import UnknownTaskError
    from sandbox.backend import SandboxUnavailable

    try:
        overrides = _overrides_from_args(args)
        if args.resume is not None:
            if not args.resume.is_dir():
                problem = "is not a directory" if args.resume.exists() else "not found"
                console.print(f"[red]error:[/] run directory {args.resume} {problem}. Pass the directory that "
                              "`evolve` printed when the run started (it contains archive.sqlite)")
                return 2
            return run_session(None, args.resume, overrides, args.log_level, console)
        values = load_config_file(args.config) if args.config else {}
        values = merge(values, overrides)
        config = config_from_dict(values, source=str(args.config) if args.config else "command line")
        if args.dry_run:
            return dry_run(config)
        return run_session(config, None, {}, args.log_level, console)
    except ConfigError as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    except UnknownTaskError as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    except RunError as error:
        console.print(f"[red]error:[/] {error}")
        return 1
    except SandboxUnavailable as error:
        # raised mid-run, for example when a Ray cluster goes away; the running candidates stay unfinished
        console.print(f"[red]error:[/] the sandbox stopped working: {error}")
        console.print("The run can continue with `evolve --resume RUN_DIR` once the sandbox works again.")
        return 1


def dry_run(config) -> int:
    """Print what a run would do, loading no model or data; the study presets print their full plan."""
    import json

    from engine.runner import resolve_settings
    from evaluators.registry import get_task

    if config.task == "preference":
        from evaluators.preference.study import STUDY_PRESETS

        if config.preset in STUDY_PRESETS:
            from evaluators.preference import study

            sets = [f"{key}={json.dumps(value)}" for key, value in config.settings.items()]
            return study.main(["--dry-run", "--preset", config.preset, *[f"--set={item}" for item in sets]])
    task = get_task(config.task)
    settings = resolve_settings(task, config.preset, config.settings)
    console.print(f"task {task.name}, preset {config.preset or task.default_preset}")
    for key, value in task.settings_to_dict(settings).items():
        console.print(f"  {key} = {value!r}")
    console.print(f"generations {config.generations}, population {config.population}, workers {config.workers}, "
                  f"sandbox {config.sandbox.backend} (process warm start {'on' if config.sandbox.warm_start else 'off'}), "
                  f"proposer {config.proposer.kind}")
    return 0


def available_commands() -> dict[str, str]:
    """Return the subcommands whose module is present."""
    import importlib.util

    return {name: text for name, text in SUBCOMMANDS.items() if importlib.util.find_spec(f"engine.commands.{name}")}


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM and SIGHUP like Ctrl-C, so that running sandbox jobs are killed and the run stays resumable."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _interrupt_on_sigterm()
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        module = importlib.import_module(f"engine.commands.{argv[0]}")
        try:
            return module.main(argv[1:])
        except KeyboardInterrupt:
            return 130
    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
