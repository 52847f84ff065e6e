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
    return Path(base).expanduser().absolute()


@dataclass(frozen=True)
class ProposerConfig:
    """Which model writes candidates, what it may spend and what it is shown.

    Attributes:
        kind: "offline" (the built-in generator, no network) or "openai" (any
            OpenAI-compatible chat endpoint). "auto" picks openai when a base URL
            or the API key variable is set, else offline.
        model: model name sent to the endpoint when `models` is empty.
        base_url: endpoint URL, for example http://127.0.0.1:8000/v1; empty for OpenAI's default.
        api_key_env: name of the environment variable holding the API key; the
            key itself is never stored in the config or the archive.
        temperature: sampling temperature, for every model without its own.
        max_tokens: completion token limit per call.
        timeout_s: seconds to wait for one HTTP response.
        max_retries: retries per call on 429, 5xx, timeouts, connection errors,
            malformed bodies and empty or cut-off replies.
        retry_budget: retries allowed over one session (one `evolve` process),
            across all calls; when they are spent the next failure stops the run.
        circuit_breaker: consecutive failed requests to one endpoint (connection
            errors, timeouts, 5xx, malformed bodies) that stop the run.
        retry_base_s: first backoff wait in seconds; it doubles per retry, with jitter.
        retry_max_s: longest backoff wait in seconds, also the cap on Retry-After.
        max_cost_usd: stop before a call that could take the run's LLM cost
            above this many US dollars; 0 means no limit.
        max_run_tokens: stop before a call that could take the run's prompt plus
            completion tokens above this; 0 means no limit.
        price_table: TOML or JSON file of model prices in USD per million
            tokens, added to the built-in table; empty for the built-in table only.
        models: several models to sample from, each a table with "name" and
            optional "weight" (default 1), "temperature", "base_url" and
            "api_key_env"; empty to use `model` alone.
        model_selection: how a model is picked per call when there are several:
            "weighted" (random by weight) or "bandit" (Thompson sampling on
            whether a model's candidates raised the best fitness).
        context: which earlier proposals the prompt shows: "all" or "top-k".
        top_k: how many of the best evaluated proposals "top-k" shows.
        context_order: "chronological" (as proposed) or "sorted" (by fitness,
            best last).
        include_thoughts: show the "thought" of earlier replies.
        include_invalid: show rejected proposals with the error sent back.
        context_window: the model's context window in tokens; earlier proposals
            are dropped (oldest or worst first) until the prompt plus
            `max_tokens` fits. 0 means no trimming.
    """

    kind: str = "auto"
    model: str = "gpt-4o-mini"
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 1.0
    max_tokens: int = 2048
    timeout_s: float = 120.0
    max_retries: int = 6
    retry_budget: int = 30
    circuit_breaker: int = 4
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    max_cost_usd: float = 0.0
    max_run_tokens: int = 0
    price_table: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)
    model_selection: str = "weighted"
    context: str = "all"
    top_k: int = 5
    context_order: str = "chronological"
    include_thoughts: bool = True
    include_invalid: bool = True
    context_window: int = 0

    def problems(self) -> list[str]:
        """Return one line per invalid value, empty when all are valid."""
        found = []
        if self.kind not in ("auto", "offline", "openai"):
            found.append(f"proposer.kind = {self.kind!r}: expected auto, offline or openai")
        if not 0.0 <= self.temperature <= 2.0:
            found.append(f"proposer.temperature = {self.temperature}: expected 0 to 2")
        for name in ("max_retries", "retry_budget", "max_run_tokens", "context_window"):
            if getattr(self, name) < 0:
                found.append(f"proposer.{name} = {getattr(self, name)}: expected 0 or more")
        for name in ("max_tokens", "circuit_breaker", "top_k"):
            if getattr(self, name) < 1:
                found.append(f"proposer.{name} = {getattr(self, name)}: expected 1 or more")
        for name in ("timeout_s", "retry_max_s"):
            if getattr(self, name) <= 0:
                found.append(f"proposer.{name} = {getattr(self, name)}: expected a positive number of seconds")
        if self.retry_base_s < 0:
            found.append(f"proposer.retry_base_s = {self.retry_base_s}: expected 0 or more seconds")
        if self.max_cost_usd < 0:
            found.append(f"proposer.max_cost_usd = {self.max_cost_usd}: expected 0 (no limit) or more US dollars")
        if self.context_window and self.context_window <= self.max_tokens:
            found.append(
                f"proposer.context_window = {self.context_window}: expected more than max_tokens = {self.max_tokens}, "
                "because the completion must fit in the window too"
            )
        if self.model_selection not in ("weighted", "bandit"):
            found.append(f"proposer.model_selection = {self.model_selection!r}: expected weighted or bandit")
        if self.context not in ("all", "top-k"):
            found.append(f"proposer.context = {self.context!r}: expected all or top-k")
        if self.context_order not in ("chronological", "sorted"):
            found.append(f"proposer.context_order = {self.context_order!r}: expected chronological or sorted")
        found.extend(self._model_problems())
        return found

    def _model_problems(self) -> list[str]:
        if not isinstance(self.models, list):
            return [f"proposer.models = {self.models!r}: expected a list of tables with a name"]
        found = []
        known = {"name", "weight", "temperature", "base_url", "api_key_env"}
        names = []
        for index, entry in enumerate(self.models):
            where = f"proposer.models[{index}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
                found.append(f"{where} = {entry!r}: expected a table with a non-empty string \"name\"")
                continue
            names.append(entry["name"])
            unknown = sorted(set(entry) - known)
            if unknown:
                found.append(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                found.append(f"{where}.weight = {weight!r}: expected a positive number")
            temperature = entry.get("temperature")
            if temperature is not None and (
                isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2
            ):
                found.append(f"{where}.temperature = {temperature!r}: expected 0 to 2")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            found.append(f"proposer.models: model(s) {repeated} listed more than once; list each model once")
        return found


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
        warm_start: process backend only: fork each job from a warm worker that
            has imported torch and the task's modules once, in the same sandbox,
            instead of starting a fresh interpreter per job (saves 1 to 5 s a job).
        executor: where jobs are started: "local" (child processes or containers
            of the engine) or "ray" (one Ray task per job on the cluster at
            `ray_address`, each in the node's `backend` sandbox).
        ray_address: the Ray cluster's address HOST:PORT, or "auto" for the
            cluster that `ray start` started on this machine (or RAY_ADDRESS).
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
    warm_start: bool = True
    executor: str = "local"
    ray_address: str = "auto"


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run.

    Attributes:
        task: registered task name.
        preset: the task's settings preset.
        settings: overrides of single preset settings, such as {"beta": 0.1}.
        generations: number of generations; each yields one judged candidate.
        max_attempts: proposals per generation and population slot before giving
            up on the slot, counting invalid replies that were resampled.
        population: candidates evaluated per generation; the study used 1.
        workers: candidates judged at the same time, each in its own sandbox job.
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
    population: int = 1
    workers: int = 1
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
        for name in ("population", "workers"):
            if getattr(self, name) < 1:
                problems.append(f"{name} = {getattr(self, name)}: expected 1 or more")
        if self.max_attempts < 1:
            problems.append(f"max_attempts = {self.max_attempts}: expected 1 or more")
        if self.time_budget_min < 0:
            problems.append(f"time_budget_min = {self.time_budget_min}: expected 0 (no limit) or more")
        problems.extend(self.proposer.problems())
        if self.sandbox.backend not in ("auto", "process", "docker"):
            problems.append(f"sandbox.backend = {self.sandbox.backend!r}: expected auto, process or docker")
        if self.sandbox.executor not in ("local", "ray"):
            problems.append(f"sandbox.executor = {self.sandbox.executor!r}: expected local or ray")
        if self.sandbox.executor == "ray" and not self.sandbox.ray_address.strip():
            problems.append("sandbox.ray_address is empty: expected HOST:PORT of the Ray cluster, or auto")
        for name in ("unit_test_timeout_s", "train_timeout_s", "cpus"):
            if getattr(self.sandbox, name) <= 0:
                problems.append(f"sandbox.{name} = {getattr(self.sandbox, name)}: expected a positive number")
        for name in ("unit_test_memory_mb", "train_memory_mb"):
            if getattr(self.sandbox, name) < 256:
                problems.append(f"sandbox.{name} = {getattr(self.sandbox, name)}: expected at least 256 MiB")
        if problems:
            raise ConfigError(problems)

    def resolved_cache_dir(self) -> Path:
        # absolute, because sandbox workers run in their job directory
        return (Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()).absolute()

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
            hint = " (true or false)" if expected == "bool" else ""
            problems.append(f"{where}: {key} = {value!r} has type {type(value).__name__}, expected {expected}{hint}")
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
