"""Several models behind one proposer: spec parsing, weighted and bandit selection, shared limits."""

from __future__ import annotations

import json

import pytest

from engine.archive import Archive
from engine.budget import BudgetExceeded
from engine.candidate import Candidate, Origin, Status
from engine.cli import _overrides_from_args, build_run_parser
from engine.config import ConfigError, ProposerConfig, config_from_dict
from engine.loop import Evolution, LoopOptions
from engine.multi_proposer import (
    ModelSpec,
    MultiProposer,
    ThompsonSelection,
    WeightedSelection,
    build_llm_proposer,
    parse_models,
)
from engine.proposer import ProposalRequest, Proposer, ProposerReply
from tests.support.fake_openai_server import FakeOpenAIServer, Reply
from tests.support.toy_task import ToySettings, ToyTask

GOOD = json.dumps({"thought": "t", "name": "n", "code": "def n(self, x):\n    return x\n"})


def request(generation: int, attempt: int = 1, seed: int = 0) -> ProposalRequest:
    return ProposalRequest(messages=[{"role": "user", "content": "go"}], history=[], generation=generation,
                           attempt=attempt, seed=seed)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("gpt-4o:0.7,claude-sonnet-4:0.3", [("gpt-4o", 0.7), ("claude-sonnet-4", 0.3)]),
        ("gpt-4o, gpt-4o-mini", [("gpt-4o", 1.0), ("gpt-4o-mini", 1.0)]),
        ("llama3.1:8b:2,qwen2.5:7b", [("llama3.1:8b", 2.0), ("qwen2.5:7b", 1.0)]),
        ("model:7:1", [("model:7", 1.0)]),
    ],
)
def test_parse_models(text, expected):
    assert [(e["name"], e["weight"]) for e in parse_models(text)] == expected


def test_parse_models_rejects_empty_list():
    with pytest.raises(ValueError, match="lists no model"):
        parse_models(" , ")


def test_weighted_selection_follows_weights():
    selection = WeightedSelection([ModelSpec("a", 0.7), ModelSpec("b", 0.3)])
    picks = [selection.choose(request(generation)) for generation in range(1, 1001)]
    # 1000 draws with p = 0.7: the standard deviation of the count is sqrt(1000 * 0.7 * 0.3) = 14.5
    assert 640 <= picks.count("a") <= 760
    # the same request always picks the same model, so a resumed run repeats its choices
    assert [selection.choose(request(g)) for g in range(1, 51)] == picks[:50]


def test_bandit_favours_improving_model():
    selection = ThompsonSelection([ModelSpec("a"), ModelSpec("b")])
    for _ in range(6):
        selection.observe("a", improved=True)
        selection.observe("b", improved=False)
    selection.observe("unknown-model", improved=True)
    assert selection.counts() == {"a": (6, 0), "b": (0, 6)}
    # posteriors Beta(7, 1) and Beta(1, 7): P(draw b > draw a) = 7 * B(7, 8) = 1/3432, so b is (almost) never chosen
    picks = [selection.choose(request(generation)) for generation in range(1, 201)]
    assert picks.count("a") >= 198


def test_bandit_explores_without_evidence():
    selection = ThompsonSelection([ModelSpec("a"), ModelSpec("b")])
    picks = [selection.choose(request(generation)) for generation in range(1, 201)]
    assert 60 <= picks.count("a") <= 140


def test_models_get_own_temperature_over_http():
    with FakeOpenAIServer([Reply(GOOD)] * 20) as server:
        config = ProposerConfig(
            kind="openai",
            base_url=server.base_url,
            models=[{"name": "cold", "weight": 1.0, "temperature": 0.1}, {"name": "hot", "weight": 1.0}],
            temperature=1.3,
        )
        proposer = build_llm_proposer(config)
        assert isinstance(proposer, MultiProposer)
        replies = [proposer.propose(request(generation)) for generation in range(1, 21)]
        sent = [(r.model, r.temperature) for r in server.requests]
    assert {model for model, _ in sent} == {"cold", "hot"}
    assert all(temperature == (0.1 if model == "cold" else 1.3) for model, temperature in sent)
    # each reply names the configured model that wrote it, in request order
    assert [reply.model for reply in replies] == [model for model, _ in sent]
    assert [reply.temperature for reply in replies] == [temperature for _, temperature in sent]


def test_models_share_one_cost_ledger(tmp_path):
    prices = tmp_path / "prices.toml"
    prices.write_text('[a]\nprompt_per_mtok = 0\ncompletion_per_mtok = 10.0\n\n'
                      '[b]\nprompt_per_mtok = 0\ncompletion_per_mtok = 10.0\n')
    # each reply bills 100 completion tokens at $10/M = $0.001; a call may cost up to 200 tokens = $0.002
    script = [Reply(GOOD, completion_tokens=100)] * 10
    with FakeOpenAIServer(script) as server:
        config = ProposerConfig(kind="openai", base_url=server.base_url, models=[{"name": "a"}, {"name": "b"}],
                                price_table=str(prices), max_cost_usd=0.0045, max_tokens=200)
        proposer = build_llm_proposer(config)
        with pytest.raises(BudgetExceeded):
            for generation in range(1, 11):
                proposer.propose(request(generation))
        # $0.001 per call: after 3 calls 0.003 + 0.002 = 0.005 > 0.0045, so the fourth is never sent
        assert len(server.requests) == 3


def test_single_model_config_builds_plain_proposer():
    config = ProposerConfig(kind="openai", model="only", base_url="http://127.0.0.1:9/v1")
    proposer = build_llm_proposer(config)
    assert not isinstance(proposer, MultiProposer)
    assert proposer.name == "openai:only"


class RecordingProposer(Proposer):
    name = "recording"

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, bool]] = []

    def propose(self, request: ProposalRequest) -> ProposerReply:
        raise AssertionError("not called in this test")

    def observe(self, candidate_model: str, improved: bool) -> None:
        self.outcomes.append((candidate_model, improved))


def test_resume_replays_outcomes_in_order(tmp_path):
    archive = Archive(tmp_path / "archive.sqlite")
    rows = [
        ("seed-dpo", Origin.SEED, "", Status.EVALUATED, 0.50),
        ("g001-a01", Origin.PROPOSER, "a", Status.REJECTED, None),
        ("g001-a02", Origin.PROPOSER, "b", Status.EVALUATED, 0.40),  # below the seed: not improved
        ("g002-a01", Origin.PROPOSER, "a", Status.EVALUATED, 0.60),  # improved
        ("g003-a01", Origin.PROPOSER, "b", Status.DUPLICATE, 0.60),
        ("g004-a01", Origin.PROPOSER, "b", Status.EVALUATED, 0.60),  # equal, not above: not improved
        ("g005-a01", Origin.PROPOSER, "b", Status.EVALUATED, 0.70),  # improved
        ("g006-a01", Origin.PROPOSER, "a", Status.PENDING, None),  # unfinished: not reported
    ]
    for candidate_id, origin, model, status, fitness in rows:
        archive.insert(Candidate(id=candidate_id, generation=0, attempt=1, origin=origin, name=candidate_id,
                                 code="", model=model, status=status, fitness=fitness))
    proposer = RecordingProposer()
    evolution = Evolution(ToyTask(), ToySettings(), archive, pipeline=None, proposer=proposer, reporter=None,
                          options=LoopOptions(generations=0, max_attempts=1, seed=0))
    evolution.replay_outcomes()
    assert proposer.outcomes == [("a", False), ("b", False), ("a", True), ("b", False), ("b", False), ("b", True)]


def test_model_config_errors_reported_together():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"proposer": {
            "models": [{"name": "a", "weight": 0}, {"name": "a", "temperature": 3}, "b", {"name": "c", "colour": 1}],
            "model_selection": "greedy",
        }})
    problems = caught.value.problems
    assert "proposer.models[0].weight = 0: expected a positive number" in problems
    assert "proposer.models[1].temperature = 3: expected 0 to 2" in problems
    assert "proposer.models[2] = 'b': expected a table with a non-empty string \"name\"" in problems
    assert any(p.startswith("proposer.models[3]: unknown key(s) ['colour']") for p in problems)
    assert "proposer.models: model(s) ['a'] listed more than once; list each model once" in problems
    assert "proposer.model_selection = 'greedy': expected weighted or bandit" in problems


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model", "gpt-4o"], {"model": "gpt-4o"}),
        (["--model", "a", "--model", "b", "--model-temperature", "b=0.3"],
         {"models": [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 1.0, "temperature": 0.3}]}),
        (["--models", "a:0.7,b:0.3", "--model-selection", "bandit"],
         {"models": [{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.3}], "model_selection": "bandit"}),
        (["--model", "solo", "--model-temperature", "solo=0.2"], {"model": "solo", "temperature": 0.2}),
        (["--top-k", "3", "--no-thoughts"], {"context": "top-k", "top_k": 3, "include_thoughts": False}),
        (["--max-cost", "2", "--max-tokens", "50000", "--max-completion-tokens", "512"],
         {"max_cost_usd": 2.0, "max_run_tokens": 50000, "max_tokens": 512}),
    ],
)
def test_model_flags_to_config(argv, expected):
    overrides = _overrides_from_args(build_run_parser().parse_args(argv))
    assert overrides == {"proposer": expected}


def test_temperature_for_unlisted_model_is_error():
    args = build_run_parser().parse_args(["--model", "a", "--model-temperature", "z=1.0"])
    with pytest.raises(ConfigError, match=r"--model-temperature names \['z'\]"):
        _overrides_from_args(args)
