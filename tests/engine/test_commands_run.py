"""The run-reading commands (audit, show, plot, export, rerun) on one real run of the toy task.

The run is driven by the real loop with a scripted proposer, real static
checks, real sandbox worker processes and real training, as in test_loop.py.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys

import pytest

from engine.archive import Archive
from engine.candidate import Candidate, Origin, Status
from engine.cli import main as cli
from sandbox.protocol import Stage
from tests.engine.test_loop import (
    HEADER,
    MARGIN,
    MEAN,
    NOT_JSON,
    RENAMED_DPO,
    SOFTPLUS,
    SYSTEM_CALL,
    make_evolution,
    reply,
)

# line 6 of the code indexes past the end of a list, so the worker names "candidate line 6"
OUT_OF_RANGE = reply("out_of_range", MARGIN + "    scale = [1.0, 2.0][5]\n    return -F.logsigmoid(scale * rho)\n")
SQUARED = reply("squared_margin", MARGIN + "    return (self.beta * rho - 1.0) ** 2\n")
REPLIES = [SYSTEM_CALL, MEAN, NOT_JSON, SOFTPLUS, OUT_OF_RANGE, RENAMED_DPO, SQUARED]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Run two generations: g1 = os.system, mean, unparsable, softplus; g2 = out of range, duplicate DPO, squared."""
    tmp_path = tmp_path_factory.mktemp("commands")
    evolution, _, archive = make_evolution(tmp_path, "tests.support.toy_task:ToyTask", REPLIES, generations=2)
    archive.log_event("start", {"resume": False, "generations": 2})
    evolution.judge_unfinished()
    evolution.run()
    archive.log_event("finish", {})
    archive.close()
    return tmp_path / "run"


def run_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert cli(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def archive_digest(run_dir) -> str:
    return hashlib.sha256((run_dir / "archive.sqlite").read_bytes()).hexdigest()


def by_name(run_dir) -> dict[str, Candidate]:
    archive = Archive.open_run(run_dir)
    try:
        return {c.name: c for c in archive.candidates()}
    finally:
        archive.close()


# audit


def test_audit_groups_by_stage(run_dir, capsys):
    payload = run_json(capsys, "audit", str(run_dir), "--json")
    assert payload["rejected"] == 5
    assert payload["by_stage"] == {"parse": 1, "static": 1, "duplicate": 1, "unit_test": 2}
    patterns = {(g["stage"], g["category"]): g for g in payload["groups"]}
    shape = patterns[("unit_test", "shape")]
    assert shape["count"] == 1
    assert shape["pattern"] == "output shape () != (B,)=(N,)"
    duplicate = patterns[("duplicate", "duplicate")]
    assert duplicate["pattern"].startswith("duplicate of ID: ")
    assert patterns[("static", "import")]["candidate_ids"] == ["g001-a01"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--stage", "static"], ["shell_out"]),
        (["--reason", "SHAPE"], ["mean_loss"]),
        (["--generation", "2"], ["out_of_range", "tidy_logistic"]),
        (["--stage", "unit_test", "--generation", "1"], ["mean_loss"]),
    ],
)
def test_audit_filters(run_dir, capsys, flags, expected):
    payload = run_json(capsys, "audit", str(run_dir), "--json", *flags)
    assert [r["name"] for r in payload["rejections"]] == expected


def test_audit_table_lists_reasons(run_dir, capsys):
    assert cli(["audit", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "5 of 9 candidates" in out
    assert "by stage" in out
    assert "g001-a02" in out


def test_audit_static_candidate_marks_line(run_dir, capsys):
    record = run_json(capsys, "audit", str(run_dir), "g001-a01", "--json")
    assert record["stage"] == "static"
    assert record["offending_lines"] == [1, 6]
    assert record["feedback"].startswith("Code not valid. Error:")

    assert cli(["audit", str(run_dir), "g001-a01"]) == 0
    out = capsys.readouterr().out
    assert "1 >> import os" in out
    assert "6 >>     os.system" in out
    assert "feedback sent to the proposer" in out


def test_audit_runtime_error_line(run_dir, capsys):
    record = run_json(capsys, "audit", str(run_dir), "g002-a01", "--json")
    assert record["name"] == "out_of_range"
    assert "candidate line 6" in record["reason"]
    assert record["offending_lines"] == [6]
    assert "unit_test_s" in record["timings"]
    assert record["log_tail"]


def test_audit_parse_failure_shows_reply(run_dir, capsys):
    assert cli(["audit", str(run_dir), "g001-a03"]) == 0
    out = capsys.readouterr().out
    assert "raw reply below" in out
    assert "hinge loss would be good" in out


def test_audit_static_line_from_check(tmp_path, capsys, toy_task_name):
    # a reason without "line N" (as an older archive may hold): the line comes from the static check again
    archive = Archive(tmp_path / "archive.sqlite")
    archive.set_meta("config", {"task": toy_task_name})
    code = "import torch\n\n" + HEADER.format(name="reads_env") + MARGIN + "    return torch.relu(rho) + eval('1')\n"
    archive.insert(Candidate(id="g001-a01", generation=1, attempt=1, origin=Origin.PROPOSER, name="reads_env",
                             code=code, status=Status.REJECTED, stage=Stage.STATIC, category="forbidden_name",
                             reason="eval is not allowed"))
    archive.close()
    record = run_json(capsys, "audit", str(tmp_path), "g001-a01", "--json")
    assert record["offending_lines"] == [5]


def test_audit_unknown_id_and_missing_run(run_dir, tmp_path, capsys):
    assert cli(["audit", str(run_dir), "g009-a09"]) == 2
    assert "no candidate 'g009-a09'" in capsys.readouterr().out
    assert cli(["audit", str(tmp_path / "nowhere")]) == 2
    assert "not found" in capsys.readouterr().out
    assert cli(["show", str(tmp_path)]) == 2
    assert "contains no archive.sqlite" in capsys.readouterr().out


# show


def test_show_leaderboard_and_totals(run_dir, capsys):
    payload = run_json(capsys, "show", str(run_dir), "--json")
    board = payload["leaderboard"]
    fitness = [row["fitness"] for row in board]
    assert fitness == sorted(fitness, reverse=True)
    assert {row["name"] for row in board} == {"dpo", "hinge", "softplus_margin", "squared_margin"}
    assert {row["name"] for row in board if row["origin"] == "seed"} == {"dpo", "hinge"}

    totals = payload["totals"]
    assert totals["counts"] == {"evaluated": 4, "rejected": 4, "duplicate": 1}
    # seven scripted replies, each recorded with 100 prompt and 50 completion tokens
    assert totals["llm"]["calls"] == 7
    assert totals["llm"]["prompt_tokens"] == 700
    assert totals["llm"]["completion_tokens"] == 350
    assert totals["sessions"] == 1
    assert totals["wall_s"] > 0
    assert totals["generations"] == 2


def test_show_lineage_lists_context(run_dir, capsys):
    payload = run_json(capsys, "show", str(run_dir), "--json")
    lineage = {entry["name"]: entry for entry in payload["lineage"]}
    # squared_margin (g002-a03) saw both seeds and the six earlier judged proposals
    context = [c["id"] for c in lineage["squared_margin"]["context"]]
    assert context == ["seed-dpo", "seed-hinge", "g001-a01", "g001-a02", "g001-a03", "g001-a04", "g002-a01", "g002-a02"]

    assert cli(["show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "leaderboard" in out
    assert "lineage" in out
    assert "LLM calls" in out


def test_read_commands_leave_archive_unchanged(run_dir, tmp_path, capsys):
    before = archive_digest(run_dir)
    for argv in (["audit", str(run_dir)], ["audit", str(run_dir), "g001-a02"], ["show", str(run_dir)],
                 ["export", str(run_dir), "g001-a04", "--out", str(tmp_path / "x.py")]):
        assert cli(argv) == 0
    assert archive_digest(run_dir) == before


def test_commands_read_a_live_run(run_dir, tmp_path, capsys):
    # a writer connection (the engine of a running run) is open and has a candidate in flight
    live = tmp_path / "live"
    live.mkdir()
    (live / "archive.sqlite").write_bytes((run_dir / "archive.sqlite").read_bytes())
    writer = Archive.open_run(live, read_only=False)
    try:
        writer.insert(Candidate(id="g003-a01", generation=3, attempt=1, origin=Origin.PROPOSER, name="in_flight",
                                code="", status=Status.TRAINING))
        payload = run_json(capsys, "show", str(live), "--json")
        assert payload["totals"]["counts"]["training"] == 1
        assert payload["totals"]["status"] == "running or killed"
        audit = run_json(capsys, "audit", str(live), "--json")
        assert audit["candidates"] == 10
    finally:
        writer.close()


# plot


def test_plot_writes_pngs(run_dir, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "plots"
    assert cli(["plot", str(run_dir), "--out", str(out), "--top", "2", "--points", "41"]) == 0
    for name in ("fitness_by_generation.png", "loss_shapes.png", "training_curves.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300, name
        assert image.shape[1] > 600, name
        # not a blank canvas: at least a few percent of the pixels are not white
        assert (image[..., :3] < 0.9).any(axis=-1).mean() > 0.02, name


# export


def test_export_module_runs_without_evolve(run_dir, tmp_path, capsys):
    path = tmp_path / "softplus_margin.py"
    assert cli(["export", str(run_dir), "g001-a04", "--out", str(path)]) == 0
    text = path.read_text()
    loss = next(node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef))
    assert [a.arg for a in loss.args.args] == ["policy_chosen_logps", "policy_rejected_logps",
                                               "reference_chosen_logps", "reference_rejected_logps", "beta"]
    assert ast.literal_eval(loss.args.defaults[-1]) == 1.0
    assert "self" not in ast.unparse(loss)
    assert "Run run, candidate g001-a04" in text
    assert "try softplus_margin" in text

    # softplus(1 - beta * rho) with beta 1.0 (the toy run's value, the default keyword):
    # rho = 0 -> log(1 + e) = 1.3133; rho = 1 -> log 2 = 0.6931
    script = (
        "import importlib.util, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('exported', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "zero = torch.zeros(2)\n"
        "print(module.softplus_margin(torch.tensor([0.0, 1.0]), zero, zero, zero).tolist())\n"
        "print(module.SoftplusMarginDPOTrainer.__mro__[1].__module__)\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'engine', 'sandbox', 'evaluators'}))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    child = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr
    values, base, ours = child.stdout.strip().splitlines()[-3:]
    assert json.loads(values) == pytest.approx([math.log(1 + math.e), math.log(2)], abs=1e-6)
    assert base.startswith("trl.")
    assert ours == "[]"


def test_export_unparsed_candidate_fails(run_dir, tmp_path, capsys):
    assert cli(["export", str(run_dir), "g001-a03", "--out", str(tmp_path / "x.py")]) == 1
    assert "has no code" in capsys.readouterr().out


# rerun


def test_rerun_reproduces_fitness(run_dir, capsys):
    before = by_name(run_dir)["softplus_margin"]
    detail = run_json(capsys, "rerun", str(run_dir), "g001-a04", "--json")
    # the toy task trains full-batch SGD from zero weights on a fixed draw, so the same seed gives the same accuracy
    assert detail["rerun_status"] == "evaluated"
    assert detail["rerun_fitness"] == before.fitness
    assert detail["difference"] == 0.0
    assert detail["seed"] == 0

    after = by_name(run_dir)["softplus_margin"]
    assert after.updated_at == before.updated_at
    assert after.fitness == before.fitness
    archive = Archive.open_run(run_dir, read_only=True)
    try:
        events = archive.events("rerun")
    finally:
        archive.close()
    assert [e["detail"]["candidate_id"] for e in events][-1] == "g001-a04"

    audit = run_json(capsys, "audit", str(run_dir), "g001-a04", "--json")
    assert audit["reruns"][-1]["rerun_fitness"] == before.fitness


def test_rerun_seed_trains_again(run_dir, capsys):
    # a seed's fitness is normally taken from the baseline cache; a rerun must train it
    detail = run_json(capsys, "rerun", str(run_dir), "seed-hinge", "--seed", "3", "--json")
    assert detail["seed"] == 3
    assert detail["rerun_status"] == "evaluated"
    assert "evaluate_s" in detail["rerun_timings"]


def test_rerun_rejected_candidate(run_dir, capsys):
    capsys.readouterr()
    assert cli(["rerun", str(run_dir), "g001-a02", "--json"]) == 1
    detail = json.loads(capsys.readouterr().out)
    assert detail["rerun_status"] == "rejected"
    assert detail["rerun_stage"] == "unit_test"
    assert detail["difference"] is None
    assert cli(["rerun", str(run_dir), "g001-a03"]) == 1
    assert "nothing to rerun" in capsys.readouterr().out


def test_wall_time_counts_sessions(tmp_path, capsys):
    # the first session starts at t=100 and finishes at t=160: 60 s.
    # The second starts at t=200 and is killed after its last candidate write at t=250: 50 s.
    archive = Archive(tmp_path / "archive.sqlite")
    for kind in ("start", "finish", "start"):
        archive.log_event(kind, {})
    for index in (1, 2):
        archive.insert(Candidate(id=f"g001-a0{index}", generation=1, attempt=index, origin=Origin.PROPOSER,
                                 name=f"c{index}", code=""))
    archive.close()
    with sqlite3.connect(tmp_path / "archive.sqlite") as db:
        for event_id, created_at in ((1, 100.0), (2, 160.0), (3, 200.0)):
            db.execute("UPDATE events SET created_at=? WHERE id=?", (created_at, event_id))
        for candidate_id, written in (("g001-a01", 230.0), ("g001-a02", 250.0)):
            db.execute("UPDATE candidates SET created_at=?, updated_at=? WHERE id=?", (written, written, candidate_id))
    totals = run_json(capsys, "show", str(tmp_path), "--json")["totals"]
    assert totals["wall_s"] == pytest.approx(110.0)
    assert totals["sessions"] == 2



def test_show_names_default_preset():
    from engine.commands.show import preset_name

    # a run that chose no preset ran the task's default, which show names as dry-run and check do
    assert preset_name({"task": "preference", "preset": ""}) == "cpu"
    assert preset_name({"task": "preference", "preset": "tiny"}) == "tiny"
    assert preset_name({"task": "not.installed:Task"}) == "the task's default"
