"""Proposer backed by any OpenAI-compatible chat-completions endpoint.

Transport faults (429, 5xx, timeouts, refused connections) and empty or
cut-off replies are retried with exponential backoff and jitter, honouring a
Retry-After header. When the retries of one call run out, the proposer raises
ProposerUnavailable naming the URL and the last error, so the run stops
instead of burning generations. The API key is read from the environment and
never stored or logged.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import openai
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from engine.config import ProposerConfig
from engine.proposer import ProposalRequest, Proposer, ProposerReply

logger = logging.getLogger(__name__)

_MAX_BACKOFF_S = 60.0


class ProposerUnavailable(RuntimeError):
    """Raised when the endpoint keeps failing after every retry."""


class EmptyReply(RuntimeError):
    """Raised when the model returned no text or stopped at the token limit."""


@dataclass
class _CallStats:
    retries: int = 0
    last_error: str = ""


def _is_retryable(error: BaseException) -> bool:
    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError, EmptyReply)):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    return False


def _retry_after_s(error: BaseException | None) -> float | None:
    if not isinstance(error, openai.APIStatusError):
        return None
    value = error.response.headers.get("retry-after") if error.response is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _describe(error: BaseException) -> str:
    if isinstance(error, openai.APIStatusError):
        return f"HTTP {error.status_code}: {str(error.message)[:200]}"
    return f"{type(error).__name__}: {str(error)[:200]}"


class OpenAIProposer(Proposer):
    """Sends the conversation to a chat-completions endpoint and returns the reply text."""

    def __init__(self, config: ProposerConfig, base_delay_s: float = 1.0) -> None:
        api_key = os.environ.get(config.api_key_env, "")
        if not api_key and not config.base_url:
            raise ValueError(
                f"no API key: set the environment variable {config.api_key_env} or pass --base-url "
                "for a local server that needs none"
            )
        self.config = config
        self.name = f"openai:{config.model}"
        self.url = config.base_url or "https://api.openai.com/v1"
        self._base_delay_s = base_delay_s
        self._client = openai.OpenAI(
            api_key=api_key or "not-needed",
            base_url=config.base_url or None,
            timeout=config.timeout_s,
            max_retries=0,
        )

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        hinted = _retry_after_s(error)
        if hinted is not None:
            return min(hinted, _MAX_BACKOFF_S)
        exponential = self._base_delay_s * (2 ** (state.attempt_number - 1))
        return min(_MAX_BACKOFF_S, exponential * (0.5 + random.random()))

    def propose(self, request: ProposalRequest) -> ProposerReply:
        stats = _CallStats()

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            stats.retries += 1
            stats.last_error = _describe(error) if error else ""
            wait = state.next_action.sleep if state.next_action else 0.0
            logger.info(
                "LLM call for generation %d attempt %d failed (%s); retry %d in %.1f s",
                request.generation,
                request.attempt,
                stats.last_error,
                stats.retries,
                wait,
            )

        retrying = Retrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(self.config.max_retries + 1),
            wait=self._wait,
            before_sleep=log_retry,
            reraise=True,
        )
        start = time.monotonic()
        try:
            response = retrying(self._call, request.messages)
        except (openai.APIError, EmptyReply) as error:
            raise ProposerUnavailable(
                f"the LLM endpoint {self.url} failed after {stats.retries + 1} attempt(s): {_describe(error)}. "
                "Check the URL, the model name and the API key, then resume the run with --resume."
            ) from None
        latency = time.monotonic() - start
        usage = response.usage
        return ProposerReply(
            text=response.choices[0].message.content or "",
            model=response.model or self.config.model,
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            latency_s=latency,
            retries=stats.retries,
        )

    def _call(self, messages: list[dict[str, str]]):
        response = self._client.chat.completions.create(
            model=self.config.model,
            messages=messages,
            temperature=self.config.temperature,
            max_tokens=self.config.max_tokens,
        )
        if not response.choices:
            raise EmptyReply("the reply had no choices")
        choice = response.choices[0]
        text = choice.message.content or ""
        if not text.strip():
            raise EmptyReply("the reply was empty")
        if choice.finish_reason == "length":
            raise EmptyReply(f"the reply was cut off at the {self.config.max_tokens}-token limit")
        return response
