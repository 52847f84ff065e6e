"""`evolve check` on replies and code files, with the preference task's real unit tests in the sandbox."""

from __future__ import annotations

import json

import pytest

from engine.cli import main as cli
from sandbox.process_backend import network_isolation_available
from tests.engine.test_loop import MARGIN, MEAN, NOT_JSON, SYSTEM_CALL, reply

VALID_DPO = reply("dpo_again", MARGIN + "    return -F.logsigmoid(self.beta * rho)\n")

needs_isolation = pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here")


def check(capsys, tmp_path, text: str, file_name: str, *flags: str) -> tuple[int, dict]:
    path = tmp_path / file_name
    path.write_text(text)
    capsys.readouterr()
    code = cli(["check", str(path), "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


@needs_isolation
def test_check_valid_dpo_reply(tmp_path, capsys):
    code, verdict = check(capsys, tmp_path, VALID_DPO, "reply.txt")
    assert code == 0
    assert verdict["valid"] is True
    assert verdict["name"] == "dpo_again"
    assert verdict["task"] == "preference"
    assert [stage["stage"] for stage in verdict["stages"]] == ["parse", "static", "unit_test"]
    assert all(stage["ok"] for stage in verdict["stages"])


@needs_isolation
def test_check_mean_reply_rejected_for_shape(tmp_path, capsys):
    code, verdict = check(capsys, tmp_path, MEAN, "reply.txt")
    assert code == 1
    assert verdict["valid"] is False
    assert verdict["stage"] == "unit_test"
    assert verdict["category"] == "shape"
    assert "shape ()" in verdict["reason"]

    # the table form names the stage and the reason
    assert cli(["check", str(tmp_path / "reply.txt")]) == 1
    out = capsys.readouterr().out
    assert "rejected at stage unit_test (shape)" in out


def test_check_python_file_static_rejection(tmp_path, capsys):
    source = json.loads(SYSTEM_CALL.split("```json\n")[1].split("\n```")[0])["code"]
    code, verdict = check(capsys, tmp_path, source, "shell_out.py")
    assert code == 1
    assert verdict["name"] == "shell_out"
    assert verdict["stage"] == "static"
    assert verdict["category"] == "import"
    assert verdict["line"] == 1
    # a .py file skips the parse stage
    assert [stage["stage"] for stage in verdict["stages"]] == ["static"]


def test_check_unparsable_reply(tmp_path, capsys):
    code, verdict = check(capsys, tmp_path, NOT_JSON, "reply.txt")
    assert code == 1
    assert verdict["stage"] == "parse"
    assert "could not be parsed" in verdict["reason"]


@needs_isolation
def test_check_toy_task_reference(tmp_path, capsys, toy_task_name):
    # a task given as module:Class reaches the worker by that reference
    code, verdict = check(capsys, tmp_path, VALID_DPO, "reply.txt", "--task", toy_task_name)
    assert code == 0
    assert verdict["task"] == "toy"


def test_check_usage_errors(tmp_path, capsys):
    assert cli(["check", str(tmp_path / "missing.py")]) == 2
    assert "missing.py not found" in capsys.readouterr().out
    (tmp_path / "reply.txt").write_text(VALID_DPO)
    assert cli(["check", str(tmp_path / "reply.txt"), "--task", "preferense"]) == 2
    assert "Did you mean 'preference'" in capsys.readouterr().out
    assert cli(["check", str(tmp_path / "reply.txt"), "--preset", "huge"]) == 2
    assert "preset 'huge' is not defined" in capsys.readouterr().out
