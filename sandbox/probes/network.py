"""Check that no outside address can be reached from the container.

The targets never carry traffic even when networking is on: 198.51.100.7 is
in TEST-NET-2 (RFC 5737, reserved for documentation) and 169.254.169.254 is
the link-local address where cloud providers serve instance metadata.
"""

from __future__ import annotations

import errno
import os
import socket

CONNECT_TARGETS = (("198.51.100.7", 80), ("169.254.169.254", 80))
# Docker Desktop resolves this name to the host, so a sandbox must not resolve it.
RESOLVE_NAMES = ("host.docker.internal",)
TIMEOUT_S = 2.0


def _describe(error: OSError) -> str:
    """Return the exception type and errno name, such as "OSError ENETUNREACH"."""
    code = errno.errorcode.get(error.errno or 0, "") if not isinstance(error, socket.gaierror) else ""
    return f"{type(error).__name__} {code}".strip()


def probe() -> dict:
    connections = {}
    for host, port in CONNECT_TARGETS:
        try:
            socket.create_connection((host, port), timeout=TIMEOUT_S).close()
            connections[f"{host}:{port}"] = "CONNECTED"
        except OSError as error:
            connections[f"{host}:{port}"] = _describe(error)

    resolutions = {}
    for name in RESOLVE_NAMES:
        try:
            resolutions[name] = "RESOLVED " + socket.gethostbyname(name)
        except OSError as error:
            resolutions[name] = _describe(error)

    try:
        interfaces = sorted(os.listdir("/sys/class/net"))
    except OSError:
        interfaces = []
    return {"connect": connections, "resolve": resolutions, "interfaces": interfaces}
