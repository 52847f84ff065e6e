"""The judge client and cache against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import dataclasses

import pytest

from evaluators.preference.judge import (
    Judge,
    JudgeClient,
    JudgeConfig,
    JudgementCache,
    JudgementStatus,
    JudgeUnavailable,
)
from evaluators.preference.judge_prompts import (
    BUILTIN_PROMPTS,
    FASTCHAT_TEMPLATE_NAMES,
    VerdictProblem,
    Winner,
    load_judge_prompts,
    parse_preference,
    parse_rating,
)
from tests.support.fake_judge_server import FakeJudgeServer
from tests.support.fake_openai_server import Fault, Hangup, Reply

FIELDS = {"question": "What is 2 + 2?", "answer": "4"}


@pytest.mark.parametrize(
    ("text", "value", "problem"),
    [
        ("Correct and brief. Rating: [[9]]", 9.0, None),
        ("Rating: [[7.5]]", 7.5, None),
        ("Rating: [[ 3 ]]", 3.0, None),
        ("Rating: [[1]]", 1.0, None),
        ("Rating: [[10]]", 10.0, None),
        ("I give it [[6]]. Rating: [[6]]", 6.0, None),
        ("Rating: [[11]]", None, VerdictProblem.OUT_OF_RANGE),
        ("Rating: [[0]]", None, VerdictProblem.OUT_OF_RANGE),
        ("Rating: [[-1]]", None, VerdictProblem.OUT_OF_RANGE),
        ("First [[4]], on reflection [[8]]", None, VerdictProblem.CONFLICTING),
        ("Rating: 7", None, VerdictProblem.MISSING),
        ("Rating: [7]", None, VerdictProblem.MISSING),
        ("I'm sorry, but I can't evaluate this answer.", None, VerdictProblem.REFUSAL),
        ("   ", None, VerdictProblem.EMPTY),
    ],
)
def test_parse_rating(text, value, problem):
    verdict = parse_rating(text)
    assert verdict.value == value
    assert verdict.problem == problem


@pytest.mark.parametrize(
    ("text", "value", "problem"),
    [
        ("B is more accurate. [[B]]", Winner.B, None),
        ("[[A]]", Winner.A, None),
        ("Both are equally good: [[C]]", Winner.TIE, None),
        ("[[A]] ... final verdict [[A]]", Winner.A, None),
        ("[[A]] or maybe [[B]]", None, VerdictProblem.CONFLICTING),
        ("Assistant A is better.", None, VerdictProblem.MISSING),
    ],
)
def test_parse_preference(text, value, problem):
    verdict = parse_preference(text)
    assert verdict.value == value
    assert verdict.problem == problem


def test_config_reports_every_error():
    with pytest.raises(ValueError) as error:
        JudgeConfig(model=" ", workers=0, max_retries=-1, timeout_s=0)
    message = str(error.value)
    for name in ("model is empty", "workers=0", "max_retries=-1", "timeout_s=0"):
        assert name in message


def test_client_needs_key_or_url(monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="JUDGE_TEST_KEY"):
        JudgeClient(JudgeConfig(api_key_env="JUDGE_TEST_KEY"))


def make_judge(server, tmp_path=None, sleeps=None, **config) -> Judge:
    values = {"model": "fake-judge", "base_url": server.base_url, "workers": 1, "max_retries": 2, "timeout_s": 5.0}
    values.update(config)
    client = JudgeClient(JudgeConfig(**values), sleep=(sleeps.append if sleeps is not None else lambda s: None))
    cache = JudgementCache(tmp_path / "judgements.sqlite") if tmp_path is not None else None
    return Judge(client, cache)


def test_judge_parses_rating():
    with FakeJudgeServer(lambda messages: Reply("Right. Rating: [[8]]")) as server:
        judgement = make_judge(server).judge(BUILTIN_PROMPTS.single, FIELDS)
        request = server.requests[0]
    assert judgement.value == 8.0
    assert judgement.status is JudgementStatus.PARSED
    assert judgement.requests == 1
    assert request.model == "fake-judge"
    assert request.temperature == 0.0
    assert request.max_tokens == 2048
    assert "What is 2 + 2?" in request.messages[1]["content"]


def test_malformed_grade_retried_with_reminder():
    script = [Reply("The answer is correct and concise."), Reply("Rating: [[9]]")]
    with FakeJudgeServer(lambda messages: Reply("unused"), script=script) as server:
        judgement = make_judge(server).judge(BUILTIN_PROMPTS.single, FIELDS)
        follow_up = server.requests[1].messages
    assert judgement.value == 9.0
    assert judgement.requests == 2
    # the second request repeats the conversation, the judge's reply and a reminder naming the problem
    assert [m["role"] for m in follow_up] == ["system", "user", "assistant", "user"]
    assert follow_up[2]["content"] == "The answer is correct and concise."
    assert "no rating" in follow_up[3]["content"]
    assert "Rating: [[5]]" in follow_up[3]["content"]


@pytest.mark.parametrize(
    ("first", "second", "problem"),
    [
        ("no verdict here", "still none", "missing"),
        ("Rating: [[11]]", "Rating: [[12]]", "out_of_range"),
        ("I'm sorry, I cannot grade this.", "I cannot.", "refusal"),
        ("", "", "empty"),
    ],
)
def test_twice_malformed_grade_is_unparseable(tmp_path, first, second, problem):
    with FakeJudgeServer(lambda messages: Reply("Rating: [[5]]"), script=[Reply(first), Reply(second)]) as server:
        judge = make_judge(server, tmp_path)
        judgement = judge.judge(BUILTIN_PROMPTS.single, FIELDS)
        # an unparseable verdict is not cached, so the next evaluation asks again
        again = judge.judge(BUILTIN_PROMPTS.single, FIELDS)
        requests = len(server.requests)
    assert judgement.status is JudgementStatus.UNPARSEABLE
    assert judgement.value is None
    assert judgement.problem == problem
    assert judgement.requests == 2
    assert again.value == 5.0
    assert not again.cached
    assert requests == 3


def test_transport_errors_are_retried_with_backoff():
    script = [Fault(500), Hangup(), Fault(429, retry_after="0.25")]
    sleeps: list[float] = []
    with FakeJudgeServer(lambda messages: Reply("Rating: [[4]]"), script=script) as server:
        judge = make_judge(server, sleeps=sleeps, max_retries=3, retry_base_s=0.5)
        judgement = judge.judge(BUILTIN_PROMPTS.single, FIELDS)
        requests = len(server.requests)
    assert judgement.value == 4.0
    assert requests == 4
    assert judge.client.usage.retries == 3
    assert judge.client.usage.requests == 4
    # two exponential waits with jitter (0.5 * 2**k * [0.5, 1.5)), then the server's Retry-After
    assert 0.25 <= sleeps[0] < 0.75
    assert 0.5 <= sleeps[1] < 1.5
    assert sleeps[2] == 0.25


def test_judge_unavailable_after_retries():
    with FakeJudgeServer(lambda messages: Fault(503, "overloaded")) as server:
        judge = make_judge(server, max_retries=2)
        with pytest.raises(JudgeUnavailable) as error:
            judge.judge(BUILTIN_PROMPTS.single, FIELDS)
        requests = len(server.requests)
        url = server.base_url
    assert requests == 3
    assert url in str(error.value)
    assert "HTTP 503" in str(error.value)


def test_rejected_request_is_not_retried():
    with FakeJudgeServer(lambda messages: Fault(401, "bad key")) as server:
        with pytest.raises(JudgeUnavailable, match="rejected the request"):
            make_judge(server).judge(BUILTIN_PROMPTS.single, FIELDS)
        requests = len(server.requests)
    assert requests == 1


def test_cache_skips_repeated_judgements(tmp_path):
    with FakeJudgeServer(lambda messages: Reply("Rating: [[6]]")) as server:
        first = make_judge(server, tmp_path).judge(BUILTIN_PROMPTS.single, FIELDS)
        # a new client and cache object over the same file, as a later process would open
        second = make_judge(server, tmp_path).judge(BUILTIN_PROMPTS.single, FIELDS)
        requests_after_repeat = len(server.requests)
        make_judge(server, tmp_path).judge(BUILTIN_PROMPTS.single, {**FIELDS, "answer": "four"})
        requests_after_new_answer = len(server.requests)
    assert first.cached is False
    assert second.cached is True
    assert second.value == 6.0
    assert second.requests == 0
    assert requests_after_repeat == 1
    assert requests_after_new_answer == 2


@pytest.mark.parametrize(
    "change",
    [
        {"model": "another-judge"},
        {"temperature": 0.7},
    ],
)
def test_cache_key_includes_judge_settings(tmp_path, change):
    with FakeJudgeServer(lambda messages: Reply("Rating: [[6]]")) as server:
        make_judge(server, tmp_path).judge(BUILTIN_PROMPTS.single, FIELDS)
        changed = make_judge(server, tmp_path, **change).judge(BUILTIN_PROMPTS.single, FIELDS)
        requests = len(server.requests)
    assert changed.cached is False
    assert requests == 2


def test_cache_key_includes_prompt_version(tmp_path):
    reworded = dataclasses.replace(BUILTIN_PROMPTS.single, system_prompt="You grade answers.")
    assert reworded.version != BUILTIN_PROMPTS.single.version
    with FakeJudgeServer(lambda messages: Reply("Rating: [[6]]")) as server:
        make_judge(server, tmp_path).judge(BUILTIN_PROMPTS.single, FIELDS)
        changed = make_judge(server, tmp_path).judge(reworded, FIELDS)
        requests = len(server.requests)
    assert changed.cached is False
    assert requests == 2


def test_pairwise_verdict_cached_as_winner(tmp_path):
    fields = {"question": "Say hi.", "answer_a": "hi", "answer_b": "hello there"}
    with FakeJudgeServer(lambda messages: Reply("B is friendlier. [[B]]")) as server:
        make_judge(server, tmp_path).judge(BUILTIN_PROMPTS.pairwise, fields)
        cached = make_judge(server, tmp_path).judge(BUILTIN_PROMPTS.pairwise, fields)
    assert cached.cached is True
    assert cached.value is Winner.B


def test_load_fastchat_prompt_file(tmp_path):
    lines = []
    for name in FASTCHAT_TEMPLATE_NAMES.values():
        output_format = "[[A]]" if name.startswith("pair") else "[[rating]]"
        lines.append(
            '{"name": "%s", "type": "x", "system_prompt": "sys %s", "prompt_template": "{question}", '
            '"output_format": "%s"}' % (name, name, output_format)
        )
    path = tmp_path / "judge_prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    prompts = load_judge_prompts(path)
    assert prompts.single.name == "single-v1"
    assert prompts.multi_turn_reference.name == "single-math-v1-multi-turn"
    assert prompts.pairwise.system_prompt == "sys pair-v2"
    assert prompts.single.version.startswith("single-v1@")


def test_load_prompt_file_names_missing_templates(tmp_path):
    path = tmp_path / "judge_prompts.jsonl"
    path.write_text('{"name": "single-v1", "system_prompt": "s", "prompt_template": "t", "output_format": "[[rating]]"}\nnot json\n')
    with pytest.raises(ValueError) as error:
        load_judge_prompts(path)
    message = str(error.value)
    assert "line 2: not a JSON object" in message
    assert "'pair-v2' is missing" in message
    assert "'single-math-v1' is missing" in message
