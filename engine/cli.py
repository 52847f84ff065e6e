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
console = Console()

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
    run.add_argument("--generations", type=int, help="generations to run; each yields one judged candidate (default: 10)")
    run.add_argument("--max-attempts", type=int, help="proposals per generation before giving up on it (default: 4)")
    run.add_argument("--seed", type=int, help="random seed of proposer and training (default: 0)")
    run.add_argument("--seeds", dest="seed_group", help="seed programs of the first prompt: baselines or discovered")
    run.add_argument("--time-budget", type=float, metavar="MINUTES",
                     help="start no new generation after this many minutes (default: no limit)")
    run.add_argument("--config", type=Path, help="TOML file with run settings; flags override it")
    run.add_argument("--run-dir", help="directory for the archive and job folders (default: runs/<task>-<time>)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run where it stopped")
    run.add_argument("--cache-dir", help="cache for models, data and baseline fitness (default: ~/.cache/evolve)")

    proposer = parser.add_argument_group("proposer")
    proposer.add_argument("--proposer", choices=("auto", "offline", "openai"),
                          help="who writes candidates: the built-in offline generator or an OpenAI-compatible "
                               "endpoint (default auto: openai when --base-url or the API key is set)")
    proposer.add_argument("--model", help="model name at the endpoint (default: gpt-4o-mini)")
    proposer.add_argument("--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    proposer.add_argument("--api-key-env", help="environment variable holding the API key (default: OPENAI_API_KEY)")
    proposer.add_argument("--temperature", type=float, help="sampling temperature (default: 1.0)")

    sandbox = parser.add_argument_group("sandbox")
    sandbox.add_argument("--sandbox", choices=("auto", "process", "docker"),
                         help="where candidate code runs (default auto: docker when the engine and image answer)")
    sandbox.add_argument("--unit-test-timeout", type=float, metavar="SECONDS",
                         help="wall-clock limit of the unit-test stage (default: 60)")
    sandbox.add_argument("--train-timeout", type=float, metavar="SECONDS",
                         help="wall-clock limit of one fine-tune plus scoring (default: 900)")
    sandbox.add_argument("--gpu", action="store_true", default=None, help="give each evaluation one GPU (docker only)")

    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"),
                        help="level of the run's engine.log (default: INFO)")
    return parser


def _overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    top = {
        "task": args.task,
        "preset": args.preset,
        "generations": args.generations,
        "max_attempts": args.max_attempts,
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
        "model": args.model,
        "base_url": args.base_url,
        "api_key_env": args.api_key_env,
        "temperature": args.temperature,
    }
    sandbox = {
        "backend": args.sandbox,
        "unit_test_timeout_s": args.unit_test_timeout,
        "train_timeout_s": args.train_timeout,
        "gpu": args.gpu,
    }
    if any(v is not None for v in proposer.values()):
        values["proposer"] = {k: v for k, v in proposer.items() if v is not None}
    if any(v is not None for v in sandbox.values()):
        values["sandbox"] = {k: v for k, v in sandbox.items() if v is not None}
    return values


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
    for noisy in ("httpx", "httpcore", "openai", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_command(argv: list[str]) -> int:
    parser = build_run_parser()
    args = parser.parse_args(argv)

    from engine.runner import RunError
    from engine.session import run_session

    overrides = _overrides_from_args(args)
    try:
        if args.resume is not None:
            return run_session(None, args.resume, overrides, args.log_level, console)
        values = load_config_file(args.config) if args.config else {}
        values = merge(values, overrides)
        config = config_from_dict(values, source=str(args.config) if args.config else "command line")
        return run_session(config, None, {}, args.log_level, console)
    except ConfigError as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    except RunError as error:
        console.print(f"[red]error:[/] {error}")
        return 1


def available_commands() -> dict[str, str]:
    """Return the subcommands whose module is present."""
    import importlib.util

    return {name: text for name, text in SUBCOMMANDS.items() if importlib.util.find_spec(f"engine.commands.{name}")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
