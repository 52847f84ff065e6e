"""The OpenAI proposer against a scripted OpenAI-compatible server over real HTTP.

The real openai client and HTTP stack run. Backoff waits go to a recording
`sleep`, so the tests check the waits the proposer chose without waiting.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time

import pytest

from engine.budget import BudgetExceeded, BudgetLimits, Ledger, Price, PriceTable
from engine.config import ProposerConfig
from engine.openai_proposer import OpenAIProposer, ProposerUnavailable, RetryBudget
from engine.proposer import ProposalRequest
from tests.support.fake_openai_server import Fault, FakeOpenAIServer, Hangup, RawBody, Reply, unused_port

GOOD = json.dumps({"thought": "scale the margin", "name": "scaled", "code": "def scaled(self, x):\n    return x\n"})
MESSAGES = [{"role": "system", "content": "write a loss"}, {"role": "user", "content": "propose one"}]
REQUEST = ProposalRequest(messages=MESSAGES, history=[], generation=1, attempt=1, seed=0)


def make_proposer(base_url: str, waits: list[float] | None = None, ledger=None, prices=None, retry_budget=None,
                  **fields) -> OpenAIProposer:
    settings = {"kind": "openai", "model": "fake-model", "base_url": base_url, "retry_base_s": 1.0, **fields}
    return OpenAIProposer(
        ProposerConfig(**settings),
        ledger=ledger,
        prices=prices,
        retry_budget=retry_budget,
        sleep=(waits.append if waits is not None else lambda seconds: None),
    )


def test_reply_text_usage_and_request_fields():
    prices = PriceTable({"fake-model": Price(1.0, 2.0)})
    with FakeOpenAIServer([Reply(GOOD, prompt_tokens=120, completion_tokens=30, model="fake-model-0101")]) as server:
        reply = make_proposer(server.base_url, prices=prices, temperature=0.3, max_tokens=777).propose(REQUEST)
    assert reply.text == GOOD
    assert reply.model == "fake-model"
    assert reply.served_model == "fake-model-0101"
    assert (reply.prompt_tokens, reply.completion_tokens) == (120, 30)
    # 120 prompt tokens at $1/M + 30 completion tokens at $2/M = $0.00018
    assert reply.cost_usd == pytest.approx(0.00018)
    assert (reply.requests, reply.retries, reply.retry_errors) == (1, 0, ())
    sent = server.requests[0]
    assert sent.model == "fake-model"
    assert sent.messages == MESSAGES
    assert sent.temperature == 0.3
    assert sent.max_tokens == 777


def test_retry_after_header_sets_wait():
    waits: list[float] = []
    with FakeOpenAIServer([Fault(429, "slow down", retry_after="7"), Reply(GOOD)]) as server:
        reply = make_proposer(server.base_url, waits).propose(REQUEST)
    assert waits == [7.0]
    assert reply.retries == 1
    assert reply.retry_errors == ("HTTP 429: slow down",)


def test_retry_after_http_date_and_cap():
    waits: list[float] = []
    in_thirty_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    script = [Fault(429, retry_after=in_thirty_s), Fault(503, retry_after="600"), Reply(GOOD)]
    with FakeOpenAIServer(script) as server:
        make_proposer(server.base_url, waits, retry_max_s=60.0).propose(REQUEST)
    # the HTTP date is whole seconds, so up to one second of the 30 may be gone
    assert 28.0 <= waits[0] <= 30.0
    assert waits[1] == 60.0


def test_backoff_doubles_with_jitter():
    waits: list[float] = []
    with FakeOpenAIServer([Fault(500)] * 3 + [Reply(GOOD)]) as server:
        reply = make_proposer(server.base_url, waits, retry_base_s=1.0, circuit_breaker=10).propose(REQUEST)
    assert reply.retries == 3
    # wait n is 1 s * 2**(n-1) times a jitter factor in [0.5, 1.5)
    for n, wait in enumerate(waits):
        assert 0.5 * 2**n <= wait < 1.5 * 2**n


@pytest.mark.parametrize(
    "fault, error",
    [
        (Fault(500, "boom"), "HTTP 500: boom"),
        (Fault(503, "overloaded"), "HTTP 503: overloaded"),
        (Fault(429, "rate limited"), "HTTP 429: rate limited"),
        (RawBody(b'{"choices": [ {"message"'), "MalformedResponse"),
        (RawBody(b"<html>bad gateway</html>", content_type="text/html"), "MalformedResponse"),
        (Hangup(), "connection failed (RemoteProtocolError"),
        (Reply(GOOD, delay_s=5.0), "timed out after 0.3 s"),
        (Reply(""), "EmptyReply: the reply was empty"),
        (Reply("   \n"), "EmptyReply: the reply was empty"),
        (Reply(GOOD[:40], finish_reason="length"), "cut off at the 2048-token limit"),
        (Reply('Here it is:\n{"thought": "x", "name": "y", "code": "def y('), "stopped before its JSON object"),
    ],
    ids=["500", "503", "429", "cut-json-body", "html-body", "hangup", "timeout", "empty", "blank", "length", "unclosed"],
)
def test_fault_is_retried(fault, error):
    with FakeOpenAIServer([fault, Reply(GOOD)]) as server:
        reply = make_proposer(server.base_url, [], timeout_s=0.3).propose(REQUEST)
        assert len(server.requests) == 2
    assert reply.text == GOOD
    assert reply.retries == 1
    assert reply.requests == 2
    assert error in reply.retry_errors[0]


def test_cut_off_reply_tokens_are_counted():
    script = [Reply(GOOD[:40], finish_reason="length", prompt_tokens=50, completion_tokens=2048),
              Reply(GOOD, prompt_tokens=50, completion_tokens=40)]
    with FakeOpenAIServer(script) as server:
        reply = make_proposer(server.base_url, []).propose(REQUEST)
        billed = server.billed_tokens()
    assert (reply.prompt_tokens, reply.completion_tokens) == (100, 2088)
    assert billed == (100, 2088)


def test_rejected_request_stops_at_once():
    with FakeOpenAIServer([Fault(404, "model 'fake-model' not found")]) as server:
        with pytest.raises(ProposerUnavailable) as caught:
            make_proposer(server.base_url, []).propose(REQUEST)
        assert len(server.requests) == 1
        message = str(caught.value)
        assert server.base_url in message
    assert "rejected the request: HTTP 404: model 'fake-model' not found" in message
    assert caught.value.usage.requests == 1


def test_down_endpoint_trips_circuit_breaker():
    url = f"http://127.0.0.1:{unused_port()}/v1"
    waits: list[float] = []
    with pytest.raises(ProposerUnavailable) as caught:
        make_proposer(url, waits, circuit_breaker=4, max_retries=10).propose(REQUEST)
    message = str(caught.value)
    assert url in message
    assert "Connection refused" in message
    assert "4 consecutive requests failed (circuit breaker" in message
    assert caught.value.usage.requests == 4
    assert len(waits) == 3


def test_closed_endpoint_drops_kept_alive_connection():
    """A client's kept-alive connection must not outlive the server: the next call finds the port closed."""
    with FakeOpenAIServer([Reply(GOOD)]) as server:
        proposer = make_proposer(server.base_url, [], circuit_breaker=2, max_retries=5)
        assert proposer.propose(REQUEST).text == GOOD
    with pytest.raises(ProposerUnavailable) as caught:
        proposer.propose(REQUEST)
    assert "Connection refused" in str(caught.value)
    assert "script is used up" not in str(caught.value)


def test_rate_limits_do_not_trip_breaker():
    with FakeOpenAIServer([Fault(429)] * 5 + [Reply(GOOD)]) as server:
        reply = make_proposer(server.base_url, [], circuit_breaker=2, max_retries=6).propose(REQUEST)
    assert reply.retries == 5


def test_breaker_counts_across_calls():
    # call 1 ends after its one retry with 2 failures; the third failure in a row, in call 2, opens the breaker
    with FakeOpenAIServer([Fault(500)] * 3) as server:
        proposer = make_proposer(server.base_url, [], circuit_breaker=3, max_retries=1)
        with pytest.raises(ProposerUnavailable, match="call's 1 retries are spent"):
            proposer.propose(REQUEST)
        with pytest.raises(ProposerUnavailable, match="3 consecutive requests failed"):
            proposer.propose(REQUEST)
        assert len(server.requests) == 3


def test_retry_budget_is_shared_by_calls():
    budget = RetryBudget(2)
    with FakeOpenAIServer([Fault(500), Reply(GOOD), Fault(500), Fault(500), Reply(GOOD)]) as server:
        proposer = make_proposer(server.base_url, [], retry_budget=budget, circuit_breaker=10)
        assert proposer.propose(REQUEST).retries == 1
        with pytest.raises(ProposerUnavailable, match="session's 2 retries are spent"):
            proposer.propose(REQUEST)
        assert len(server.requests) == 4


def test_cost_limit_stops_before_first_request():
    # the next call could cost 2048 completion tokens at $10/M = $0.02048, above the $0.01 limit
    ledger = Ledger(BudgetLimits(max_cost_usd=0.01))
    prices = PriceTable({"fake-model": Price(0.0, 10.0)})
    with FakeOpenAIServer([Reply(GOOD)]) as server:
        with pytest.raises(BudgetExceeded) as caught:
            make_proposer(server.base_url, [], ledger=ledger, prices=prices).propose(REQUEST)
        assert server.requests == []
    assert caught.value.usage is None


def test_budget_checked_before_each_retry():
    # the cut-off reply bills 1000 completion tokens at $4/M = $0.004; a retry could cost another
    # $0.004 (max_tokens 1000), and 0.004 + 0.004 > 0.006, so the retry is never sent
    ledger = Ledger(BudgetLimits(max_cost_usd=0.006))
    prices = PriceTable({"fake-model": Price(0.0, 4.0)})
    script = [Reply(GOOD[:30], finish_reason="length", prompt_tokens=10, completion_tokens=1000), Reply(GOOD)]
    with FakeOpenAIServer(script) as server:
        proposer = make_proposer(server.base_url, [], ledger=ledger, prices=prices, max_tokens=1000)
        with pytest.raises(BudgetExceeded, match=r"\$0.0040 of the \$0.0060 limit") as caught:
            proposer.propose(REQUEST)
        assert len(server.requests) == 1
    usage = caught.value.usage
    assert (usage.requests, usage.completion_tokens) == (1, 1000)
    assert usage.cost_usd == pytest.approx(0.004)


def test_retry_is_logged_with_status_and_wait(caplog):
    caplog.set_level(logging.INFO, logger="engine.openai_proposer")
    with FakeOpenAIServer([Fault(429, "slow down", retry_after="3"), Reply(GOOD)]) as server:
        make_proposer(server.base_url, []).propose(REQUEST)
        url = server.base_url
    retry_lines = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retry_lines) == 1
    assert "HTTP 429: slow down" in retry_lines[0]
    assert "retrying in 3.00 s" in retry_lines[0]
    assert url in retry_lines[0]


def test_api_key_is_sent_but_never_logged(caplog, monkeypatch):
    secret = "sk-test-do-not-log-0123456789"
    monkeypatch.setenv("EVOLVE_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer([Fault(500), Fault(401, "bad key")]) as server:
        with pytest.raises(ProposerUnavailable) as caught:
            make_proposer(server.base_url, [], api_key_env="EVOLVE_TEST_KEY").propose(REQUEST)
        assert server.requests[0].headers["authorization"] == f"Bearer {secret}"
    assert secret not in caplog.text
    assert secret not in str(caught.value)
    assert "EVOLVE_TEST_KEY" in str(caught.value)


def test_empty_replies_exhaust_call_retries():
    with FakeOpenAIServer([Reply(""), Reply("x", finish_reason="length")]) as server:
        with pytest.raises(ProposerUnavailable) as caught:
            make_proposer(server.base_url, [], max_retries=1).propose(REQUEST)
        assert len(server.requests) == 2
    message = str(caught.value)
    assert "the call's 1 retries are spent" in message
    assert "cut off" in message
    assert "--max-completion-tokens" in message
