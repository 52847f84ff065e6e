"""The plugin API end to end: the example task installed as a third-party package, found by its entry point.

A throwaway virtual environment reuses this interpreter's packages, gets the
example package installed with pip, and runs the `evolve` command line there,
so the sandbox workers (started with that environment's interpreter) import
the plugin exactly as a user's installation would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from engine.archive import Archive
from engine.candidate import Status
from evaluators.registry import UnknownTaskError, get_task, list_tasks
from sandbox.loader import load_candidate

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_SOURCE = Path(__file__).resolve().parent / "evolve_example_task"
DOC = ROOT / "docs" / "writing-a-task.md"


def cli_environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.endswith("_API_KEY")}
    env["COLUMNS"] = "200"  # keep rich from wrapping the lines the tests search
    return env


def run_cli(python: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "engine.cli", *args], cwd=ROOT, env=cli_environment(), capture_output=True, text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory) -> Path:
    """Return the interpreter of a new virtual environment that has the example task installed."""
    base = tmp_path_factory.mktemp("plugin")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"

    # the new environment imports this one's packages (torch, RestrictedPython, rich, ...) through a .pth line
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    parent_site = sysconfig.get_path("purelib")
    Path(purelib, "evolve-parent-env.pth").write_text(f"import site; site.addsitedir({parent_site!r})\n")

    # install from a copy, so the build leaves no build/ or egg-info behind in the repository
    source = base / "evolve_example_task"
    shutil.copytree(PLUGIN_SOURCE, source)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--no-index", str(source)],
        check=True, timeout=300,
    )
    return python


def test_installed_plugin_is_listed(plugin_python):
    completed = run_cli(plugin_python, "tasks")
    assert completed.returncode == 0, completed.stderr
    listed = {line.split()[0] for line in completed.stdout.splitlines() if line.strip()}
    assert {"example", "classification", "preference"} <= listed


def test_misspelled_plugin_name_gets_a_suggestion(plugin_python):
    completed = run_cli(plugin_python, "--task", "exampel", "--generations", "0")
    assert completed.returncode != 0
    assert "Did you mean 'example'?" in completed.stdout + completed.stderr


def test_installed_plugin_runs_in_the_process_sandbox(plugin_python, tmp_path):
    run_dir = tmp_path / "run"
    completed = run_cli(
        plugin_python, "--task", "example", "--generations", "1", "--sandbox", "process", "--proposer", "offline",
        "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache"), timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    archive = Archive(run_dir / "archive.sqlite")
    assert archive.get_meta("backend") == "process"
    seeds = {seed.name: seed for seed in archive.seeds()}
    assert set(seeds) == {"huber", "squared_error"}
    for seed in seeds.values():
        # only the example task's evaluator writes these metrics
        assert seed.status is Status.EVALUATED
        assert seed.fitness == pytest.approx(-seed.metrics["parameter_error"])
        assert "fitted_slope" in seed.metrics
    # the outliers sit 5 to 10 above the line: least squares lifts the intercept by about 0.2 * 7.5 = 1.5,
    # while Huber caps the pull of each outlier at delta
    assert seeds["huber"].fitness > seeds["squared_error"].fitness
    assert (tmp_path / "cache" / "example").is_dir()


# --- in-process checks of the registry and the example's code ---------------------------------------


def test_builtin_tasks_are_listed():
    assert {"classification", "preference"} <= set(list_tasks())


@pytest.mark.parametrize("typo, suggestion", [("prefrence", "preference"), ("clasification", "classification")])
def test_unknown_task_suggests_the_closest(typo, suggestion):
    with pytest.raises(UnknownTaskError, match=f"Did you mean '{suggestion}'"):
        get_task(typo)


def test_cli_suggests_preference_for_a_typo():
    completed = run_cli(Path(sys.executable), "--task", "prefrence", "--generations", "0")
    assert completed.returncode != 0
    assert "Did you mean 'preference'?" in completed.stdout + completed.stderr


def test_example_task_loads_from_a_class_path(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(PLUGIN_SOURCE))
    task = get_task("evolve_example_task:LineFitTask")
    settings = task.presets()["quick"]
    task.prepare(settings, tmp_path, lambda step, total, message: None)
    fitness = {}
    for seed in task.seeds():
        candidate = load_candidate(seed.code, task.interface.params, task.hyperparameter_values(settings))
        probe = task.unit_test(candidate, settings)["probe"]
        assert len(probe) == 17
        fitness[seed.name] = task.evaluate(candidate, settings, tmp_path, tmp_path, lambda *event: None, 0).fitness
    assert fitness["huber"] > fitness["squared_error"]


def test_doc_code_blocks_come_from_the_example():
    sources = "\n".join(path.read_text() for path in sorted(PLUGIN_SOURCE.rglob("*")) if path.is_file())
    blocks = re.findall(r"```(?:python|toml)\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 6
    for block in blocks:
        assert block in sources, f"this block of {DOC.name} is not in the example's files:\n{block}"
