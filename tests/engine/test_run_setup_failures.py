"""Whole `evolve` runs started the way a new user starts them, and a run whose sandbox cannot judge the seeds."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.process_backend import network_isolation_available
from tests.conftest import ROOT, TOY_TASK

pytestmark = pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here")


def evolve(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "engine.cli", *args, "--sandbox", "process", "--proposer", "offline"]
    # a wide console keeps rich from wrapping the messages the tests look for
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "500"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def statuses(run_dir: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{run_dir / 'archive.sqlite'}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT id, status FROM candidates").fetchall())


def test_default_run_dir_and_relative_cache(tmp_path):
    # no --run-dir: the run goes to runs/<task>-<time> under the working directory, a relative path
    result = evolve("--task", TOY_TASK, "--set", "steps=10", "--generations", "1", "--cache-dir", "cache",
                    cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    found = statuses(run_dir)
    seeds = {key: value for key, value in found.items() if key.startswith("seed-")}
    assert seeds
    assert set(seeds.values()) == {"evaluated"}
    assert "evaluated" in {value for key, value in found.items() if key.startswith("g001")}


def test_failed_seeds_stop_run(tmp_path):
    run_dir = tmp_path / "run"
    common = ("--cache-dir", str(tmp_path / "cache"))
    # a deadline no evaluation can meet fails every seed, as a broken sandbox would
    first = evolve("--task", TOY_TASK, "--set", "steps=10", "--generations", "1", "--run-dir", str(run_dir),
                   "--train-timeout", "0.01", *common, cwd=tmp_path)
    output = first.stdout + first.stderr
    assert first.returncode == 1, output[-3000:]
    assert "none of the" in output
    assert "seed programs could be evaluated" in output
    assert "evolve sandbox check" in output
    assert f"evolve --resume {run_dir}" in output
    assert "Traceback" not in output
    found = statuses(run_dir)
    assert found
    assert all(key.startswith("seed-") for key in found), "no proposal may be made after every seed failed"
    assert "evaluated" not in found.values()

    resumed = evolve("--resume", str(run_dir), "--train-timeout", "300", *common, cwd=tmp_path)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    found = statuses(run_dir)
    assert {value for key, value in found.items() if key.startswith("seed-")} == {"evaluated"}
    assert any(key.startswith("g001") for key in found)
