"""Proposer backed by any OpenAI-compatible chat-completions endpoint.

A call is retried, with exponential backoff and jitter, after a 429, a 5xx,
a timeout, a connection error, a body that is not valid JSON, and an empty
or cut-off reply (finish_reason "length", or text that `is_empty_or_truncated`
flags). A Retry-After header sets the wait. Three limits end the retries:
the retries of one call, the retries of the whole session (`RetryBudget`)
and the consecutive failures of the endpoint (`CircuitBreaker`). Then the
proposer raises ProposerUnavailable naming the URL and the last error, so
the run stops instead of burning generations. Before each request the
`Ledger` checks the cost and token limits.

Waits use time.sleep, which a Ctrl-C (KeyboardInterrupt) interrupts at once;
tests/engine/test_openai_interrupt.py checks that for a backoff and for a
request in flight. The API key is read from the environment and never
stored or logged.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception

from engine.budget import BudgetExceeded, Ledger, PriceTable
from engine.config import ProposerConfig
from engine.proposer import ProposalRequest, Proposer, ProposerReply, ProposerStopped
from engine.reply import is_empty_or_truncated

logger = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"


class ProposerUnavailable(ProposerStopped):
    """Raised when the endpoint keeps failing or rejects the request; the message names the URL and the error."""


class EmptyReply(RuntimeError):
    """Raised when the model returned no text or a reply cut off at the token limit."""


class MalformedResponse(RuntimeError):
    """Raised when a response body is not a decodable chat completion."""


class RetryBudget:
    """Retries left for the whole session, shared by every model's client."""

    def __init__(self, retries: int) -> None:
        self.limit = retries
        self.remaining = retries

    def take(self) -> None:
        self.remaining = max(0, self.remaining - 1)


class CircuitBreaker:
    """Counts consecutive endpoint failures across calls; open once the threshold is reached."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.failures = 0

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold

    def record(self, endpoint_failed: bool) -> None:
        self.failures = self.failures + 1 if endpoint_failed else 0


@dataclass
class _CallStats:
    """Usage of one call so far, all its requests together."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def usage(self, model: str, temperature: float) -> ProposerReply:
        return ProposerReply(
            text="",
            model=model,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            latency_s=time.monotonic() - self.started,
            retries=max(0, self.requests - 1),
            cost_usd=self.cost_usd,
            requests=self.requests,
            temperature=temperature,
            retry_errors=tuple(self.errors),
        )


def is_retryable(error: BaseException) -> bool:
    """Return whether a failed request is worth sending again."""
    if isinstance(error, (openai.APIConnectionError, EmptyReply, MalformedResponse)):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    return False


def is_endpoint_failure(error: BaseException) -> bool:
    """Return whether a failure means the endpoint is down, rather than busy (429) or sending bad replies."""
    if isinstance(error, (openai.APIConnectionError, MalformedResponse)):
        return True
    return isinstance(error, openai.APIStatusError) and error.status_code >= 500


def retry_after_s(error: BaseException | None) -> float | None:
    """Return the wait a 429 or 503 response asked for, from retry-after-ms or Retry-After."""
    if not isinstance(error, openai.APIStatusError) or error.response is None:
        return None
    headers = error.response.headers
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    # the HTTP-date form, such as "Wed, 21 Oct 2015 07:28:00 GMT"
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def describe(error: BaseException, timeout_s: float | None = None) -> str:
    """Return a one-line description of a failed request, with the HTTP status where there is one."""
    if isinstance(error, openai.APIStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        message = body.get("message") or error.message
        return f"HTTP {error.status_code}: {str(message)[:200]}"
    if isinstance(error, openai.APITimeoutError):
        return f"timed out after {timeout_s:g} s" if timeout_s else "timed out"
    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__
        detail = f" ({type(cause).__name__}: {str(cause)[:160]})" if cause is not None else ""
        return f"connection failed{detail}"
    return f"{type(error).__name__}: {str(error)[:200]}"


class OpenAIProposer(Proposer):
    """Sends the conversation to one model at a chat-completions endpoint and returns the reply text."""

    def __init__(
        self,
        config: ProposerConfig,
        ledger: Ledger | None = None,
        prices: PriceTable | None = None,
        retry_budget: RetryBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        api_key = os.environ.get(config.api_key_env, "")
        if not api_key and not config.base_url:
            raise ValueError(
                f"no API key: set the environment variable {config.api_key_env} or pass --base-url "
                "for a local server that needs none"
            )
        self.config = config
        self.name = f"openai:{config.model}"
        self.url = config.base_url or OPENAI_URL
        self.ledger = ledger or Ledger()
        self.price = (prices or PriceTable()).lookup(config.model)
        self.retry_budget = retry_budget or RetryBudget(config.retry_budget)
        self.breaker = CircuitBreaker(config.circuit_breaker)
        self._sleep = sleep
        self._rng = random.Random()
        self._client = openai.OpenAI(
            api_key=api_key or "not-needed",
            base_url=config.base_url or None,
            timeout=config.timeout_s,
            max_retries=0,
        )

    def propose(self, request: ProposalRequest) -> ProposerReply:
        stats = _CallStats()
        retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            stop=self._should_stop,
            wait=self._wait,
            before_sleep=lambda state: self._before_retry(state, request, stats),
            sleep=self._sleep,
            reraise=True,
        )
        # NOTE: a call ended by Ctrl-C raises KeyboardInterrupt past this point, so the
        # tokens of its finished requests never reach the archive.
        try:
            response = retrying(self._request, request.messages, stats)
        except ProposerStopped as stopped:
            stopped.usage = stats.usage(self.config.model, self.config.temperature) if stats.requests else None
            raise
        except (openai.APIError, EmptyReply, MalformedResponse) as error:
            raise ProposerUnavailable(self._failure_message(error, stats), stats.usage(
                self.config.model, self.config.temperature)) from None

        usage = stats.usage(self.config.model, self.config.temperature)
        return ProposerReply(
            text=response.choices[0].message.content or "",
            model=self.config.model,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            latency_s=usage.latency_s,
            retries=usage.retries,
            cost_usd=usage.cost_usd,
            requests=usage.requests,
            served_model=response.model or "",
            temperature=self.config.temperature,
            retry_errors=usage.retry_errors,
        )

    # one request

    def _request(self, messages: list[dict[str, str]], stats: _CallStats):
        prompt_estimate = self.ledger.estimate_prompt(messages)
        self.ledger.check(self.config.model, self.price, prompt_estimate, self.config.max_tokens)
        stats.requests += 1
        try:
            response = self._client.chat.completions.create(
                model=self.config.model,
                messages=messages,
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
            )
        except (json.JSONDecodeError, openai.APIResponseValidationError) as error:
            self._fail(stats, MalformedResponse(f"the response body is not a valid chat completion ({error})"))
        except openai.APIError as error:
            self._fail(stats, error)

        # every reply that arrived is billed, including the empty and cut-off ones retried below
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = self.price.cost(prompt_tokens, completion_tokens) if self.price else 0.0
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        stats.cost_usd += cost
        prompt_chars = sum(len(m.get("content") or "") for m in messages)
        self.ledger.add(prompt_tokens, completion_tokens, cost, prompt_chars)

        choices = getattr(response, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            self._fail(stats, MalformedResponse("the response has no choices"))
        choice = choices[0]
        text = choice.message.content or ""
        if choice.finish_reason == "length":
            self._fail(stats, EmptyReply(f"the reply was cut off at the {self.config.max_tokens}-token limit"))
        if not text.strip():
            self._fail(stats, EmptyReply("the reply was empty"))
        if is_empty_or_truncated(text):
            self._fail(stats, EmptyReply("the reply stopped before its JSON object or code block was closed"))
        self.breaker.record(endpoint_failed=False)
        return response

    def _fail(self, stats: _CallStats, error: BaseException) -> None:
        stats.errors.append(describe(error, self.config.timeout_s))
        self.breaker.record(endpoint_failed=is_endpoint_failure(error))
        raise error

    # retry policy

    def _should_stop(self, state: RetryCallState) -> bool:
        return (
            state.attempt_number > self.config.max_retries
            or self.breaker.is_open
            or self.retry_budget.remaining <= 0
        )

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        hinted = retry_after_s(error)
        if hinted is not None:
            return min(hinted, self.config.retry_max_s)
        exponential = self.config.retry_base_s * (2 ** (state.attempt_number - 1))
        return min(self.config.retry_max_s, exponential * (0.5 + self._rng.random()))

    def _before_retry(self, state: RetryCallState, request: ProposalRequest, stats: _CallStats) -> None:
        self.retry_budget.take()
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.info(
            "LLM request %d for generation %d attempt %d to %s (model %s) failed: %s; retrying in %.2f s "
            "(%d session retries left)",
            stats.requests,
            request.generation,
            request.attempt,
            self.url,
            self.config.model,
            stats.errors[-1] if stats.errors else "unknown error",
            wait,
            self.retry_budget.remaining,
        )

    def _failure_message(self, error: BaseException, stats: _CallStats) -> str:
        last = describe(error, self.config.timeout_s)
        where = f"the LLM endpoint {self.url} (model {self.config.model})"
        if not is_retryable(error):
            return (
                f"{where} rejected the request: {last}. Check the URL, the model name and the API key "
                f"(variable {self.config.api_key_env})."
            )
        if self.breaker.is_open:
            why = f"{self.breaker.failures} consecutive requests failed (circuit breaker, --circuit-breaker)"
        elif self.retry_budget.remaining <= 0:
            why = f"the session's {self.retry_budget.limit} retries are spent (--retry-budget)"
        else:
            why = f"the call's {self.config.max_retries} retries are spent (--max-retries)"
        hint = "Check that the server is running and reachable"
        if isinstance(error, EmptyReply):
            hint = "Raise --max-completion-tokens or ask for shorter code"
        return f"{where} failed after {stats.requests} request(s), because {why}. Last error: {last}. {hint}."


__all__ = [
    "BudgetExceeded",
    "CircuitBreaker",
    "EmptyReply",
    "MalformedResponse",
    "OpenAIProposer",
    "ProposerUnavailable",
    "RetryBudget",
    "describe",
    "is_retryable",
    "retry_after_s",
]
