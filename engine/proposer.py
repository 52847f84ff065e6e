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
        model: the model or generator that wrote it, as configured; this is
            the name the loop reports back through `Proposer.observe`.
        prompt_tokens: tokens sent over all requests of the call, 0 when not metered.
        completion_tokens: tokens received over all requests of the call,
            including cut-off replies that were retried; 0 when not metered.
        latency_s: wall-clock seconds the call took, retries included.
        retries: requests retried after a transport fault or an empty or cut-off reply.
        cost_usd: price of those tokens in US dollars, 0 when not priced.
        requests: HTTP requests sent for this reply (1 + retries for an endpoint).
        served_model: the model name the endpoint reported, "" when unknown.
        temperature: the sampling temperature used, None when not applicable.
        retry_errors: one short description per failed request, in order.
    """

    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    retries: int = 0
    cost_usd: float = 0.0
    requests: int = 1
    served_model: str = ""
    temperature: float | None = None
    retry_errors: tuple[str, ...] = ()


class ProposerStopped(RuntimeError):
    """Raised when no further request may be sent, so the run stops and can be resumed.

    `usage` is what the failed call had already spent (tokens of cut-off
    replies, requests sent), so the archive can account for it; None when
    no request was sent.
    """

    exit_code = 1

    def __init__(self, message: str, usage: ProposerReply | None = None) -> None:
        super().__init__(message)
        self.usage = usage


class Proposer(abc.ABC):
    """Writes the next candidate program as reply text."""

    name: str

    @abc.abstractmethod
    def propose(self, request: ProposalRequest) -> ProposerReply:
        """Return the reply text for one request."""

    def observe(self, candidate_model: str, improved: bool) -> None:
        """Learn the outcome of a judged candidate written by `candidate_model`.

        `improved` is True when the candidate was evaluated with a fitness
        above the best fitness before it. The default ignores outcomes.
        """
