"""`evolve train`: resolving losses to programs, the training through the real pipeline, and the history log."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.commands import train
from evaluators.preference.losses import LOSSES, get_loss
from seeds import SEEDS_DIR, read_seed
from sandbox.process_backend import network_isolation_available

needs_isolation = pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here")

TWO_FORM_LOSSES = sorted(name for name, spec in LOSSES.items() if spec.has_two_forms)


def program_function(program: train.LossProgram):
    """Execute a library program in a fresh namespace; seed programs are our own trusted code."""
    namespace: dict = {}
    exec(compile(program.code, f"<seed {program.name}>", "exec"), namespace)
    return namespace[program.name]


# --- resolving --loss ----------------------------------------------------------------------------


def test_alias_resolves_to_seed_program():
    program = train.resolve_loss_program("discopop")
    assert program.name == "lrml"
    assert program.source == "library"
    assert program.form == "beta_consistent"
    assert program.path == str(SEEDS_DIR / "preference" / "lrml.py")
    assert program.code == read_seed(SEEDS_DIR / "preference" / "lrml.py").code
    assert program.formula == LOSSES["lrml"].formula
    assert train.resolve_loss_program("sigmoid").name == "dpo"
    assert train.resolve_loss_program("hinge").name == "slic"


def test_as_written_form_reads_its_own_file():
    program = train.resolve_loss_program("lrml", "as_written")
    assert program.path == str(SEEDS_DIR / "preference" / "as_written" / "lrml.py")
    assert program.code != train.resolve_loss_program("lrml").code
    # a loss with one version runs the same program in both forms
    assert train.resolve_loss_program("slic", "as_written").code == train.resolve_loss_program("slic").code


def test_as_written_files_cover_two_form_losses():
    on_disk = sorted(path.stem for path in (SEEDS_DIR / "preference" / "as_written").glob("*.py"))
    assert on_disk == TWO_FORM_LOSSES


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("name", TWO_FORM_LOSSES)
def test_as_written_program_matches_library(name, beta):
    generator = torch.Generator().manual_seed(11)
    inputs = tuple(-50 + 15 * torch.randn(12, generator=generator, dtype=torch.float64) for _ in range(4))
    function = program_function(train.resolve_loss_program(name, "as_written"))
    expected = get_loss(name, "as_written")(*inputs, beta=beta)
    torch.testing.assert_close(function(SimpleNamespace(beta=beta), *inputs), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", TWO_FORM_LOSSES)
def test_as_written_program_matches_library_at_extremes(name):
    # rho = +-1e4 at beta 0.1 puts beta * rho at +-1000, where a plain exp overflows
    half = torch.tensor([-1e4, -3.0, 0.0, 2.0, 1e4]) / 2
    reference = torch.full_like(half, -40.0)
    inputs = (reference + half, reference - half, reference, reference.clone())
    function = program_function(train.resolve_loss_program(name, "as_written"))
    expected = get_loss(name, "as_written")(*inputs, beta=0.1)
    torch.testing.assert_close(function(SimpleNamespace(beta=0.1), *inputs), expected, rtol=1e-6, atol=1e-6)


def test_file_resolves_to_its_code(tmp_path):
    path = tmp_path / "my_loss.py"
    path.write_text("def my_loss(self, a, b, c, d):\n    return a\n")
    program = train.resolve_loss_program(str(path))
    assert (program.name, program.source, program.form) == ("my_loss", "file", "")
    assert program.code == path.read_text()
    with pytest.raises(ValueError, match="--form as_written applies to library losses only"):
        train.resolve_loss_program(str(path), "as_written")
    with pytest.raises(ValueError, match="loss file .*missing.py not found"):
        train.resolve_loss_program(str(tmp_path / "missing.py"))


# --- usage errors, which exit before any sandbox starts -----------------------------------------


def test_unknown_loss_suggests_close_name(tmp_path, capsys):
    assert train.main(["--loss", "dpoo", "--cache-dir", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "unknown loss 'dpoo'. Did you mean 'dpo'?" in out
    assert "Known losses: aqfl, aql, cell, dbaql, dpo" in out
    assert not (tmp_path / "train").exists()


def test_invalid_preset_setting_timeout(tmp_path, capsys):
    assert train.main(["--loss", "dpo", "--preset", "huge", "--cache-dir", str(tmp_path)]) == 2
    assert "preset 'huge' is not defined for task 'preference'" in capsys.readouterr().out
    assert train.main(["--loss", "dpo", "--set", "betta=0.1", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown task setting(s) ['betta']" in capsys.readouterr().out
    assert train.main(["--loss", "dpo", "--train-timeout", "0", "--cache-dir", str(tmp_path)]) == 2
    assert "invalid --train-timeout 0.0" in capsys.readouterr().out


# --- history log ---------------------------------------------------------------------------------


def test_history_appends_and_skips_broken_lines(tmp_path):
    path = tmp_path / train.HISTORY_FILE
    train.append_history(path, {"loss": "dpo", "fitness": 0.5})
    with open(path, "a") as handle:
        handle.write("not json\n[1, 2]\n")
    train.append_history(path, {"loss": "lrml", "fitness": 0.6})
    assert train.read_history(path) == [{"loss": "dpo", "fitness": 0.5}, {"loss": "lrml", "fitness": 0.6}]
    assert train.read_history(tmp_path / "none.jsonl") == []


def test_history_table_lists_same_settings_only(tmp_path, capsys):
    path = tmp_path / train.HISTORY_FILE
    base = {"task": "preference", "form": "beta_consistent", "seed": 0, "status": "evaluated", "reward": 0.5, "kl": 1.0}
    train.append_history(path, {**base, "loss": "dpo", "settings_key": "aaaa", "fitness": 0.41})
    train.append_history(path, {**base, "loss": "slic", "settings_key": "bbbb", "fitness": 0.99})
    record = {**base, "loss": "lrml", "settings_key": "aaaa", "fitness": 0.43}
    train.append_history(path, record)
    train.print_history(path, record)
    out = capsys.readouterr().out
    assert "0.4100" in out
    assert "0.4300" in out
    assert "slic" not in out


def test_work_dirs_never_collide(tmp_path):
    first = train.new_work_dir(tmp_path, "dpo-seed0-20260101-000000")
    second = train.new_work_dir(tmp_path, "dpo-seed0-20260101-000000")
    assert first.name == "dpo-seed0-20260101-000000"
    assert second.name == "dpo-seed0-20260101-000000-2"


# --- a real training: process sandbox, TRL, SmolLM2 on the tiny preset ---------------------------


@pytest.mark.slow
@needs_isolation
def test_train_library_loss_on_tiny_preset(preference_tiny_cache, capsys):
    argv = ["--loss", "dpo", "--preset", "tiny", "--set", "max_steps=1", "--sandbox", "process",
            "--cache-dir", str(preference_tiny_cache), "--json"]
    assert train.main(argv) == 0
    record = json.loads(capsys.readouterr().out)

    assert record["status"] == "evaluated"
    assert (record["loss"], record["form"], record["backend"]) == ("dpo", "beta_consistent", "process")
    assert record["overrides"] == {"max_steps": 1}
    assert record["steps"] == 1
    # the fitness is the reward minus 0.05 per nat of KL above 10 nats (the tiny preset's kl_penalty and kl_limit)
    assert record["fitness"] == pytest.approx(record["reward"] - 0.05 * max(0.0, record["kl"] - 10.0))
    assert -1.0 <= record["reward"] <= 1.0
    assert record["reward_gain"] == pytest.approx(record["reward"] - record["reward_reference"])
    for key in ("unit_test_s", "evaluate_s", "train_s", "eval_s"):
        assert record["times_s"][key] > 0, key

    # the job ran through the pipeline in its own scratch archive, and the log contains the record
    work_dir = Path(record["work_dir"])
    assert (work_dir / "archive.sqlite").is_file()
    assert (work_dir / "jobs" / "train-dpo" / "evaluate" / "result.json").is_file()
    history = train.read_history(preference_tiny_cache / train.HISTORY_FILE)
    assert history[-1] == record
