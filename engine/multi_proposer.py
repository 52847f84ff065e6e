"""Several models behind one proposer, picked per call by weight or by a bandit.

Every model gets its own `OpenAIProposer` (its own endpoint, temperature and
circuit breaker) while the cost ledger and the session's retry budget are
shared, so the limits hold for the run as a whole. `build_llm_proposer` is
the one place that turns a ProposerConfig into a working LLM proposer.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from engine.budget import BudgetLimits, Ledger, PriceTable
from engine.config import ProposerConfig
from engine.openai_proposer import OpenAIProposer, RetryBudget
from engine.proposer import ProposalRequest, Proposer, ProposerReply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One model of a multi-model run.

    Attributes:
        name: model name sent to the endpoint.
        weight: relative chance of being picked by "weighted" selection.
        temperature: sampling temperature; None uses the run's --temperature.
        base_url: endpoint of this model; "" uses the run's --base-url.
        api_key_env: variable holding this endpoint's API key; "" uses the run's.
    """

    name: str
    weight: float = 1.0
    temperature: float | None = None
    base_url: str = ""
    api_key_env: str = ""


def model_specs(config: ProposerConfig) -> list[ModelSpec]:
    """Return the models of a config: its `models` entries, or `model` alone."""
    if not config.models:
        return [ModelSpec(config.model)]
    return [
        ModelSpec(
            name=entry["name"],
            weight=float(entry.get("weight", 1.0)),
            temperature=entry.get("temperature"),
            base_url=entry.get("base_url", ""),
            api_key_env=entry.get("api_key_env", ""),
        )
        for entry in config.models
    ]


def parse_models(text: str) -> list[dict[str, Any]]:
    """Parse "NAME[:WEIGHT],NAME[:WEIGHT],..." into `models` entries.

    A name may contain colons, as Ollama tags such as "llama3.1:8b" do. Only
    a last part that reads as a number is taken as the weight, so a numeric
    tag needs an explicit weight ("model:7:1").
    """
    entries = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, last = item.rpartition(":")
        try:
            weight = float(last) if sep else None
        except ValueError:
            weight = None
        if weight is None or not name:
            entries.append({"name": item, "weight": 1.0})
        else:
            entries.append({"name": name, "weight": weight})
    if not entries:
        raise ValueError(f"--models {text!r} lists no model; expected NAME[:WEIGHT],NAME[:WEIGHT],...")
    return entries


class ModelSelection(Protocol):
    """Picks the model for each request and learns from judged candidates."""

    def choose(self, request: ProposalRequest) -> str: ...

    def observe(self, model: str, improved: bool) -> None: ...


def _request_rng(request: ProposalRequest) -> random.Random:
    # one generator per (seed, generation, attempt), so a resumed run picks
    # the same models as an uninterrupted one
    return random.Random(f"{request.seed}:{request.generation}:{request.attempt}")


class WeightedSelection:
    """Random choice in proportion to the configured weights."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self.names = [spec.name for spec in specs]
        self.weights = [spec.weight for spec in specs]

    def choose(self, request: ProposalRequest) -> str:
        return _request_rng(request).choices(self.names, weights=self.weights)[0]

    def observe(self, model: str, improved: bool) -> None:
        pass


class ThompsonSelection:
    """Thompson sampling over "this model's candidate raised the best fitness".

    Each model has a Beta(1 + improved, 1 + not improved) posterior over its
    chance of improving the best fitness. Each request draws once from every
    posterior and takes the model with the highest draw. Invalid and
    duplicate candidates count as not improved.
    """

    def __init__(self, specs: list[ModelSpec]) -> None:
        self.names = [spec.name for spec in specs]
        self.improved = {name: 0 for name in self.names}
        self.not_improved = {name: 0 for name in self.names}

    def choose(self, request: ProposalRequest) -> str:
        rng = _request_rng(request)
        draws = {name: rng.betavariate(1 + self.improved[name], 1 + self.not_improved[name]) for name in self.names}
        chosen = max(self.names, key=lambda name: draws[name])
        logger.debug("bandit draws for generation %d attempt %d: %s; chose %s",
                     request.generation, request.attempt, draws, chosen)
        return chosen

    def observe(self, model: str, improved: bool) -> None:
        if model not in self.improved:
            return
        if improved:
            self.improved[model] += 1
        else:
            self.not_improved[model] += 1

    def counts(self) -> dict[str, tuple[int, int]]:
        """Return (improved, not improved) per model."""
        return {name: (self.improved[name], self.not_improved[name]) for name in self.names}


class MultiProposer(Proposer):
    """Sends each request to one of several models and passes outcomes to the selection."""

    def __init__(self, proposers: Mapping[str, OpenAIProposer], selection: ModelSelection) -> None:
        self.proposers = dict(proposers)
        self.selection = selection
        self.name = "openai:" + "+".join(self.proposers)

    def propose(self, request: ProposalRequest) -> ProposerReply:
        model = self.selection.choose(request)
        logger.debug("generation %d attempt %d goes to model %s", request.generation, request.attempt, model)
        return self.proposers[model].propose(request)

    def observe(self, candidate_model: str, improved: bool) -> None:
        self.selection.observe(candidate_model, improved)


def build_llm_proposer(config: ProposerConfig, totals: Mapping[str, Any] | None = None) -> Proposer:
    """Return the LLM proposer for a config, with a ledger that continues from the archive's totals.

    Raises ValueError (PriceTableError included) when the price table is
    invalid, a cost limit is set for a model without a price, or an API key
    is missing.
    """
    prices = PriceTable.load(config.price_table)
    specs = model_specs(config)
    if config.max_cost_usd:
        unpriced = [spec.name for spec in specs if prices.lookup(spec.name) is None]
        if unpriced:
            raise ValueError(
                f"--max-cost is set but model(s) {unpriced} have no price; add them to a --price-table file "
                f"(known: {sorted(prices.prices)})"
            )
    for spec in specs:
        if prices.lookup(spec.name) is None:
            logger.warning("model %s has no price in the price table; its calls are recorded with cost 0", spec.name)
    ledger = Ledger.from_totals(BudgetLimits(config.max_cost_usd, config.max_run_tokens), totals)
    retry_budget = RetryBudget(config.retry_budget)
    proposers = {}
    for spec in specs:
        model_config = dataclasses.replace(
            config,
            model=spec.name,
            temperature=config.temperature if spec.temperature is None else float(spec.temperature),
            base_url=spec.base_url or config.base_url,
            api_key_env=spec.api_key_env or config.api_key_env,
            models=[],
        )
        proposers[spec.name] = OpenAIProposer(model_config, ledger=ledger, prices=prices, retry_budget=retry_budget)
    if len(proposers) == 1:
        return next(iter(proposers.values()))
    selection = ThompsonSelection(specs) if config.model_selection == "bandit" else WeightedSelection(specs)
    return MultiProposer(proposers, selection)
