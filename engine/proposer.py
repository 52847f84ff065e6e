"""The interface every proposer implements: a request built from the run, a reply as text.

A proposer returns reply text as a language model would, so every proposer's
output goes through the same parser (`engine.reply.parse_reply`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class HistoryEntry:
    """One earlier candidate of the run; a request lists them oldest first.

    Attributes:
        name: the candidate's name.
        code: its source code ("" when the reply could not be parsed).
        fitness: its measured fitness (higher is better), or None when it was
            never evaluated.
        status: its final status value, such as "evaluated", "rejected" or
            "duplicate".
    """

    name: str
    code: str
    fitness: float | None
    status: str


@dataclass(frozen=True)
class ProposalRequest:
    """Everything a proposer may use to write the next candidate.

    Attributes:
        messages: the chat so far (system, user, assistant, ...) as sent to a
            language model, each a dict with "role" and "content".
        history: the run's finished candidates, oldest first.
        generation: the generation being filled, from 1.
        attempt: the attempt within the generation, from 1.
        seed: the run's random seed.
        task: name of the task being evolved.
    """

    messages: list[dict[str, str]]
    history: list[HistoryEntry]
    generation: int
    attempt: int
    seed: int
    task: str = ""


@dataclass(frozen=True)
class ProposerReply:
    """The text a proposer returned and what producing it cost.

    Attributes:
        text: the raw reply, parsed later by `parse_reply`.
        model: the model or generator that wrote it.
        prompt_tokens: tokens sent, 0 when not metered.
        completion_tokens: tokens received, 0 when not metered.
        latency_s: wall-clock seconds the call took.
        retries: transport retries spent on this reply.
    """

    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    retries: int = 0


class Proposer(abc.ABC):
    """Writes the next candidate program as reply text."""

    name: str

    @abc.abstractmethod
    def propose(self, request: ProposalRequest) -> ProposerReply:
        """Return the reply text for one request."""
