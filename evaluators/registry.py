"""Task registry: in-tree tasks plus third-party tasks from the `evolve.tasks` entry point."""

from __future__ import annotations

import difflib
import importlib
import logging
from importlib.metadata import entry_points

from evaluators.task import Task

logger = logging.getLogger(__name__)

# In-tree tasks, as "module:Class", imported only when used so that listing
# tasks does not import torch.
_BUILTIN_TASKS: dict[str, str] = {
    "preference": "evaluators.preference:PreferenceTask",
    "classification": "evaluators.classification:ClassificationTask",
}
_registered: dict[str, type[Task]] = {}


class UnknownTaskError(ValueError):
    """Raised for a task name that no registry entry matches."""


def register_task(task_class: type[Task]) -> type[Task]:
    """Register a task class under its `name`; usable as a class decorator."""
    name = task_class.name
    if name in _registered and _registered[name] is not task_class:
        raise ValueError(f"task name {name!r} is already registered by {_registered[name].__module__}")
    _registered[name] = task_class
    return task_class


def _entry_point_targets() -> dict[str, str]:
    targets = {}
    for entry in entry_points(group="evolve.tasks"):
        targets[entry.name] = entry.value
    return targets


def _all_targets() -> dict[str, str]:
    targets = dict(_entry_point_targets())
    targets.update(_BUILTIN_TASKS)
    return targets


def list_tasks() -> list[str]:
    """Return the names of every known task, sorted."""
    return sorted(set(_all_targets()) | set(_registered))


def get_task(name: str) -> Task:
    """Return a new instance of the task called `name`, or of a "package.module:Class" path."""
    if name in _registered:
        return _registered[name]()
    targets = _all_targets()
    if ":" in name and name not in targets:
        targets[name] = name
    if name not in targets:
        known = list_tasks()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownTaskError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(known)}.")
    module_name, _, class_name = targets[name].partition(":")
    try:
        module = importlib.import_module(module_name)
        task_class = getattr(module, class_name)
    except (ImportError, AttributeError) as error:
        raise UnknownTaskError(f"task {name!r} points to {targets[name]!r}, which cannot be loaded: {error}") from None
    if not (isinstance(task_class, type) and issubclass(task_class, Task)):
        raise UnknownTaskError(f"task {name!r} points to {targets[name]!r}, which is not a Task subclass")
    _registered.setdefault(name, task_class)
    return task_class()
