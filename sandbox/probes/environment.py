"""Check that no host secret reached the container's environment.

The self-check puts a canary variable whose value contains "CANARY" into the
host process's environment before it starts the container. Neither this
process nor PID 1 may carry it.
"""

from __future__ import annotations

import os

MARKER = "CANARY"


def probe() -> dict:
    try:
        with open("/proc/1/environ", "rb") as handle:
            pid1_environ = handle.read().decode(errors="replace")
        pid1_readable = True
    except OSError:
        pid1_environ, pid1_readable = "", False
    return {
        "canary_in_env": any(MARKER in name or MARKER in value for name, value in os.environ.items()),
        "canary_in_pid1": MARKER in pid1_environ,
        "pid1_readable": pid1_readable,
        # names only: values could be secrets if the sandbox were broken
        "names": sorted(os.environ),
    }
