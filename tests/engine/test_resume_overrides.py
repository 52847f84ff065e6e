from engine.config import ProposerConfig, RunConfig, SandboxConfig
from engine.runner import open_run


def test_resume_flags_keep_stored_values(tmp_path, toy_task_name):
    config = RunConfig(
        task=toy_task_name,
        generations=1,
        run_dir=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        proposer=ProposerConfig(kind="openai", base_url="http://127.0.0.1:9/v1", model="local-model"),
        sandbox=SandboxConfig(backend="process"),
    )
    open_run(config, None, {}).archive.close()

    resumed = open_run(None, tmp_path / "run", {"proposer": {"temperature": 0.5}, "generations": 3})
    assert resumed.config.proposer.temperature == 0.5
    assert resumed.config.proposer.base_url == "http://127.0.0.1:9/v1"
    assert resumed.config.proposer.model == "local-model"
    assert resumed.config.proposer.kind == "openai"
    assert resumed.config.generations == 3


def test_resume_missing_dir_names_it(tmp_path, capsys):
    from engine.cli import main

    missing = tmp_path / "no-such-run"
    assert main(["--resume", str(missing)]) == 2
    message = capsys.readouterr().out
    assert f"run directory {missing} not found" in message

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert main(["--resume", str(a_file)]) == 2
    assert "is not a directory" in capsys.readouterr().out
