"""Prices, token estimates and the run's spending ledger."""

from __future__ import annotations

import json
import sqlite3

import pytest

from engine.archive import Archive
from engine.budget import (
    BudgetExceeded,
    BudgetLimits,
    Ledger,
    Price,
    PriceTable,
    PriceTableError,
    estimate_prompt_tokens,
    estimate_tokens,
)
from engine.config import ProposerConfig
from engine.multi_proposer import build_llm_proposer


def test_price_cost_per_million_tokens():
    # gpt-4o: 1000 prompt tokens at $2.50/M plus 500 completion tokens at $10/M
    # = 0.0025 + 0.0050 = $0.0075
    price = PriceTable().lookup("gpt-4o")
    assert price.cost(1000, 500) == pytest.approx(0.0075)


def test_lookup_takes_longest_matching_name():
    table = PriceTable()
    assert table.lookup("gpt-4o-mini-2024-07-18") == Price(0.15, 0.60)
    assert table.lookup("gpt-4o-2024-08-06") == Price(2.50, 10.00)
    assert table.lookup("llama3.1:8b") is None


def test_price_table_file_overrides_and_extends(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(
        '["gpt-4o"]\nprompt_per_mtok = 1.0\ncompletion_per_mtok = 2.0\n\n'
        '["llama3.1:8b"]\nprompt_per_mtok = 0\ncompletion_per_mtok = 0\n'
    )
    table = PriceTable.load(path)
    assert table.lookup("gpt-4o") == Price(1.0, 2.0)
    assert table.lookup("llama3.1:8b") == Price(0.0, 0.0)
    assert table.lookup("gpt-4o-mini") == Price(0.15, 0.60)


def test_price_table_reads_json(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"local": {"prompt_per_mtok": 0.5, "completion_per_mtok": 1.5}}))
    assert PriceTable.load(path).lookup("local") == Price(0.5, 1.5)


def test_price_table_lists_every_bad_entry(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(
        '[a]\nprompt_per_mtok = 1.0\n\n'
        '[b]\nprompt_per_mtok = -1.0\ncompletion_per_mtok = 2.0\n\n'
        '[c]\nprompt_per_mtok = "cheap"\ncompletion_per_mtok = 2.0\n'
    )
    with pytest.raises(PriceTableError) as caught:
        PriceTable.load(path)
    message = str(caught.value)
    assert str(path) in message
    assert "'a'" in message
    assert "'b'" in message
    assert "'c'" in message


def test_price_table_file_errors_name_the_file(tmp_path):
    with pytest.raises(PriceTableError, match="missing.toml cannot be read"):
        PriceTable.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(PriceTableError, match="broken.json is not valid JSON"):
        PriceTable.load(broken)


def test_prompt_estimate_is_chars_over_four_plus_overhead():
    # 13 characters * 0.25 = 3.25, rounded up to 4, plus 4 tokens per message * 2
    messages = [{"role": "system", "content": "a" * 10}, {"role": "user", "content": "b" * 3}]
    assert estimate_prompt_tokens(messages) == 12
    assert estimate_tokens("abcde") == 2


def test_ledger_stops_before_cost_limit():
    # each call may use 1000 completion tokens at $4/M = $0.004 and no prompt cost
    price = Price(0.0, 4.0)
    ledger = Ledger(BudgetLimits(max_cost_usd=0.01), cost_usd=0.006)
    ledger.check("m", price, prompt_tokens=500, completion_tokens=1000)  # 0.006 + 0.004 = 0.010, not above
    ledger.add(0, 500, price.cost(0, 500))  # spent 0.006 + 0.002 = 0.008
    with pytest.raises(BudgetExceeded) as caught:
        ledger.check("m", price, prompt_tokens=500, completion_tokens=1000)
    message = str(caught.value)
    assert "$0.0080 of the $0.0100 limit" in message
    assert "$0.0040" in message
    assert "--max-cost" in message
    assert caught.value.usage is None


def test_ledger_stops_before_token_limit():
    ledger = Ledger(BudgetLimits(max_tokens=5000), prompt_tokens=3000, completion_tokens=500)
    ledger.check("m", None, prompt_tokens=900, completion_tokens=600)  # 3500 + 1500 = 5000
    with pytest.raises(BudgetExceeded, match="3500 of the 5000-token limit"):
        ledger.check("m", None, prompt_tokens=901, completion_tokens=600)


def test_ledger_learns_billed_token_rate():
    ledger = Ledger()
    message = [{"role": "user", "content": "x" * 100}]
    assert ledger.estimate_prompt(message) == 25 + 4
    # the endpoint billed 300 tokens for 1000 characters: 0.3 tokens per character
    ledger.add(300, 10, 0.0, prompt_chars=1000)
    assert ledger.estimate_prompt(message) == 30 + 4
    # a cheaper prompt later does not lower the rate
    ledger.add(100, 10, 0.0, prompt_chars=1000)
    assert ledger.estimate_prompt(message) == 30 + 4


def test_ledger_continues_from_archive(tmp_path):
    archive = Archive(tmp_path / "archive.sqlite")
    archive.record_llm_call(generation=1, attempt=1, model="m", prompt_tokens=100, completion_tokens=40, cost_usd=0.002)
    archive.record_llm_call(generation=2, attempt=1, model="m", prompt_tokens=50, completion_tokens=10, cost_usd=0.001,
                            error="endpoint down", requests=3, retries=2)
    ledger = Ledger.from_totals(BudgetLimits(max_cost_usd=1.0), archive.llm_totals())
    assert (ledger.prompt_tokens, ledger.completion_tokens) == (150, 50)
    assert ledger.cost_usd == pytest.approx(0.003)
    totals = archive.llm_totals()
    assert totals["requests"] == 4
    assert totals["failed_calls"] == 1


def test_old_archive_gains_llm_call_columns(tmp_path):
    path = tmp_path / "archive.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE llm_calls (id INTEGER PRIMARY KEY AUTOINCREMENT, generation INTEGER NOT NULL, "
            "attempt INTEGER NOT NULL, candidate_id TEXT NOT NULL DEFAULT '', model TEXT NOT NULL, "
            "prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0, "
            "cost_usd REAL NOT NULL DEFAULT 0, latency_s REAL NOT NULL DEFAULT 0, "
            "retries INTEGER NOT NULL DEFAULT 0, error TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL)"
        )
        db.execute("INSERT INTO llm_calls(generation, attempt, model, retries, created_at) VALUES (1, 1, 'm', 2, 0)")
    archive = Archive(path)
    call = archive.llm_calls()[0]
    assert call["requests"] == 3
    assert call["retry_errors"] == "[]"
    assert archive.llm_totals()["requests"] == 3


def test_cost_limit_needs_a_price():
    config = ProposerConfig(kind="openai", model="my-local-model", base_url="http://127.0.0.1:9/v1", max_cost_usd=1.0)
    with pytest.raises(ValueError, match="my-local-model.*--price-table"):
        build_llm_proposer(config)
