"""Report the Python version, the versions of the packages a stage imports, and CUDA devices."""

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
    try:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        cuda_devices = 0
    return {"python": platform.python_version(), "versions": versions, "cuda_devices": cuda_devices}
