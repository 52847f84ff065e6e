"""Shared fixtures: an isolated cache directory and the project root on sys.path."""

from __future__ import annotations

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
