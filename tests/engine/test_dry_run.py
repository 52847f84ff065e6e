from engine.cli import main


def test_study_preset_dry_run_prints_plan(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["--task", "preference", "--preset", "zephyr-7b-gemma", "--dry-run"])
    output = capsys.readouterr().out
    assert code == 0
    assert "HuggingFaceH4/zephyr-7b-gemma-sft-v0.1" in output
    assert "argilla/dpo-mix-7k" in output
    assert "loss beta:        0.05" in output
    assert "learning rate 5e-07" in output
    assert "epochs:           2" in output
    assert "2 per device x 8 accumulation" in output


def test_cpu_preset_dry_run_lists_settings(capsys):
    code = main(["--task", "preference", "--dry-run", "--set", "beta=0.2"])
    output = capsys.readouterr().out
    assert code == 0
    assert "beta = 0.2" in output
    assert "process warm start on" in output


def test_dry_run_shows_warm_start_off(capsys):
    code = main(["--task", "preference", "--dry-run", "--no-warm-start"])
    output = capsys.readouterr().out
    assert code == 0
    assert "process warm start off" in output
