"""`evolve heldout` on a toy run: a discovered candidate trained again under the preference task's tiny preset.

The run is a real one-generation run of the toy task (scripted proposer, real
sandbox processes). The held-out evaluations train SmolLM2-135M for 2 steps
in the process sandbox; the judge is a scripted server on 127.0.0.1.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from engine.archive import Archive
from engine.cli import main as cli
from sandbox.process_backend import network_isolation_available
from tests.engine.test_loop import SOFTPLUS, make_evolution
from tests.support.fake_judge_server import FakeJudgeServer, user_text
from tests.support.fake_openai_server import Reply

needs_isolation = pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One generation of the toy task: the seeds dpo and hinge, then the proposal softplus_margin (g001-a01)."""
    tmp_path = tmp_path_factory.mktemp("heldout")
    evolution, _, archive = make_evolution(tmp_path, "tests.support.toy_task:ToyTask", [SOFTPLUS], generations=1)
    evolution.judge_unfinished()
    evolution.run()
    archive.close()
    return tmp_path / "run"


def candidate_rows(run_dir) -> list[tuple]:
    with sqlite3.connect(run_dir / "archive.sqlite") as db:
        return db.execute("SELECT * FROM candidates ORDER BY seq").fetchall()


def heldout_events(run_dir) -> list[dict]:
    archive = Archive.open_run(run_dir)
    try:
        return [event["detail"] for event in archive.events("heldout")]
    finally:
        archive.close()


def run_json(capsys, *argv) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli(list(argv))
    return code, json.loads(capsys.readouterr().out)


@needs_isolation
def test_sentiment_recorded_next_to_original(run_dir, preference_tiny_cache, capsys):
    original = {row[1]: row for row in candidate_rows(run_dir)}["g001-a01"]
    before = candidate_rows(run_dir)
    # --train-timeout: the toy run's 120 s limit is too short for SmolLM2 on a shared CPU
    code, detail = run_json(capsys, "heldout", str(run_dir), "g001-a01", "--eval", "sentiment", "--preset", "tiny",
                            "--cache-dir", str(preference_tiny_cache), "--train-timeout", "1200", "--json")
    assert code == 0, detail["heldout_reason"]
    assert detail["name"] == "softplus_margin"
    assert detail["original_task"] == "tests.support.toy_task:ToyTask"
    assert detail["original_status"] == "evaluated"
    assert detail["original_fitness"] == original[15]  # the fitness column
    assert detail["heldout_status"] == "evaluated"
    assert detail["task"] == "preference"
    assert isinstance(detail["heldout_fitness"], float)
    assert -1.0 <= detail["heldout_fitness"] <= 1.0  # a VADER reward, minus a KL penalty that 2 steps do not reach
    assert "reward" in detail["heldout_metrics"]
    assert "kl" in detail["heldout_metrics"]

    # the run gets an event, its candidates table stays as it was
    assert heldout_events(run_dir)[-1] == detail
    assert candidate_rows(run_dir) == before
    assert (run_dir / "heldout").is_dir()


def rate_six(messages):
    """Grade every answer 6."""
    return Reply("The assistant answered. Rating: [[6]]")


@needs_isolation
def test_mtbench_with_scripted_judge(run_dir, preference_tiny_cache, tmp_path, capsys):
    questions = tmp_path / "question.jsonl"
    questions.write_text(
        '{"question_id": "q1", "category": "writing", "turns": ["Write one line about rain.", "Make it rhyme."]}\n'
        '{"question_id": "q2", "category": "math", "turns": ["What is 3 + 4?", "Times 2?"], '
        '"reference": ["7", "14"]}\n'
    )
    before = candidate_rows(run_dir)

    with FakeJudgeServer(rate_six) as server:
        code, detail = run_json(
            capsys, "heldout", str(run_dir), "g001-a01", "--eval", "mtbench", "--preset", "tiny",
            "--cache-dir", str(preference_tiny_cache), "--train-timeout", "1200", "--questions", str(questions),
            "--max-new-tokens", "4",
            "--judge-url", server.base_url, "--judge-model", "fake-judge", "--judge-workers", "1", "--json",
        )
        prompts = [user_text(request.messages) for request in server.requests]

    assert code == 0, detail["heldout_reason"]
    assert detail["heldout_status"] == "evaluated"
    assert detail["heldout_fitness"] == pytest.approx(6.0)
    assert detail["heldout_fitness_kind"].startswith("MT-Bench score")
    judged = detail["judged"]
    assert judged["graded"] == 4
    assert judged["unparseable"] == 0
    assert judged["turn_scores"] == {"1": 6.0, "2": 6.0}
    assert judged["score_se"] == 0.0
    assert judged["judge_model"] == "fake-judge"
    assert len(prompts) == 4
    # the math question is graded against its reference answers
    assert "[Reference answer]\n7" in prompts[2]
    # the sentiment fitness of the training job is kept beside the judged score
    assert isinstance(detail["training_fitness"], float)
    assert detail["training_fitness_kind"].startswith("sentiment reward")
    assert heldout_events(run_dir)[-1]["evaluation"] == "mtbench"
    assert candidate_rows(run_dir) == before


def test_needs_candidate_or_loss(run_dir, capsys):
    assert cli(["heldout", str(run_dir), "--eval", "sentiment"]) == 2
    assert "pass a candidate ID or --loss NAME" in capsys.readouterr().out


def test_sentiment_rejects_study_preset(run_dir, capsys):
    assert cli(["heldout", str(run_dir), "g001-a01", "--eval", "sentiment", "--preset", "zephyr-7b-gemma"]) == 2
    assert "--preset must be one of ['cpu', 'tiny']" in capsys.readouterr().out


def test_unknown_candidate_suggests_ids(run_dir, capsys):
    assert cli(["heldout", str(run_dir), "g001-a1", "--eval", "sentiment"]) == 2
    assert "Did you mean g001-a01?" in capsys.readouterr().out


def scratch_dirs(run_dir) -> set[str]:
    return {path.name for path in (run_dir / "heldout").glob("*")}


def test_judge_without_key_fails_before_training(run_dir, monkeypatch, capsys):
    monkeypatch.delenv("EVOLVE_TEST_JUDGE_KEY", raising=False)
    before, events = scratch_dirs(run_dir), len(heldout_events(run_dir))
    code = cli(["heldout", str(run_dir), "g001-a01", "--eval", "mtbench", "--preset", "tiny",
                "--judge-api-key-env", "EVOLVE_TEST_JUDGE_KEY"])
    assert code == 2
    assert "EVOLVE_TEST_JUDGE_KEY" in capsys.readouterr().out
    assert scratch_dirs(run_dir) == before
    assert len(heldout_events(run_dir)) == events


def test_invalid_question_file_fails_before_training(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1}\n')
    code = cli(["heldout", str(run_dir), "g001-a01", "--eval", "mtbench", "--preset", "tiny",
                "--questions", str(bad), "--judge-url", "http://127.0.0.1:9/v1"])
    assert code == 2
    assert "line 1: missing field(s)" in capsys.readouterr().out
