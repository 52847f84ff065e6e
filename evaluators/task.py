"""The small API a task plugin implements.

A task defines the function the LLM must write (its interface), which seed
programs start the search, how to unit-test a candidate cheaply and how to
score it with an expensive run. `unit_test`, `prepare` and `evaluate` run
inside a sandbox worker, never in the engine process.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

# A callable that receives one progress event: step, total steps and a message.
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class FunctionInterface:
    """The function a candidate must define.

    Attributes:
        params: positional tensor parameters, in order.
        hyperparameters: values the candidate may read either as `self.<name>`
            (the study's method form) or as a keyword parameter of the same name.
        returns: one-line description of the expected return value, for prompts
            and error messages.
    """

    params: tuple[str, ...]
    hyperparameters: tuple[str, ...] = ()
    returns: str = ""


@dataclass(frozen=True)
class SeedProgram:
    """A known program that starts the search, with the idea behind it."""

    name: str
    thought: str
    code: str


class CandidateRejected(Exception):
    """Raised by a task when a candidate fails a check; the message tells the fix.

    `category` is a short machine-readable kind such as "shape", "nan",
    "dtype_device", "zero_gradient" or "diverged".
    """

    def __init__(self, reason: str, category: str = "", stage: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.category = category
        self.stage = stage


@dataclass
class EvaluationOutcome:
    """Fitness of a candidate (higher is better) and the metrics behind it."""

    fitness: float
    metrics: dict[str, Any] = field(default_factory=dict)


class Task(abc.ABC):
    """Base class of every task plugin."""

    name: ClassVar[str]
    description: ClassVar[str]
    interface: ClassVar[FunctionInterface]
    settings_class: ClassVar[type]
    default_preset: ClassVar[str] = "cpu"
    # Modules the process sandbox's warm worker imports once, before it forks
    # this task's jobs. Trusted project code only; it must not start threads or
    # touch a GPU at import time.
    warm_imports: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def presets(self) -> dict[str, Any]:
        """Return the named settings presets, each an instance of `settings_class`."""

    @abc.abstractmethod
    def prompt_text(self, settings: Any) -> str:
        """Return the task description placed in the LLM's system prompt."""

    @abc.abstractmethod
    def seeds(self, group: str = "baselines") -> list[SeedProgram]:
        """Return the seed programs of `group` whose measured fitness opens the first prompt."""

    def prepare(self, settings: Any, cache_dir: Path, progress: ProgressFn) -> None:
        """Build the cached model and data that every evaluation reads.

        Runs trusted code only, in a child process, before any candidate.
        The default task needs nothing prepared.
        """

    @abc.abstractmethod
    def unit_test(self, candidate: Callable[..., Any], settings: Any) -> dict[str, Any]:
        """Check a loaded candidate on small inputs; raise CandidateRejected on failure.

        Returns metrics worth keeping (for example the probe values used for the
        behavioural fingerprint).
        """

    @abc.abstractmethod
    def evaluate(
        self,
        candidate: Callable[..., Any],
        settings: Any,
        cache_dir: Path,
        work_dir: Path,
        progress: ProgressFn,
        seed: int,
    ) -> EvaluationOutcome:
        """Train with the candidate and score it; raise CandidateRejected on failure."""

    def loss_grammar(self) -> Any:
        """Return the building blocks the offline proposer recombines for this task, or None.

        See `engine.offline_proposer.PreferenceLossGrammar` for the methods a
        grammar provides. A task without one can only be evolved by an LLM,
        unless its interface is the preference interface, whose grammar is built in.
        """
        return None

    def hyperparameter_values(self, settings: Any) -> dict[str, float]:
        """Return the values bound to `interface.hyperparameters` for these settings."""
        return {name: getattr(settings, name) for name in self.interface.hyperparameters}

    def settings_from_dict(self, values: dict[str, Any]) -> Any:
        """Build a settings object from a plain dict, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(self.settings_class)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {unknown} for task {self.name!r}; known settings: {sorted(known)}"
            )
        return self.settings_class(**values)

    def settings_to_dict(self, settings: Any) -> dict[str, Any]:
        return dataclasses.asdict(settings)
