"""MT-Bench-style fitness: questions, two-turn answers from SmolLM2-135M and grades from a scripted judge."""

from __future__ import annotations

import json
import math
import re

import pytest

from evaluators.preference import chat, mtbench
from evaluators.preference.judge import Judge, JudgeClient, JudgeConfig, JudgementCache
from evaluators.preference.judge_prompts import BUILTIN_PROMPTS
from evaluators.preference.mtbench import Answer, Question, conversation, grade_answers, load_questions
from tests.support.fake_judge_server import FakeJudgeServer, marked_rating, user_text
from tests.support.fake_openai_server import Reply

# --- questions ------------------------------------------------------------------------------------


def test_bundled_questions_are_two_turn():
    questions = load_questions()
    assert 8 <= len(questions) <= 10
    assert all(len(question.turns) == 2 for question in questions)
    assert len({question.question_id for question in questions}) == len(questions)
    for question in questions:
        # MT-Bench grades these categories against reference answers
        needs_reference = question.category in ("math", "reasoning", "coding")
        assert bool(question.reference) == needs_reference, question.question_id


def test_invalid_question_file_lists_every_line(tmp_path):
    rows = [
        '{"question_id": 1, "category": "writing", "turns": ["a", "b"]}',
        "{not json",
        '{"question_id": 2, "turns": ["a"]}',
        '{"question_id": 3, "category": "math", "turns": ["a", "b", "c"]}',
        '{"question_id": 4, "category": "math", "turns": ["a", "b"], "reference": ["only one"]}',
        '{"question_id": 1, "category": "writing", "turns": ["again"]}',
        '{"question_id": 5, "category": "writing", "turns": []}',
    ]
    path = tmp_path / "question.jsonl"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError) as error:
        load_questions(path)
    message = str(error.value)
    assert "line 2: not valid JSON" in message
    assert "line 3: missing field(s) ['category']" in message
    assert "line 4: 3 turns" in message
    assert "line 5: reference must be a list" in message
    assert "line 6: question_id 1 appears twice" in message
    assert "line 7: turns must be a non-empty list" in message
    assert "- line 1:" not in message


def test_missing_question_file_names_path(tmp_path):
    with pytest.raises(ValueError, match="question file .*nothing.jsonl cannot be read"):
        load_questions(tmp_path / "nothing.jsonl")


def test_second_turn_conversation_contains_first_answer():
    question = Question(7, "writing", ("Write a haiku.", "Now translate it."))
    assert conversation(question, []) == [{"role": "user", "content": "Write a haiku."}]
    assert conversation(question, ["Old pond, frog jumps in"]) == [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Old pond, frog jumps in"},
        {"role": "user", "content": "Now translate it."},
    ]


# --- grading --------------------------------------------------------------------------------------

QUESTIONS = [
    Question(1, "writing", ("Write a poem.", "Shorten it.")),
    Question(2, "math", ("What is 6 * 7?", "And 6 * 8?"), reference=("42", "48")),
    Question(3, "stem", ("Why is ice slippery?", "And snow?")),
]


def marked_answers(first: list[str], second: list[str]) -> list[Answer]:
    return [Answer(q.question_id, (f"answer score={a}", f"follow-up score={b}")) for q, a, b in zip(QUESTIONS, first, second)]


def make_judge(server, tmp_path=None, workers: int = 1) -> Judge:
    config = JudgeConfig(model="fake-judge", base_url=server.base_url, workers=workers, max_retries=1, timeout_s=5.0)
    cache = JudgementCache(tmp_path / "judgements.sqlite") if tmp_path is not None else None
    return Judge(JudgeClient(config, sleep=lambda seconds: None), cache)


@pytest.mark.parametrize("workers", [1, 4])
def test_score_is_mean_of_both_turns(workers):
    answers = marked_answers(["8", "6", "4"], ["7", "5", "3"])
    with FakeJudgeServer(marked_rating) as server:
        result = grade_answers(QUESTIONS, answers, make_judge(server, workers=workers))
    # grades 8, 6, 4 (turn 1) and 7, 5, 3 (turn 2): mean 33 / 6 = 5.5, turn means 6 and 5
    assert result.score == pytest.approx(5.5)
    assert result.turn_scores == {"1": pytest.approx(6.0), "2": pytest.approx(5.0)}
    # deviations +-2.5, +-1.5, +-0.5 sum to 17.5 when squared; variance 17.5 / 5 = 3.5; se = sqrt(3.5 / 6)
    assert result.score_se == pytest.approx(math.sqrt(3.5 / 6))
    assert result.graded == 6
    assert result.unparseable == 0
    assert result.requests == 6
    assert [(g.question_id, g.turn, g.rating) for g in result.grades] == [
        (1, 1, 8.0), (1, 2, 7.0), (2, 1, 6.0), (2, 2, 5.0), (3, 1, 4.0), (3, 2, 3.0),
    ]


def test_reference_answers_reach_math_prompts():
    answers = marked_answers(["5", "5", "5"], ["5", "5", "5"])
    with FakeJudgeServer(marked_rating) as server:
        grade_answers(QUESTIONS, answers, make_judge(server))
        prompts = [user_text(request.messages) for request in server.requests]
        systems = [request.messages[0]["content"] for request in server.requests]
    # requests in order: q1 t1, q1 t2, q2 t1, q2 t2, q3 t1, q3 t2
    assert "[Reference answer]\n42" in prompts[2]
    assert "### Reference:\n42" in prompts[3]
    assert "### Reference:\n48" in prompts[3]
    assert all("Reference" not in prompts[index] for index in (0, 1, 4, 5))
    # the second-turn prompt shows the whole conversation and asks about the second answer
    assert "answer score=5" in prompts[1]
    assert "follow-up score=5" in prompts[1]
    assert "second question" in systems[1]


def test_reference_only_for_reference_categories():
    questions = [
        Question(1, "extraction", ("List the names.", "As JSON."), reference=("Ana, Tomas", "")),
        Question(2, "math", ("What is 2 + 3?", "Explain."), reference=("5", "")),
    ]
    answers = [Answer(1, ("a score=5", "b score=5")), Answer(2, ("c score=5", "d score=5"))]
    with FakeJudgeServer(marked_rating) as server:
        grade_answers(questions, answers, make_judge(server))
        prompts = [user_text(request.messages) for request in server.requests]
    # MT-Bench's extraction questions carry references that FastChat does not grade against
    assert "Reference" not in prompts[0]
    assert "Reference" not in prompts[1]
    # a math question uses its reference for the first turn; the second has none, so it is graded without
    assert "[Reference answer]\n5" in prompts[2]
    assert "Reference" not in prompts[3]


def test_reference_answer_file_replaces_references(tmp_path):
    path = tmp_path / "gpt-4.jsonl"
    path.write_text(
        '{"question_id": 2, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["42", "48"]}]}\n'
        '{"question_id": 9, "choices": [{"turns": ["unused"]}]}\n'
    )
    updated = mtbench.load_reference_answers(path, QUESTIONS)
    assert updated[1].reference == ("42", "48")
    assert updated[0].reference == ()
    assert updated[2] == QUESTIONS[2]
    path.write_text('{"question_id": 2, "choices": []}\n')
    with pytest.raises(ValueError, match="line 1: expected question_id and choices"):
        mtbench.load_reference_answers(path, QUESTIONS)


def grade_or_refuse(messages):
    """Refuse the answer graded by the marker "score=none"; grade the rest by their marker.

    A second-turn prompt also shows the first answer, so only the last marker counts.
    """
    markers = re.findall(r"score=(\w+)", user_text(messages))
    if markers and markers[-1] == "none":
        return Reply("I'm sorry, I can't rate this response.")
    return marked_rating(messages)


def test_unparseable_grade_excluded_and_counted():
    answers = marked_answers(["9", "none", "3"], ["8", "6", "4"])
    with FakeJudgeServer(grade_or_refuse) as server:
        result = grade_answers(QUESTIONS, answers, make_judge(server))
    # the refusal is asked twice (reminder), then left out: grades 9, 8, 6, 3, 4 -> mean 30 / 5
    assert result.unparseable == 1
    assert result.graded == 5
    assert result.score == pytest.approx(6.0)
    assert result.turn_scores == {"1": pytest.approx(6.0), "2": pytest.approx(6.0)}
    assert result.requests == 7
    bad = [g for g in result.grades if g.rating is None]
    assert [(g.question_id, g.turn, g.problem) for g in bad] == [(2, 1, "refusal")]
    assert result.summary()["unparseable_grades"] == [{"question_id": 2, "turn": 1, "problem": "refusal"}]


def test_grade_fixed_after_reminder_counts():
    def first_bad(messages):
        # no rating in a first request for question 1, a valid one after the reminder
        if len(messages) == 2 and "Write a poem." in user_text(messages) and "### User" not in user_text(messages):
            return Reply("A lovely poem, well done.")
        return marked_rating(messages)

    answers = marked_answers(["2", "4", "6"], ["2", "4", "6"])
    with FakeJudgeServer(first_bad) as server:
        result = grade_answers(QUESTIONS, answers, make_judge(server))
    assert result.unparseable == 0
    assert result.score == pytest.approx(4.0)
    assert result.requests == 7


def test_second_evaluation_sends_no_requests(tmp_path):
    answers = marked_answers(["8", "6", "4"], ["7", "5", "3"])
    with FakeJudgeServer(marked_rating) as server:
        first = grade_answers(QUESTIONS, answers, make_judge(server, tmp_path))
        served = len(server.requests)
        second = grade_answers(QUESTIONS, answers, make_judge(server, tmp_path))
        served_again = len(server.requests)
    assert served == 6
    assert served_again == 6
    assert second.requests == 0
    assert second.cached == 6
    assert second.score == first.score


def test_answers_must_cover_every_question():
    with FakeJudgeServer(marked_rating) as server:
        with pytest.raises(ValueError, match=r"no answers for question\(s\) \[3\]"):
            grade_answers(QUESTIONS, marked_answers(["1", "2"], ["1", "2"]), make_judge(server))


# --- answers from SmolLM2-135M --------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm(preference_tiny_cache):
    import torch

    from evaluators.preference.model import load_model

    torch.set_num_threads(1)
    return load_model("gguf:smollm2-135m", preference_tiny_cache)


def test_generated_second_turn_sees_first_answer(smollm, monkeypatch):
    model, tokenizer = smollm
    questions = load_questions()[:3]  # writing (0.7), roleplay (0.7), reasoning (0.0)
    calls = []
    real = chat.complete_chats

    def spy(model, tokenizer, chats, **kwargs):
        replies = real(model, tokenizer, chats, **kwargs)
        calls.append((chats, kwargs["temperature"], replies))
        return replies

    monkeypatch.setattr(chat, "complete_chats", spy)
    answers = mtbench.generate_answers(model, tokenizer, questions, max_new_tokens=4, batch_size=4, seed=0)

    assert [answer.question_id for answer in answers] == [1, 2, 3]
    assert all(len(answer.turns) == 2 for answer in answers)
    # per turn, one call for temperature 0.0 (reasoning) and one for 0.7 (writing, roleplay)
    assert [(len(chats), temperature) for chats, temperature, _ in calls] == [(1, 0.0), (2, 0.7), (1, 0.0), (2, 0.7)]
    second_turn_reasoning = calls[2][0][0]
    assert second_turn_reasoning[1] == {"role": "assistant", "content": answers[2].turns[0]}
    assert second_turn_reasoning[2]["content"] == questions[2].turns[1]
    # the chat template renders the first answer into the second prompt
    rendered = tokenizer.decode(chat.render_chat(tokenizer, second_turn_reasoning))
    assert answers[2].turns[0] in rendered


def test_smollm_answers_graded_end_to_end(smollm, tmp_path):
    model, tokenizer = smollm
    questions = load_questions()[:2]
    answers = mtbench.generate_answers(model, tokenizer, questions, max_new_tokens=4, batch_size=2, seed=0)
    again = mtbench.generate_answers(model, tokenizer, questions, max_new_tokens=4, batch_size=2, seed=0)
    assert answers == again
    assert all(turn.strip() for answer in answers for turn in answer.turns)

    def by_length(messages):
        # a deterministic judge: longer prompts (more text to grade) get higher ratings, capped at 10
        return Reply(f"Rating: [[{min(10, 1 + len(user_text(messages)) // 200)}]]")

    with FakeJudgeServer(by_length) as server:
        result = grade_answers(questions, answers, make_judge(server, tmp_path))
        cached = grade_answers(questions, answers, make_judge(server, tmp_path))
        served = len(server.requests)
    assert result.graded == 4
    assert 1.0 <= result.score <= 10.0
    assert result.score_se is not None
    assert served == 4
    assert cached.requests == 0
    assert json.loads(json.dumps(result.summary()))["graded"] == 4


def test_builtin_prompts_name_rating_format():
    for template in (BUILTIN_PROMPTS.single, BUILTIN_PROMPTS.single_reference, BUILTIN_PROMPTS.multi_turn,
                     BUILTIN_PROMPTS.multi_turn_reference):
        text = template.system_prompt + template.prompt_template
        assert "Rating: [[5]]" in text
        assert "1 to 10" in text
    assert re.search(r"\[\[A\]\].*\[\[B\]\].*\[\[C\]\]", BUILTIN_PROMPTS.pairwise.system_prompt)
