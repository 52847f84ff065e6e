"""Whole runs against a scripted OpenAI-compatible server: faults, accounting, a dead endpoint, a cost limit.

The real openai client talks HTTP to tests/support/fake_openai_server.py;
the loop, the static checks, the sandbox worker processes and the toy
task's training are real.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine.archive import Archive
from engine.candidate import Status
from engine.config import ProposerConfig, RunConfig, SandboxConfig
from engine.loop import Evolution, LoopOptions
from engine.openai_proposer import ProposerUnavailable
from engine.prompts import INVALID_PREFIX, ContextOptions
from engine.proposer import ProposalRequest, Proposer, ProposerReply
from engine.runner import build_pipeline, choose_proposer, open_run
from sandbox.protocol import Stage
from tests.conftest import ROOT, TOY_TASK
from tests.engine.test_loop import HEADER, MARGIN, QuietReporter
from tests.support.fake_openai_server import Fault, FakeOpenAIServer, Reply, unused_port

MODEL = "fake-model"
# fewer optimizer steps than the toy task's default keep each evaluation short
SETTINGS = ["--set", "steps=10"]


def reply_object(name: str, body: str, imports: str = "import torch\nimport torch.nn.functional as F\n") -> str:
    code = imports + "\n" + HEADER.format(name=name) + body
    return json.dumps({"thought": f"try {name}", "name": name, "code": code})


SOFTPLUS = reply_object("softplus_margin", MARGIN + "    return F.softplus(1.0 - self.beta * rho)\n")
MEAN = reply_object("mean_loss", MARGIN + "    return (-F.logsigmoid(self.beta * rho)).mean()\n")
SQUARED = reply_object("squared_margin", MARGIN + "    return (self.beta * rho - 1.0) ** 2\n")
RENAMED_DPO = reply_object(
    "tidy_logistic",
    "    d = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
    "    return -F.logsigmoid(self.beta * d)\n",
    imports="import torch.nn.functional as F\n",
)
SCALED = reply_object("scaled_logistic", MARGIN + "    return -F.logsigmoid(2.0 * self.beta * rho)\n")
SHELL = reply_object("shell_out", MARGIN + "    os.system('true')\n    return -F.logsigmoid(rho)\n",
                     imports="import os\nimport torch.nn.functional as F\n")

FENCED = f"```json\n{SOFTPLUS}\n```"
WITH_PROSE = f"Sure! Here is a new objective.\n{MEAN}\nLet me know if you want variants."

# the scripted endpoint of the acceptance run, in order
SCRIPT = [
    Reply(FENCED),  # g1 a1: evaluated
    Reply(WITH_PROSE),  # g2 a1: rejected by the unit tests (reduced to a scalar)
    Fault(429, "rate limited", retry_after="0.01"),
    Reply(SQUARED),  # g2 a2: evaluated after one retry
    Fault(500, "internal error"),
    Fault(500, "internal error"),
    Fault(500, "internal error"),
    Reply(RENAMED_DPO),  # g3 a1: duplicate of the DPO seed, after three retries
    Reply(SCALED[:120], finish_reason="length"),
    Reply(""),
    Reply(SCALED),  # g3 a2: evaluated after a cut-off and an empty reply
]
PRICES = {MODEL: {"prompt_per_mtok": 1.0, "completion_per_mtok": 2.0}}


class ObservedProposer(Proposer):
    """Passes requests to another proposer and records the outcomes the loop reports."""

    def __init__(self, inner: Proposer) -> None:
        self.inner = inner
        self.name = inner.name
        self.outcomes: list[tuple[str, bool]] = []

    def propose(self, request: ProposalRequest) -> ProposerReply:
        return self.inner.propose(request)

    def observe(self, candidate_model: str, improved: bool) -> None:
        self.outcomes.append((candidate_model, improved))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the module, so the seeds' baseline fitness is measured once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def acceptance(tmp_path_factory, cache_dir):
    """Run three generations against SCRIPT; return the evolution, its archive and the server's log."""
    tmp_path = tmp_path_factory.mktemp("acceptance")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    with FakeOpenAIServer(SCRIPT) as server:
        proposer_config = ProposerConfig(kind="openai", model=MODEL, base_url=server.base_url, retry_base_s=0.001,
                                         temperature=0.8, price_table=str(prices))
        config = RunConfig(
            task=TOY_TASK,
            settings={"steps": 10},
            generations=3,
            max_attempts=3,
            run_dir=str(tmp_path / "run"),
            cache_dir=str(cache_dir),
            sandbox=SandboxConfig(backend="process", unit_test_timeout_s=60, train_timeout_s=120),
            proposer=proposer_config,
        )
        context = open_run(config, None, {})
        options = LoopOptions(generations=3, max_attempts=3, seed=0, context=ContextOptions.from_config(proposer_config))
        proposer = ObservedProposer(choose_proposer(proposer_config, context.archive))
        evolution = Evolution(context.task, context.settings, context.archive, build_pipeline(context),
                              proposer, QuietReporter(), options)
        evolution.add_seeds(context.task.seeds())
        evolution.run()
        url = server.base_url
        requests = list(server.requests)
        billed = server.billed_tokens()
        remaining = server.remaining
    archive = context.archive
    return {
        "evolution": evolution,
        "archive": archive,
        "url": url,
        "requests": requests,
        "billed": billed,
        "remaining": remaining,
        "outcomes": list(proposer.outcomes),
        "totals": archive.llm_totals(),
        "calls": {row["candidate_id"]: row for row in archive.llm_calls()},
    }


def test_scripted_run_completes(acceptance):
    archive = acceptance["archive"]
    assert archive.get_meta("completed_generations") == 3
    assert acceptance["remaining"] == 0
    proposals = [(c.id, c.name, c.status) for c in archive.iter_proposals()]
    assert proposals == [
        ("g001-a01", "softplus_margin", Status.EVALUATED),
        ("g002-a01", "mean_loss", Status.REJECTED),
        ("g002-a02", "squared_margin", Status.EVALUATED),
        ("g003-a01", "tidy_logistic", Status.DUPLICATE),
        ("g003-a02", "scaled_logistic", Status.EVALUATED),
    ]
    assert archive.get("g002-a01").stage is Stage.UNIT_TEST
    assert archive.get("g003-a01").duplicate_of == "seed-dpo"
    assert all(c.model == MODEL for c in archive.iter_proposals())
    # no cut-off or empty reply became a candidate
    assert all(c.stage is not Stage.PARSE for c in archive.iter_proposals())


def test_archive_accounts_for_every_request(acceptance):
    totals = acceptance["totals"]
    requests = acceptance["requests"]
    assert len(requests) == 11
    assert totals["requests"] == 11
    assert totals["calls"] == 5
    assert totals["retries"] == 6  # 1 after the 429, 3 after the 500s, 2 after the cut-off and empty replies
    assert totals["failed_calls"] == 0
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == acceptance["billed"]
    # $1 per million prompt tokens and $2 per million completion tokens, summed over what the server billed
    prompt, completion = acceptance["billed"]
    assert totals["cost_usd"] == pytest.approx((prompt * 1.0 + completion * 2.0) / 1_000_000)


def test_each_call_lists_its_retries(acceptance):
    calls = acceptance["calls"]
    assert [json.loads(calls["g001-a01"]["retry_errors"])] == [[]]
    assert json.loads(calls["g002-a02"]["retry_errors"]) == ["HTTP 429: rate limited"]
    assert json.loads(calls["g003-a01"]["retry_errors"]) == ["HTTP 500: internal error"] * 3
    cut_off, empty = json.loads(calls["g003-a02"]["retry_errors"])
    assert "cut off" in cut_off
    assert empty == "EmptyReply: the reply was empty"
    assert [calls[i]["requests"] for i in ("g001-a01", "g002-a01", "g002-a02", "g003-a01", "g003-a02")] == [1, 1, 2, 4, 3]
    assert all(row["temperature"] == 0.8 and row["served_model"] == MODEL for row in calls.values())


def test_loop_reports_outcomes_to_proposer(acceptance):
    archive = acceptance["archive"]
    best = max(seed.fitness for seed in archive.seeds())
    expected = []
    for candidate in archive.iter_proposals():
        improved = candidate.status is Status.EVALUATED and candidate.fitness > best
        expected.append((MODEL, improved))
        if improved:
            best = candidate.fitness
    assert acceptance["outcomes"] == expected


def test_rejection_is_fed_back_and_retries_resend(acceptance):
    requests = acceptance["requests"]
    feedback = requests[2].messages[-1]
    assert feedback["role"] == "user"
    assert feedback["content"].startswith(INVALID_PREFIX)
    assert "shape" in feedback["content"]
    # a retried request sends the same conversation again
    assert requests[3].messages == requests[2].messages
    assert requests[4].messages == requests[7].messages
    assert all(r.temperature == 0.8 and r.max_tokens == 2048 for r in requests)


def test_endpoint_down_stops_run(acceptance):
    """The server of the acceptance run is closed now, so nothing listens on its port."""
    evolution = acceptance["evolution"]
    archive = acceptance["archive"]
    evolution.options = LoopOptions(generations=4, max_attempts=3, seed=0)
    with pytest.raises(ProposerUnavailable) as caught:
        evolution.run()
    message = str(caught.value)
    assert acceptance["url"] in message
    assert "Connection refused" in message
    assert archive.get_meta("completed_generations") == 3
    assert archive.candidates("generation=?", (4,)) == []
    failed = archive.llm_calls()[-1]
    assert failed["candidate_id"] == ""
    assert failed["requests"] == 4  # the circuit breaker opens after 4 consecutive failures
    assert acceptance["url"] in failed["error"]
    assert archive.events("proposer_unavailable")[-1]["detail"]["generation"] == 4


def evolve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "engine.cli", *args]
    # a wide console keeps rich from wrapping the messages the tests look for
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "500"}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_meta(run_dir: Path, key: str):
    with sqlite3.connect(f"file:{run_dir / 'archive.sqlite'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT value FROM run WHERE key=?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def test_cli_dead_endpoint_names_url_and_error(tmp_path, cache_dir):
    url = f"http://127.0.0.1:{unused_port()}/v1"
    retry = tmp_path / "retry.toml"
    retry.write_text("[proposer]\nretry_base_s = 0.001\n")
    run_dir = tmp_path / "run"
    result = evolve("--task", TOY_TASK, *SETTINGS, "--generations", "2", "--sandbox", "process",
                    "--base-url", url, "--model", MODEL, "--config", str(retry),
                    "--run-dir", str(run_dir), "--cache-dir", str(cache_dir), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert url in output
    assert "Connection refused" in output
    assert f"continue with: evolve --resume {run_dir}" in output
    assert run_meta(run_dir, "completed_generations") is None
    assert run_meta(run_dir, "status") == "stopped"
    calls = Archive.open_run(run_dir).llm_calls()
    assert [(c["requests"], c["candidate_id"]) for c in calls] == [(4, "")]


def test_cli_cost_limit_stops_before_call(tmp_path, cache_dir):
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({MODEL: {"prompt_per_mtok": 0.0, "completion_per_mtok": 4.0}}))
    run_dir = tmp_path / "run"
    # each reply bills 1000 completion tokens at $4/M = $0.004, and each call could cost up to
    # max_tokens 1000 * $4/M = $0.004. After two calls 0.008 + 0.004 = 0.012 > 0.01: the third is not sent.
    with FakeOpenAIServer([Reply(SHELL, completion_tokens=1000)] * 3) as server:
        flags = ["--base-url", server.base_url, "--model", MODEL, "--max-cost", "0.01", "--price-table", str(prices),
                 "--max-completion-tokens", "1000", "--max-attempts", "1"]
        result = evolve("--task", TOY_TASK, *SETTINGS, "--generations", "3", "--sandbox", "process", *flags,
                        "--run-dir", str(run_dir), "--cache-dir", str(cache_dir), cwd=tmp_path)
        output = result.stdout + result.stderr
        assert result.returncode == 3, output[-3000:]
        assert len(server.requests) == 2
        assert "$0.0080 of the $0.0100 limit (--max-cost) is spent" in output
        assert "could cost up to $0.0040" in output
        assert run_meta(run_dir, "completed_generations") == 2
        assert Archive.open_run(run_dir).llm_totals()["cost_usd"] == pytest.approx(0.008)

        # the ledger is in the archive, so a resumed run stops before sending anything
        resumed = evolve("--resume", str(run_dir), cwd=tmp_path)
        assert resumed.returncode == 3, (resumed.stdout + resumed.stderr)[-3000:]
        assert len(server.requests) == 2
        assert "$0.0080 of the $0.0100 limit" in resumed.stdout
    assert run_meta(run_dir, "completed_generations") == 2
