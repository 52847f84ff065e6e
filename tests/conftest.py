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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Turn a skipped Docker test into a failure when EVOLVE_REQUIRE_DOCKER=1 (set by CI)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("docker") and os.environ.get("EVOLVE_REQUIRE_DOCKER") == "1":
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"Docker test skipped but EVOLVE_REQUIRE_DOCKER=1 requires it to run: {reason}"


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
