"""Process-tree helpers for tests that check that no sandbox job outlives its deadline."""

from __future__ import annotations

import os
from pathlib import Path


def children_of(pid: int) -> list[tuple[int, str]]:
    """Return (pid, state) of every live or zombie child process of `pid`, read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, parent = fields[0], int(fields[1])
        if parent == pid:
            children.append((int(stat.parent.name), state))
    return children


def descendants_of(pid: int) -> list[int]:
    """Return the pids of every live or zombie process below `pid`."""
    found, frontier = [], [pid]
    while frontier:
        children = [child for parent in frontier for child, _ in children_of(parent)]
        found.extend(children)
        frontier = children
    return found


def is_fork_server(pid: int) -> bool:
    try:
        return b"sandbox.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def leftover_processes() -> list[int]:
    """Return this process's descendants other than an idle warm fork server, which stays between jobs."""
    leftovers = []
    for pid, _ in children_of(os.getpid()):
        if is_fork_server(pid):
            leftovers.extend(descendants_of(pid))
        else:
            leftovers.append(pid)
    return leftovers
