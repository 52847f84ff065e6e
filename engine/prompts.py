"""The conversation sent to the proposer, rebuilt from the archive for every request.

The layout follows the DiscoPOP study's discovery loop (Lu et al. 2024,
Algorithm 1): a system prompt describing the task and the reply format, a
first user message listing the seed programs with their measured fitness,
then for each proposal the assistant's reply and a user message with its
fitness or the error that made it invalid. Because the conversation is
derived from the archive, a resumed run sends exactly what an uninterrupted
run would have sent.

Which proposals the conversation shows is a `ContextOptions` choice, after
the study's context ablations: all of them or the top K by fitness, in the
order proposed or sorted by fitness, with or without the model's thoughts,
with or without invalid programs and their errors. With a context window
set, entries are dropped until the prompt and the completion fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

from engine.budget import BudgetExceeded, estimate_prompt_tokens
from engine.candidate import Candidate, Status
from engine.config import ProposerConfig

REPLY_FORMAT = (
    "Reply with one JSON object and nothing else, with three string fields:\n"
    '  "thought": one or two sentences on the idea behind the new program and why it may score higher,\n'
    '  "name": a short snake_case name for it (letters, digits and underscores, at most 64 characters),\n'
    '  "code": the complete Python code: imports at the top, then the function.\n'
    "Write a new program each time; do not repeat one that is already listed."
)

INVALID_PREFIX = "Code not valid. Error:"

# sent after a reply that could not be parsed, in place of "fix the code"
FORMAT_REPAIR = (
    'Reply again with exactly one JSON object with the string fields "thought", "name" and "code", '
    "and no other text."
)


class ContextStrategy(str, Enum):
    """Rule that selects the earlier proposals a request shows."""

    ALL = "all"  # every finished proposal (the study's default)
    TOP_K = "top-k"  # the K best evaluated proposals, then the open repair attempts


class ContextOrder(str, Enum):
    """Order of the shown proposals."""

    CHRONOLOGICAL = "chronological"
    SORTED = "sorted"  # by fitness, worst first and best last, nearest the request


@dataclass(frozen=True)
class ContextOptions:
    """Selection, order and trimming of the earlier proposals a request shows.

    Attributes:
        strategy: all finished proposals, or the top K by fitness.
        top_k: K for the top-k strategy.
        order: chronological, or sorted by fitness with the best last.
        include_invalid: show rejected, timed-out and failed proposals with the
            error sent back. With top-k, only the rejected attempts after the
            last evaluated proposal are shown, so the model can repair them.
        include_thoughts: keep the "thought" field of earlier replies.
        window_tokens: the model's context window; 0 means no trimming.
        reserve_tokens: tokens kept free in the window for the completion.
    """

    strategy: ContextStrategy = ContextStrategy.ALL
    top_k: int = 5
    order: ContextOrder = ContextOrder.CHRONOLOGICAL
    include_invalid: bool = True
    include_thoughts: bool = True
    window_tokens: int = 0
    reserve_tokens: int = 0

    @classmethod
    def from_config(cls, config: ProposerConfig) -> ContextOptions:
        return cls(
            strategy=ContextStrategy(config.context),
            top_k=config.top_k,
            order=ContextOrder(config.context_order),
            include_invalid=config.include_invalid,
            include_thoughts=config.include_thoughts,
            window_tokens=config.context_window,
            reserve_tokens=config.max_tokens if config.context_window else 0,
        )


class ContextTooLarge(BudgetExceeded):
    """Raised when the system prompt and seed programs alone do not fit the context window."""

    exit_code = 2


@dataclass(frozen=True)
class Context:
    """The messages of one request and which proposals they show.

    Attributes:
        messages: the chat messages, system prompt first.
        shown: the proposals shown, in message order.
        dropped: proposals selected by the strategy but left out to fit the window.
    """

    messages: list[dict[str, str]]
    shown: list[Candidate]
    dropped: int = 0


def system_prompt(task_text: str, interface_text: str) -> str:
    return (
        "You are a machine learning researcher who designs new training objectives. "
        "Each program you write is checked, used to train a model and scored; "
        "the score comes back to you so that you can improve on it.\n\n"
        f"{task_text}\n\n{interface_text}\n\n{REPLY_FORMAT}"
    )


def format_fitness(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def seeds_message(seeds: list[Candidate]) -> str:
    lines = ["Here are the programs evaluated so far, with their fitness (higher is better):", ""]
    for seed in seeds:
        lines.append(f"Name: {seed.name}")
        if seed.thought:
            lines.append(f"Idea: {seed.thought}")
        lines.append(f"Fitness: {format_fitness(seed.fitness)}")
        lines.append("Code:")
        lines.append(seed.code.rstrip())
        lines.append("")
    lines.append("Propose the next program.")
    return "\n".join(lines)


def feedback_message(candidate: Candidate) -> str:
    """Return the user message that answers a proposal."""
    if candidate.status is Status.EVALUATED:
        extras = []
        for key in ("reward", "kl", "accuracy"):
            value = candidate.metrics.get(key)
            if isinstance(value, (int, float)):
                extras.append(f"{key} {value:.4f}")
        detail = f" ({', '.join(extras)})" if extras else ""
        return f"Fitness: {format_fitness(candidate.fitness)}{detail}. Propose the next program."
    if candidate.status is Status.DUPLICATE:
        twin = candidate.duplicate_of or "an earlier program"
        return (
            f"This program is equivalent to {twin} (fitness {format_fitness(candidate.fitness)}), "
            "so it was not trained again. Propose a genuinely different program."
        )
    if candidate.stage is not None and candidate.stage.value == "parse":
        return f"{INVALID_PREFIX} {candidate.reason} No code from that reply was run. {FORMAT_REPAIR}"
    return f"{INVALID_PREFIX} {candidate.reason} Please fix it or propose a different program."


def assistant_message(candidate: Candidate, include_thoughts: bool) -> str:
    """Return the assistant turn for an earlier proposal."""
    if candidate.stage is not None and candidate.stage.value == "parse":
        return candidate.reply
    payload = {"thought": candidate.thought if include_thoughts else "", "name": candidate.name, "code": candidate.code}
    if not include_thoughts:
        payload.pop("thought")
    return json.dumps(payload, indent=1)


def build_messages(
    system_text: str,
    seeds: list[Candidate],
    proposals: list[Candidate],
    options: ContextOptions,
) -> list[dict[str, str]]:
    """Return the chat messages for the next request."""
    return build_context(system_text, seeds, proposals, options).messages


def build_context(
    system_text: str,
    seeds: list[Candidate],
    proposals: list[Candidate],
    options: ContextOptions,
) -> Context:
    """Return the next request's messages, trimmed to the context window when one is set."""
    head = [{"role": "system", "content": system_text}, {"role": "user", "content": seeds_message(seeds)}]
    entries = select_entries(proposals, options)
    turns = [entry_messages(candidate, options.include_thoughts) for candidate in entries]

    # drop from the front: the oldest entries in chronological order, the worst in sorted order
    dropped = 0
    if options.window_tokens:
        budget = options.window_tokens - options.reserve_tokens
        head_tokens = estimate_prompt_tokens(head)
        if head_tokens > budget:
            raise ContextTooLarge(
                f"the system prompt and seed programs need about {head_tokens} tokens, more than the "
                f"{options.window_tokens}-token context window leaves after {options.reserve_tokens} completion "
                "tokens; raise --context-window or lower --max-completion-tokens"
            )
        sizes = [estimate_prompt_tokens(turn) for turn in turns]
        total = head_tokens + sum(sizes)
        while turns and total > budget:
            total -= sizes.pop(0)
            turns.pop(0)
            entries = entries[1:]
            dropped += 1

    messages = head + [message for turn in turns for message in turn]
    return Context(messages=messages, shown=list(entries), dropped=dropped)


def entry_messages(candidate: Candidate, include_thoughts: bool) -> list[dict[str, str]]:
    """Return the assistant turn of an earlier proposal and the feedback turn after it."""
    return [
        {"role": "assistant", "content": assistant_message(candidate, include_thoughts)},
        {"role": "user", "content": feedback_message(candidate)},
    ]


def select_entries(proposals: list[Candidate], options: ContextOptions) -> list[Candidate]:
    """Return the finished proposals the strategy shows, in the order they appear."""
    finished = [c for c in proposals if c.status.is_final]
    valid = [c for c in finished if c.status in (Status.EVALUATED, Status.DUPLICATE)]

    if options.strategy is ContextStrategy.TOP_K:
        evaluated = [c for c in finished if c.status is Status.EVALUATED and c.fitness is not None]
        best = sorted(evaluated, key=lambda c: c.fitness, reverse=True)[: options.top_k]
        shown = sorted(best, key=_fitness_key) if options.order is ContextOrder.SORTED else sorted(best, key=_seq)
        if options.include_invalid:
            shown += _open_repairs(finished)
        return shown

    shown = finished if options.include_invalid else valid
    if options.order is ContextOrder.SORTED:
        shown = sorted(shown, key=_fitness_key)
    return shown


def _open_repairs(finished: list[Candidate]) -> list[Candidate]:
    """Return the invalid proposals after the last evaluated one, oldest first."""
    last_evaluated = max((c.seq for c in finished if c.status is Status.EVALUATED), default=-1)
    invalid = (Status.REJECTED, Status.TIMEOUT, Status.FAILED)
    return [c for c in finished if c.seq > last_evaluated and c.status in invalid]


def _seq(candidate: Candidate) -> int:
    return candidate.seq


def _fitness_key(candidate: Candidate) -> tuple[float, int]:
    # unscored proposals (rejected, timed out) sort as the worst; ties keep proposal order
    fitness = candidate.fitness if candidate.fitness is not None else float("-inf")
    return (fitness, candidate.seq)
