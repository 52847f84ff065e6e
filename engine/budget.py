"""Token and cost accounting of LLM calls, with hard limits checked before each request.

The archive's llm_calls table is the durable record. A `Ledger` keeps the
running totals for one process. It starts from the archive's totals, so a
resumed run keeps counting where it stopped, and adds each response's usage
as it arrives. Before every request the ledger compares what is spent plus
an estimate of the next request with the limits, and raises BudgetExceeded
instead of sending a request that could cross one.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from engine.proposer import ProposerReply, ProposerStopped

logger = logging.getLogger(__name__)

# Prompt size estimate when no reply has been metered yet: about four
# characters per token for English text with BPE tokenizers. Code tends to
# need more tokens per character, so the ledger raises the rate to what the
# endpoint actually billed once it has seen a reply.
DEFAULT_TOKENS_PER_CHAR = 0.25

# Tokens a chat template adds around each message (role markers, separators).
# NOTE: this is an estimate; templates differ between models.
MESSAGE_OVERHEAD_TOKENS = 4


class BudgetExceeded(ProposerStopped):
    """Raised before a request that could take the run past --max-cost, --max-tokens or the context window."""

    exit_code = 3


class PriceTableError(ValueError):
    """Raised when a price table file cannot be read; the message names the file and the entry."""


@dataclass(frozen=True)
class Price:
    """List price of one model in US dollars per million tokens."""

    prompt_per_mtok: float
    completion_per_mtok: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Return the cost in US dollars of the given token counts."""
        return (prompt_tokens * self.prompt_per_mtok + completion_tokens * self.completion_per_mtok) / 1_000_000


# NOTE: list prices in USD per million tokens as published by OpenAI and
# Anthropic in 2025. Prices change; pass --price-table for current figures.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "o3-mini": Price(1.10, 4.40),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-sonnet-4": Price(3.00, 15.00),
}


class PriceTable:
    """Model prices: the built-in defaults, overridden and extended by a user file."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self.prices = dict(DEFAULT_PRICES if prices is None else prices)

    @classmethod
    def load(cls, path: str | Path | None) -> PriceTable:
        """Return the built-in table updated with the entries of a TOML or JSON file, if given.

        The file maps model names to tables with `prompt_per_mtok` and
        `completion_per_mtok`, both in US dollars per million tokens.
        """
        table = cls()
        if not path:
            return table
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise PriceTableError(f"price table {path} cannot be read ({error}); pass an existing file to --price-table") from None
        try:
            values = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
            kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
            raise PriceTableError(f"price table {path} is not valid {kind}: {error}") from None
        table.prices.update(_prices_from_values(values, str(path)))
        return table

    def lookup(self, model: str) -> Price | None:
        """Return the price of a model, matching the longest known name that it starts with.

        Dated or tagged names such as "gpt-4o-mini-2024-07-18" match "gpt-4o-mini".
        """
        if model in self.prices:
            return self.prices[model]
        matches = [name for name in self.prices if model.startswith(name)]
        return self.prices[max(matches, key=len)] if matches else None


def _prices_from_values(values: Any, source: str) -> dict[str, Price]:
    if not isinstance(values, dict):
        raise PriceTableError(f"price table {source}: expected a table of models, got {type(values).__name__}")
    prices = {}
    problems = []
    for model, entry in values.items():
        fields = ("prompt_per_mtok", "completion_per_mtok")
        if not isinstance(entry, dict) or set(entry) != set(fields):
            problems.append(f"{model!r} = {entry!r}: expected exactly the keys {list(fields)}")
            continue
        numbers = [entry[name] for name in fields]
        if any(isinstance(n, bool) or not isinstance(n, (int, float)) or n < 0 for n in numbers):
            problems.append(f"{model!r}: expected prices of 0 or more US dollars per million tokens, got {entry!r}")
            continue
        prices[model] = Price(float(numbers[0]), float(numbers[1]))
    if problems:
        raise PriceTableError(f"price table {source} has invalid entries:\n  - " + "\n  - ".join(problems))
    return prices


def estimate_tokens(text: str, tokens_per_char: float = DEFAULT_TOKENS_PER_CHAR) -> int:
    """Return an estimate of the tokens in a text, rounded up."""
    return math.ceil(len(text) * tokens_per_char)


def estimate_prompt_tokens(messages: list[dict[str, str]], tokens_per_char: float = DEFAULT_TOKENS_PER_CHAR) -> int:
    """Return an estimate of the prompt tokens of a chat request."""
    chars = sum(len(message.get("content") or "") for message in messages)
    return math.ceil(chars * tokens_per_char) + MESSAGE_OVERHEAD_TOKENS * len(messages)


@dataclass(frozen=True)
class BudgetLimits:
    """Hard limits on a run's LLM spending.

    Attributes:
        max_cost_usd: US dollars over the whole run; 0 means no limit.
        max_tokens: prompt plus completion tokens over the whole run; 0 means no limit.
    """

    max_cost_usd: float = 0.0
    max_tokens: int = 0


class Ledger:
    """Running totals of the run's LLM tokens and cost, shared by every model's client."""

    def __init__(
        self,
        limits: BudgetLimits = BudgetLimits(),
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost_usd: float = 0.0,
    ) -> None:
        self.limits = limits
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.cost_usd = cost_usd
        self.tokens_per_char = DEFAULT_TOKENS_PER_CHAR

    @classmethod
    def from_totals(cls, limits: BudgetLimits, totals: Mapping[str, Any] | None) -> Ledger:
        """Return a ledger that continues from the archive's `llm_totals()`."""
        totals = totals or {}
        return cls(
            limits,
            prompt_tokens=int(totals.get("prompt_tokens", 0)),
            completion_tokens=int(totals.get("completion_tokens", 0)),
            cost_usd=float(totals.get("cost_usd", 0.0)),
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def estimate_prompt(self, messages: list[dict[str, str]]) -> int:
        """Return the prompt token estimate for a request, at the highest rate billed so far."""
        return estimate_prompt_tokens(messages, self.tokens_per_char)

    def check(self, model: str, price: Price | None, prompt_tokens: int, completion_tokens: int) -> None:
        """Raise BudgetExceeded when a request of this size could cross a limit."""
        limits = self.limits
        if limits.max_tokens and self.total_tokens + prompt_tokens + completion_tokens > limits.max_tokens:
            raise BudgetExceeded(
                f"LLM token budget reached: {self.total_tokens} of the {limits.max_tokens}-token limit "
                f"(--max-tokens) are spent, and the next call to {model} could use up to "
                f"{prompt_tokens + completion_tokens} more (estimate: {prompt_tokens} prompt + "
                f"{completion_tokens} completion tokens), so the run stops before it. "
                "Raise --max-tokens to continue."
            )
        if limits.max_cost_usd and price is not None:
            estimate = price.cost(prompt_tokens, completion_tokens)
            if self.cost_usd + estimate > limits.max_cost_usd:
                raise BudgetExceeded(
                    f"LLM cost budget reached: ${self.cost_usd:.4f} of the ${limits.max_cost_usd:.4f} limit "
                    f"(--max-cost) is spent, and the next call to {model} could cost up to ${estimate:.4f} "
                    f"(estimate: {prompt_tokens} prompt + {completion_tokens} completion tokens), "
                    "so the run stops before it. Raise --max-cost to continue."
                )

    def add(self, prompt_tokens: int, completion_tokens: int, cost_usd: float, prompt_chars: int = 0) -> None:
        """Add one response's usage; `prompt_chars` lets later estimates use the billed rate."""
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost_usd += cost_usd
        if prompt_chars > 0 and prompt_tokens > 0:
            self.tokens_per_char = max(self.tokens_per_char, prompt_tokens / prompt_chars)


def usage_of(reply: ProposerReply | None) -> dict[str, Any]:
    """Return the llm_calls fields of a reply, or of a failed call's partial usage."""
    if reply is None:
        return {}
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "cost_usd": reply.cost_usd,
        "latency_s": reply.latency_s,
        "retries": reply.retries,
        "requests": reply.requests,
        "served_model": reply.served_model,
        "temperature": reply.temperature,
        "retry_errors": json.dumps(list(reply.retry_errors)),
    }
