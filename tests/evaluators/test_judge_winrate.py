"""Pairwise win rate against the reference model, with a scripted judge on 127.0.0.1."""

from __future__ import annotations

import math
import re

import pytest

from evaluators.preference.judge import Judge, JudgeClient, JudgeConfig, JudgementCache
from evaluators.preference.mtbench import Answer, Question
from evaluators.preference.winrate import compare_answers, length_controlled_win_rate, policy_positions
from tests.support.fake_judge_server import FakeJudgeServer, user_text
from tests.support.fake_openai_server import Reply


def make_judge(server, tmp_path=None) -> Judge:
    config = JudgeConfig(model="fake-judge", base_url=server.base_url, workers=1, max_retries=1, timeout_s=5.0)
    cache = JudgementCache(tmp_path / "judgements.sqlite") if tmp_path is not None else None
    return Judge(JudgeClient(config, sleep=lambda seconds: None), cache)


def shown_answers(messages) -> tuple[str, str]:
    text = user_text(messages)
    first = re.search(r"\[Assistant A's answer\]\n(.*?)\n\[End of assistant A's answer\]", text, re.S).group(1)
    second = re.search(r"\[Assistant B's answer\]\n(.*?)\n\[End of assistant B's answer\]", text, re.S).group(1)
    return first, second


def prefer_marked(messages):
    """Pick the answer that contains "GOOD"; a tie when both or neither do."""
    first, second = shown_answers(messages)
    if ("GOOD" in first) == ("GOOD" in second):
        return Reply("Equally helpful. [[C]]")
    return Reply("[[A]]" if "GOOD" in first else "[[B]]")


def questions(count: int) -> list[Question]:
    return [Question(index, "writing", (f"Request {index}",)) for index in range(1, count + 1)]


def test_positions_balanced_and_seeded():
    positions = policy_positions(9, seed=3)
    assert positions.count("A") == 5
    assert positions.count("B") == 4
    assert policy_positions(9, seed=3) == positions
    assert any(policy_positions(9, seed=s) != positions for s in range(4, 10))


def test_win_rate_counts_wins_in_either_position():
    qs = questions(4)
    policy = [Answer(1, ("GOOD one",)), Answer(2, ("GOOD two",)), Answer(3, ("plain",)), Answer(4, ("GOOD four",))]
    reference = [Answer(1, ("plain",)), Answer(2, ("plain",)), Answer(3, ("GOOD three",)), Answer(4, ("GOOD again",))]
    with FakeJudgeServer(prefer_marked) as server:
        result = compare_answers(qs, policy, reference, make_judge(server), seed=0)
        shown = [shown_answers(request.messages) for request in server.requests]
    # outcomes 1, 1, 0, 0.5: mean 0.625; squared deviations 0.140625 * 2 + 0.390625 + 0.015625 = 0.6875
    assert result.win_rate == pytest.approx(0.625)
    assert result.win_rate_se == pytest.approx(math.sqrt(0.6875 / 3 / 4))
    assert (result.wins, result.losses, result.ties, result.unparseable) == (2, 1, 1, 0)
    assert result.policy_first == 2
    # each comparison records where the policy's answer was shown, and the prompt agrees
    for comparison, (first, second), answer in zip(result.comparisons, shown, policy):
        assert (first if comparison.policy_position == "A" else second) == answer.turns[0]
    assert result.summary()["positions"] == {str(c.question_id): c.policy_position for c in result.comparisons}


def test_balanced_order_cancels_position_bias():
    qs = questions(10)
    same = [Answer(q.question_id, ("the same text",)) for q in qs]
    with FakeJudgeServer(lambda messages: Reply("The first one. [[A]]")) as server:
        result = compare_answers(qs, same, same, make_judge(server), seed=5)
    # a judge that always picks the first answer wins exactly the 5 comparisons where the policy came first
    assert result.policy_first == 5
    assert result.win_rate == pytest.approx(0.5)


def test_unparseable_comparison_excluded():
    qs = questions(3)
    policy = [Answer(1, ("GOOD",)), Answer(2, ("broken",)), Answer(3, ("GOOD",))]
    reference = [Answer(1, ("x",)), Answer(2, ("broken",)), Answer(3, ("x",))]

    def judge(messages):
        first, _ = shown_answers(messages)
        return Reply("Hard to say, both have merits.") if first == "broken" else prefer_marked(messages)

    with FakeJudgeServer(judge) as server:
        result = compare_answers(qs, policy, reference, make_judge(server), seed=0)
    assert result.unparseable == 1
    assert result.compared == 2
    assert result.win_rate == pytest.approx(1.0)
    assert result.requests == 4  # two for the comparisons that parsed, two for the one asked again
    assert [c.problem for c in result.comparisons if c.outcome is None] == ["missing"]


def test_second_comparison_sends_no_requests(tmp_path):
    qs = questions(4)
    policy = [Answer(q.question_id, ("GOOD",)) for q in qs]
    reference = [Answer(q.question_id, ("meh",)) for q in qs]
    with FakeJudgeServer(prefer_marked) as server:
        first = compare_answers(qs, policy, reference, make_judge(server, tmp_path), seed=1)
        second = compare_answers(qs, policy, reference, make_judge(server, tmp_path), seed=1)
        served = len(server.requests)
    assert served == 4
    assert second.requests == 0
    assert second.cached == 4
    assert second.win_rate == first.win_rate == 1.0


def test_length_control_two_groups():
    # Six comparisons where the policy is 10 characters longer (5 wins, 1 loss) and two where it is
    # 10 shorter (1 win, 1 loss). Both groups share one |tanh(d / std)| = t, so the fit is saturated:
    # a + b t = logit(5/6) = ln 5 and a - b t = logit(1/2) = 0, hence a = ln(5) / 2 and the
    # length-controlled win rate is sigmoid(ln(5) / 2) = sqrt(5) / (1 + sqrt(5)) = 0.6910, below the raw 0.75.
    outcomes = [1, 1, 1, 1, 1, 0, 1, 0]
    differences = [10] * 6 + [-10] * 2
    win_rate, standard_error, slope = length_controlled_win_rate(outcomes, differences)
    assert win_rate == pytest.approx(math.sqrt(5) / (1 + math.sqrt(5)), abs=1e-3)
    assert slope > 0
    assert 0 < standard_error < 0.5


def test_length_control_without_length_differences():
    # equal lengths leave only the intercept, whose fit is logit(mean outcome): the raw win rate 0.75
    win_rate, _, slope = length_controlled_win_rate([1, 1, 0.5, 0.5, 1, 0.5], [0] * 6)
    assert win_rate == pytest.approx(0.75, abs=1e-3)
    assert slope == pytest.approx(0.0, abs=1e-6)


def test_length_control_all_wins_stays_finite():
    win_rate, standard_error, _ = length_controlled_win_rate([1, 1, 1, 1], [5, -3, 8, 0])
    assert 0.99 < win_rate < 1.0
    assert math.isfinite(standard_error)


def test_length_control_of_no_outcomes():
    assert length_controlled_win_rate([], []) == (None, None, None)


def test_missing_reference_answer_rejected():
    qs = questions(2)
    with FakeJudgeServer(prefer_marked) as server:
        with pytest.raises(ValueError, match=r"question\(s\) \[2\] lack a policy or a reference answer"):
            compare_answers(qs, [Answer(1, ("a",)), Answer(2, ("b",))], [Answer(1, ("c",))], make_judge(server))


def test_smollm_answers_compared_end_to_end(preference_tiny_cache, tmp_path):
    """SmolLM2-135M plays both models, with answers sampled under two seeds and judged by their length."""
    import torch

    from evaluators.preference.model import load_model
    from evaluators.preference.mtbench import generate_answers, load_questions

    torch.set_num_threads(1)
    model, tokenizer = load_model("gguf:smollm2-135m", preference_tiny_cache)
    qs = [q for q in load_questions() if q.category in ("writing", "roleplay")]  # sampled at temperature 0.7
    policy = generate_answers(model, tokenizer, qs, max_new_tokens=6, batch_size=4, seed=0)
    reference = generate_answers(model, tokenizer, qs, max_new_tokens=6, batch_size=4, seed=1)

    def longer_wins(messages):
        first, second = shown_answers(messages)
        if len(first) == len(second):
            return Reply("[[C]]")
        return Reply("[[A]]" if len(first) > len(second) else "[[B]]")

    with FakeJudgeServer(longer_wins) as server:
        result = compare_answers(qs, policy, reference, make_judge(server, tmp_path), seed=0)
        again = compare_answers(qs, policy, reference, make_judge(server, tmp_path), seed=0)
        served = len(server.requests)
    expected = []
    for mine, theirs in zip(policy, reference):
        difference = len(mine.turns[0]) - len(theirs.turns[0])
        expected.append(0.5 if difference == 0 else float(difference > 0))
    assert result.compared == len(qs)
    assert result.win_rate == pytest.approx(sum(expected) / len(expected))
    assert result.win_rate_se is not None
    assert result.lc_win_rate is not None
    assert served == len(qs)
    assert again.requests == 0
    assert again.win_rate == result.win_rate
