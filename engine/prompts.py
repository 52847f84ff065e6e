"""The conversation sent to the proposer, rebuilt from the archive for every request.

The layout follows the DiscoPOP study's discovery loop (Lu et al. 2024,
Algorithm 1): a system prompt describing the task and the reply format, a
first user message listing the seed programs with their measured fitness,
then for each proposal the assistant's reply and a user message with its
fitness or the error that made it invalid. Because the conversation is
derived from the archive, a resumed run sends exactly what an uninterrupted
run would have sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.candidate import Candidate, Status

REPLY_FORMAT = (
    "Reply with one JSON object and nothing else, with three string fields:\n"
    '  "thought": one or two sentences on the idea behind the new program and why it may score higher,\n'
    '  "name": a short snake_case name for it (letters, digits and underscores, at most 64 characters),\n'
    '  "code": the complete Python code: imports at the top, then the function.\n'
    "Write a new program each time; do not repeat one that is already listed."
)

INVALID_PREFIX = "Code not valid. Error:"


@dataclass(frozen=True)
class ContextOptions:
    """What earlier proposals the conversation shows.

    Attributes:
        include_invalid: show rejected proposals with the error sent back.
        include_thoughts: keep the "thought" field of earlier replies.
        top_k: show only the K best evaluated proposals (0 shows all, in order).
    """

    include_invalid: bool = True
    include_thoughts: bool = True
    top_k: int = 0


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
    messages = [{"role": "system", "content": system_text}, {"role": "user", "content": seeds_message(seeds)}]
    shown = [c for c in proposals if c.status.is_final]
    if not options.include_invalid:
        shown = [c for c in shown if c.status in (Status.EVALUATED, Status.DUPLICATE)]
    if options.top_k > 0:
        evaluated = [c for c in shown if c.status is Status.EVALUATED and c.fitness is not None]
        shown = sorted(evaluated, key=lambda c: c.fitness, reverse=True)[: options.top_k]
    for candidate in shown:
        messages.append({"role": "assistant", "content": assistant_message(candidate, options.include_thoughts)})
        messages.append({"role": "user", "content": feedback_message(candidate)})
    return messages
