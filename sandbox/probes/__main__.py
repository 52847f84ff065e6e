"""Run the named probes (all when none is named) and print one JSON object keyed by probe name."""

from __future__ import annotations

import importlib
import json
import sys

from sandbox.probes import PROBE_NAMES


def main(argv: list[str]) -> int:
    names = argv or list(PROBE_NAMES)
    unknown = [name for name in names if name not in PROBE_NAMES]
    if unknown:
        print(f"unknown probe(s) {unknown}; known probes: {', '.join(PROBE_NAMES)}", file=sys.stderr)
        return 2
    report = {}
    for name in names:
        module = importlib.import_module(f"sandbox.probes.{name}")
        try:
            report[name] = module.probe()
        except Exception as error:  # noqa: BLE001 - a probe that breaks is reported, not fatal
            report[name] = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
