"""SIGKILL in the middle of a fine-tune, then --resume: nothing lost, nothing repeated."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, TOY_TASK


def evolve(*args: str, run_dir: Path, cache_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "engine.cli", *args, "--sandbox", "process", "--proposer", "offline",
               "--cache-dir", str(cache_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def rows(run_dir: Path, query: str) -> list[tuple]:
    path = run_dir / "archive.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        try:
            return db.execute(query).fetchall()
        except sqlite3.OperationalError:
            return []


def wait_for(condition, timeout_s: float) -> bool:
    """Poll an observable condition of the run until it holds or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_sigkill_during_finetune_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    cache_dir = tmp_path / "cache"
    first = evolve("--task", TOY_TASK, "--preset", "slow", "--generations", "2", "--run-dir", str(run_dir),
                   run_dir=run_dir, cache_dir=cache_dir)

    # kill the engine while generation 1's candidate is being fine-tuned
    def training_gen1() -> bool:
        training = rows(run_dir, "SELECT id FROM candidates WHERE generation=1 AND status='training'")
        progress = list((run_dir / "jobs").glob("g001-*/evaluate/progress.jsonl")) if run_dir.exists() else []
        return bool(training) and bool(progress)

    assert wait_for(training_gen1, timeout_s=240), first.communicate()[0].decode()[-3000:]
    killed_id = rows(run_dir, "SELECT id FROM candidates WHERE generation=1 AND status='training'")[0][0]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = rows(run_dir, "SELECT id, code FROM candidates ORDER BY seq")

    resumed = evolve("--resume", str(run_dir), run_dir=run_dir, cache_dir=cache_dir)
    output = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, output[-3000:]
    # the killed candidate is judged again before generation 2, under a heading that names it
    assert "seeds, and candidates the interrupted run left unfinished" in output

    after = rows(run_dir, "SELECT id, code, status, origin, generation FROM candidates ORDER BY seq")
    ids = [row[0] for row in after]
    assert len(ids) == len(set(ids)), "a candidate was duplicated"
    # every candidate written before the kill is still there with the same code
    assert [(i, c) for i, c, *_ in after[: len(before)]] == before
    # the killed candidate was re-run to a final status, not lost
    statuses = {row[0]: row[2] for row in after}
    assert statuses[killed_id] in ("evaluated", "rejected", "timeout")
    assert all(status not in ("pending", "validated", "training") for status in statuses.values())
    # seeds were not added again and both generations were completed
    assert sum(1 for row in after if row[3] == "seed") == 2
    assert {row[4] for row in after if row[3] == "proposer"} == {1, 2}
    assert rows(run_dir, "SELECT value FROM run WHERE key='completed_generations'") == [("2",)]
