"""Probes that run inside a sandbox container and report what the container can do.

Each probe module has a `probe()` function that returns plain facts as a
JSON-serialisable dict. The host judges them in sandbox.image.judge_probes.
Probes import only the standard library, except `packages`, which imports
the packages it reports on.

Run them in a container with: python -m sandbox.probes [NAME ...]
"""

PROBE_NAMES = ("network", "environment", "filesystem", "identity", "packages")
