"""Report the Python version and the versions of the packages a stage imports."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform

PACKAGES = ("torch", "transformers", "trl", "datasets", "RestrictedPython")


def probe() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            importlib.import_module(name)
            versions[name] = importlib.metadata.version(name)
        except ImportError as error:
            versions[name] = f"MISSING ({error})"
    return {"python": platform.python_version(), "versions": versions}
