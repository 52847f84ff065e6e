"""Shared fixtures: an isolated cache directory and the project root on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOY_TASK = "tests.support.toy_task:ToyTask"


@pytest.fixture
def toy_task_name() -> str:
    return TOY_TASK


# marker -> environment variable that CI sets to 1 so that a skipped test of that group fails the run
REQUIRED_GROUPS = {"docker": "EVOLVE_REQUIRE_DOCKER", "ray": "EVOLVE_REQUIRE_RAY"}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Turn a skipped Docker or Ray test into a failure when CI requires that group to run."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped:
        return
    for marker, variable in REQUIRED_GROUPS.items():
        if item.get_closest_marker(marker) and os.environ.get(variable) == "1":
            report.outcome = "failed"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            report.longrepr = f"{marker} test skipped but {variable}=1 requires it to run: {reason}"
            return


@pytest.fixture(scope="session")
def preference_tiny_cache(tmp_path_factory):
    """A cache directory prepared once for the preference task's "tiny" preset."""
    from engine.runner import prepare_task
    from evaluators.registry import get_task

    task = get_task("preference")
    settings = task.presets()["tiny"]
    cache_dir = tmp_path_factory.mktemp("preference-cache")
    prepare_task(task, settings, cache_dir, cache_dir / "prepare-job")
    return cache_dir
