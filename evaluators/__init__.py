"""Task plugins: what to evolve, how to unit-test it and how to score it."""

from evaluators.registry import get_task, list_tasks, register_task
from evaluators.task import CandidateRejected, EvaluationOutcome, FunctionInterface, SeedProgram, Task

__all__ = [
    "CandidateRejected",
    "EvaluationOutcome",
    "FunctionInterface",
    "SeedProgram",
    "Task",
    "get_task",
    "list_tasks",
    "register_task",
]
