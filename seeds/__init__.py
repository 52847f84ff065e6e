"""Seed programs: known solutions, kept as plain source files, that start an evolution run.

The loader reads the files as text and never imports them, because a seed is a candidate program
like any other and runs only inside the sandbox. A seed file `seeds/<task>/<name>.py` defines one
function called `<name>`, and the first line of its module docstring is the idea behind it.
"""

from __future__ import annotations

import ast
import difflib
from pathlib import Path
from typing import NamedTuple

SEEDS_DIR = Path(__file__).resolve().parent

# Seed names by task and group. Every name is a file seeds/<task>/<name>.py.
SEED_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "preference": {
        # The four human-designed losses that open every run of the DiscoPOP study.
        "baselines": ("dpo", "slic", "ipo", "kto_pair"),
        # The losses that study's search discovered, in the authors' beta-consistent forms.
        "discovered": ("dbaql", "aql", "padll", "aqfl", "cell", "lrml", "pfl"),
    },
}


class SeedSource(NamedTuple):
    """A seed program's name, its one-sentence idea and its code without the module docstring."""

    name: str
    thought: str
    code: str


def _check_known(kind: str, value: str, known: list[str]) -> None:
    if value in known:
        return
    close = difflib.get_close_matches(value, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown seed {kind} {value!r}.{hint} Known {kind}s: {', '.join(sorted(known))}.")


def read_seed(path: Path) -> SeedSource:
    """Parse one seed file into its name, thought and code, without executing it.

    Raises:
        ValueError: if the file has no module docstring.
    """
    text = path.read_text(encoding="utf-8")
    module = ast.parse(text, filename=str(path))
    docstring = ast.get_docstring(module)
    if not docstring:
        raise ValueError(f"seed file {path} has no module docstring; its first line must state the idea")
    thought = docstring.splitlines()[0].strip()

    # Drop the docstring statement, then the blank lines after it.
    docstring_end = module.body[0].end_lineno
    code = "\n".join(text.splitlines()[docstring_end:]).lstrip("\n") + "\n"
    return SeedSource(path.stem, thought, code)


def load_seed_programs(task: str, group: str = "baselines") -> list[SeedSource]:
    """Return the seeds of one group of a task, in the order SEED_GROUPS lists them.

    Raises:
        ValueError: for an unknown task or group.
    """
    _check_known("task", task, list(SEED_GROUPS))
    _check_known("group", group, list(SEED_GROUPS[task]))
    return [read_seed(SEEDS_DIR / task / f"{name}.py") for name in SEED_GROUPS[task][group]]
