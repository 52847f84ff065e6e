"""Context strategies: which earlier proposals a request shows, in which order, trimmed to a window."""

from __future__ import annotations

import json

import pytest

from engine.budget import estimate_prompt_tokens
from engine.candidate import Candidate, Origin, Status
from engine.config import ProposerConfig
from engine.prompts import (
    FORMAT_REPAIR,
    INVALID_PREFIX,
    ContextOptions,
    ContextOrder,
    ContextStrategy,
    ContextTooLarge,
    build_context,
    entry_messages,
    feedback_message,
    select_entries,
)
from sandbox.protocol import Stage

SYSTEM = "system prompt"


def make(name, seq, status, fitness=None, stage=None, origin=Origin.PROPOSER):
    candidate = Candidate(
        id=f"c-{name}",
        generation=seq,
        attempt=1,
        origin=origin,
        name=name,
        code=f"def {name}(self, x):\n    return x\n",
        thought=f"idea {name}",
        status=status,
        stage=stage,
        fitness=fitness,
        reason=f"{name} failed" if status is Status.REJECTED else "",
        reply=f"not json from {name}",
    )
    candidate.seq = seq
    return candidate


SEEDS = [make("dpo", 1, Status.EVALUATED, 0.5, origin=Origin.SEED), make("hinge", 2, Status.EVALUATED, 0.4, origin=Origin.SEED)]
PROPOSALS = [
    make("a", 3, Status.EVALUATED, 0.6),
    make("b", 4, Status.REJECTED, stage=Stage.STATIC),
    make("c", 5, Status.EVALUATED, 0.8),
    make("d", 6, Status.DUPLICATE, 0.6),
    make("e", 7, Status.EVALUATED, 0.7),
    make("f", 8, Status.REJECTED, stage=Stage.PARSE),
    make("g", 9, Status.PENDING),
]


def names(options: ContextOptions) -> list[str]:
    return [c.name for c in select_entries(PROPOSALS, options)]


def test_all_chronological_shows_every_finished_proposal():
    assert names(ContextOptions()) == ["a", "b", "c", "d", "e", "f"]


def test_all_without_invalid():
    assert names(ContextOptions(include_invalid=False)) == ["a", "c", "d", "e"]


def test_all_sorted_puts_best_last():
    # unscored b and f sort as worst (in proposal order), then 0.6 (a before d), 0.7, 0.8
    assert names(ContextOptions(order=ContextOrder.SORTED)) == ["b", "f", "a", "d", "e", "c"]


def test_top_k_chronological_keeps_open_repairs():
    # the two best are c (0.8) and e (0.7); f was rejected after e, the last evaluated proposal
    options = ContextOptions(strategy=ContextStrategy.TOP_K, top_k=2)
    assert names(options) == ["c", "e", "f"]


def test_top_k_sorted():
    options = ContextOptions(strategy=ContextStrategy.TOP_K, top_k=2, order=ContextOrder.SORTED)
    assert names(options) == ["e", "c", "f"]


def test_top_k_without_invalid():
    options = ContextOptions(strategy=ContextStrategy.TOP_K, top_k=3, include_invalid=False)
    assert names(options) == ["a", "c", "e"]


def test_messages_alternate_replies_and_feedback():
    context = build_context(SYSTEM, SEEDS, PROPOSALS, ContextOptions())
    roles = [m["role"] for m in context.messages]
    assert roles == ["system", "user"] + ["assistant", "user"] * 6
    assert context.messages[0]["content"] == SYSTEM
    assert "Name: dpo" in context.messages[1]["content"]
    assert json.loads(context.messages[2]["content"])["thought"] == "idea a"
    assert context.messages[3]["content"].startswith("Fitness: 0.6000")
    assert context.dropped == 0


def test_no_thoughts_removes_the_field():
    context = build_context(SYSTEM, SEEDS, PROPOSALS, ContextOptions(include_thoughts=False))
    first_reply = json.loads(context.messages[2]["content"])
    assert "thought" not in first_reply
    assert first_reply["name"] == "a"


def test_parse_rejection_gets_format_repair_message():
    unparsed = PROPOSALS[5]
    message = feedback_message(unparsed)
    assert message.startswith(INVALID_PREFIX)
    assert "f failed" in message
    assert "No code from that reply was run" in message
    assert message.endswith(FORMAT_REPAIR)
    # the raw reply is shown back as the assistant turn
    assert entry_messages(unparsed, True)[0]["content"] == "not json from f"


def test_other_rejections_ask_for_a_fix():
    message = feedback_message(PROPOSALS[1])
    assert message == f"{INVALID_PREFIX} b failed Please fix it or propose a different program."


def test_window_drops_oldest_first():
    head_tokens = estimate_prompt_tokens(build_context(SYSTEM, SEEDS, [], ContextOptions()).messages)
    shown = select_entries(PROPOSALS, ContextOptions())
    last_two = sum(estimate_prompt_tokens(entry_messages(c, True)) for c in shown[-2:])
    # room for the system prompt, the seeds and exactly the two newest entries, plus 100 completion tokens
    window = head_tokens + last_two + 100
    options = ContextOptions(window_tokens=window, reserve_tokens=100)
    context = build_context(SYSTEM, SEEDS, PROPOSALS, options)
    assert [c.name for c in context.shown] == ["e", "f"]
    assert context.dropped == 4
    assert estimate_prompt_tokens(context.messages) <= window - 100


def test_window_drops_worst_first_when_sorted():
    options = ContextOptions(order=ContextOrder.SORTED)
    shown = select_entries(PROPOSALS, options)
    head_tokens = estimate_prompt_tokens(build_context(SYSTEM, SEEDS, [], options).messages)
    best_three = sum(estimate_prompt_tokens(entry_messages(c, True)) for c in shown[-3:])
    trimmed = ContextOptions(order=ContextOrder.SORTED, window_tokens=head_tokens + best_three + 1, reserve_tokens=1)
    context = build_context(SYSTEM, SEEDS, PROPOSALS, trimmed)
    assert [c.name for c in context.shown] == ["d", "e", "c"]


def test_window_too_small_for_seeds_raises():
    with pytest.raises(ContextTooLarge, match="raise --context-window"):
        build_context(SYSTEM, SEEDS, PROPOSALS, ContextOptions(window_tokens=200, reserve_tokens=150))


def test_options_from_config():
    config = ProposerConfig(context="top-k", top_k=3, context_order="sorted", include_thoughts=False,
                            include_invalid=False, context_window=8000, max_tokens=1000)
    options = ContextOptions.from_config(config)
    assert options == ContextOptions(
        strategy=ContextStrategy.TOP_K,
        top_k=3,
        order=ContextOrder.SORTED,
        include_invalid=False,
        include_thoughts=False,
        window_tokens=8000,
        reserve_tokens=1000,
    )
