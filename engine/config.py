"""Run configuration: frozen dataclasses, loadable from TOML and overridable from the CLI."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Raised with every problem of a configuration at once, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.problems = problems


def default_cache_dir() -> Path:
    """Return the user's cache directory for models, data and baselines."""
    base = os.environ.get("EVOLVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "evolve"
    )
    return Path(base)


@dataclass(frozen=True)
class ProposerConfig:
    """Which model writes candidates.

    Attributes:
        kind: "offline" (the built-in generator, no network) or "openai" (any
            OpenAI-compatible chat endpoint). "auto" picks openai when a base URL
            or the API key variable is set, else offline.
        model: model name sent to the endpoint.
        base_url: endpoint URL, for example http://127.0.0.1:8000/v1; empty for OpenAI's default.
        api_key_env: name of the environment variable holding the API key; the
            key itself is never stored in the config or the archive.
        temperature: sampling temperature.
        max_tokens: completion token limit per call.
        timeout_s: seconds to wait for one HTTP response.
        max_retries: retries per call on 429, 5xx, timeouts and connection errors.
    """

    kind: str = "auto"
    model: str = "gpt-4o-mini"
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 1.0
    max_tokens: int = 2048
    timeout_s: float = 120.0
    max_retries: int = 4


@dataclass(frozen=True)
class SandboxConfig:
    """Where and under which limits candidate code runs.

    Attributes:
        backend: "auto" (docker when a Docker engine and the sandbox image answer,
            else process), "process" or "docker".
        image: Docker image of the sandbox worker.
        unit_test_timeout_s: wall-clock limit of the unit-test stage, in seconds.
        train_timeout_s: wall-clock limit of one fine-tune plus scoring, in seconds.
        unit_test_memory_mb: memory limit of the unit-test stage, in MiB.
        train_memory_mb: memory limit of a fine-tune, in MiB.
        cpus: CPU cores given to each job.
        gpu: request one GPU per evaluation (Docker backend only).
        allow_network: run process-backend jobs even when the network cannot be
            isolated; logged as a warning at start.
    """

    backend: str = "auto"
    image: str = "evolve-sandbox:cpu"
    unit_test_timeout_s: float = 60.0
    train_timeout_s: float = 900.0
    unit_test_memory_mb: int = 4096
    train_memory_mb: int = 12288
    cpus: float = 2.0
    gpu: bool = False
    allow_network: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run.

    Attributes:
        task: registered task name.
        preset: the task's settings preset.
        settings: overrides of single preset settings, such as {"beta": 0.1}.
        generations: number of generations; each yields one judged candidate.
        max_attempts: proposals per generation before giving up on it, counting
            invalid replies that were resampled.
        seed_group: which seed programs open the first prompt.
        seed: random seed of the run (proposer and training).
        time_budget_min: start no new generation after this many minutes; 0 means no limit.
        run_dir: directory holding the archive and job folders.
        cache_dir: directory for cached models, data and baseline fitness.
    """

    task: str = "preference"
    preset: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    generations: int = 10
    max_attempts: int = 4
    seed_group: str = "baselines"
    seed: int = 0
    time_budget_min: float = 0.0
    run_dir: str = ""
    cache_dir: str = ""
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def validate(self) -> None:
        """Raise ConfigError listing every invalid value."""
        problems = []
        if self.generations < 0:
            problems.append(f"generations = {self.generations}: expected 0 or more")
        if self.max_attempts < 1:
            problems.append(f"max_attempts = {self.max_attempts}: expected 1 or more")
        if self.time_budget_min < 0:
            problems.append(f"time_budget_min = {self.time_budget_min}: expected 0 (no limit) or more")
        if self.proposer.kind not in ("auto", "offline", "openai"):
            problems.append(f"proposer.kind = {self.proposer.kind!r}: expected auto, offline or openai")
        if not 0.0 <= self.proposer.temperature <= 2.0:
            problems.append(f"proposer.temperature = {self.proposer.temperature}: expected 0 to 2")
        if self.proposer.max_retries < 0:
            problems.append(f"proposer.max_retries = {self.proposer.max_retries}: expected 0 or more")
        if self.sandbox.backend not in ("auto", "process", "docker"):
            problems.append(f"sandbox.backend = {self.sandbox.backend!r}: expected auto, process or docker")
        for name in ("unit_test_timeout_s", "train_timeout_s", "cpus"):
            if getattr(self.sandbox, name) <= 0:
                problems.append(f"sandbox.{name} = {getattr(self.sandbox, name)}: expected a positive number")
        for name in ("unit_test_memory_mb", "train_memory_mb"):
            if getattr(self.sandbox, name) < 256:
                problems.append(f"sandbox.{name} = {getattr(self.sandbox, name)}: expected at least 256 MiB")
        if problems:
            raise ConfigError(problems)

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"proposer": ProposerConfig, "sandbox": SandboxConfig}


def config_from_dict(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig from nested plain values, reporting every unknown key and bad type."""
    problems: list[str] = []
    top_fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{source}: [{key}] must be a table, got {type(value).__name__}")
                continue
            kwargs[key] = _build_section(_SECTIONS[key], value, f"{source}: {key}", problems)
        elif key in top_fields:
            kwargs[key] = _coerce(key, value, top_fields[key], source, problems)
        else:
            problems.append(f"{source}: unknown key {key!r}; known keys: {sorted(top_fields)}")
    config = RunConfig(**kwargs)
    try:
        config.validate()
    except ConfigError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
    return config


def _build_section(section_class: type, values: dict[str, Any], where: str, problems: list[str]) -> Any:
    known = {f.name: f for f in dataclasses.fields(section_class)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            problems.append(f"{where}: unknown key {key!r}; known keys: {sorted(known)}")
            continue
        kwargs[key] = _coerce(key, value, known[key], where, problems)
    return section_class(**kwargs)


def _coerce(key: str, value: Any, spec: dataclasses.Field, where: str, problems: list[str]) -> Any:
    expected = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
    if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    checks = {"int": int, "float": float, "str": str, "bool": bool}
    if expected in checks:
        wanted = checks[expected]
        if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
            problems.append(f"{where}: {key} = {value!r} has type {type(value).__name__}, expected {expected}")
            return spec.default
    return value


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into plain values, with an error naming the file and line."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([f"config file {path} not found; pass an existing TOML file to --config"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"config file {path} is not valid TOML: {error}"]) from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated with `overrides`, merging nested tables."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
