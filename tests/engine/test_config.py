import pytest

from engine.config import ConfigError, RunConfig, config_from_dict, load_config_file


def test_config_defaults_are_valid():
    RunConfig().validate()


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as caught:
        config_from_dict(
            {
                "generations": -1,
                "colour": "blue",
                "sandbox": {"backend": "vm", "train_timeout_s": 0},
                "proposer": {"temperature": "hot"},
            }
        )
    problems = caught.value.problems
    assert any("unknown key 'colour'" in p for p in problems)
    assert any("temperature = 'hot'" in p for p in problems)
    assert any("generations = -1" in p for p in problems)
    assert any("sandbox.backend = 'vm'" in p for p in problems)


def test_config_validation_lists_all_bad_values():
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"generations": -1, "sandbox": {"backend": "vm", "train_timeout_s": 0}})
    text = str(caught.value)
    assert "generations = -1" in text
    assert "sandbox.backend = 'vm'" in text
    assert "sandbox.train_timeout_s = 0" in text


def test_config_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="missing.toml not found"):
        load_config_file(missing)
    broken = tmp_path / "broken.toml"
    broken.write_text("generations = = 3\n")
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        load_config_file(broken)


def test_config_from_toml_values(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('task = "preference"\ngenerations = 5\n[sandbox]\nbackend = "process"\ntrain_timeout_s = 300\n')
    config = config_from_dict(load_config_file(path))
    assert config.generations == 5
    assert config.sandbox.backend == "process"
    assert config.sandbox.train_timeout_s == 300.0


def test_warm_start_toml_and_cli(tmp_path):
    from engine.cli import _overrides_from_args, build_run_parser

    assert RunConfig().sandbox.warm_start is True
    path = tmp_path / "run.toml"
    path.write_text("[sandbox]\nwarm_start = false\n")
    assert config_from_dict(load_config_file(path)).sandbox.warm_start is False
    with pytest.raises(ConfigError, match=r"warm_start = 'no' has type str, expected bool \(true or false\)"):
        config_from_dict({"sandbox": {"warm_start": "no"}})
    parser = build_run_parser()
    assert _overrides_from_args(parser.parse_args(["--no-warm-start"]))["sandbox"] == {"warm_start": False}
    assert "sandbox" not in _overrides_from_args(parser.parse_args([]))
