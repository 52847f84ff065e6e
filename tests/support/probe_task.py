"""A task whose evaluation probes its own sandbox: environment, network, limits.

It stands in for candidate code that got past the static checks (defence in
depth): the probe runs inside the worker and reports what it could reach.
"""

from __future__ import annotations

import os
import resource
import socket
from dataclasses import dataclass
from typing import Any

import torch

from evaluators.task import EvaluationOutcome, FunctionInterface, SeedProgram, Task


@dataclass(frozen=True)
class ProbeSettings:
    """Attributes:
    port: a TCP port on the host's loopback where the test listens.
    beta: unused hyperparameter, kept so the usual loss interface applies.
    """

    port: int = 0
    beta: float = 0.1


class ProbeTask(Task):
    name = "probe"
    description = "reports what a sandboxed job can reach (sandbox tests)"
    interface = FunctionInterface(
        params=("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"),
        hyperparameters=("beta",),
    )
    settings_class = ProbeSettings
    default_preset = "default"
    # prints to standard output when imported, which must not disturb the warm worker's replies
    warm_imports = ("tests.support.noisy_import",)

    def presets(self) -> dict[str, Any]:
        return {"default": ProbeSettings()}

    def prompt_text(self, settings: Any) -> str:
        return "probe"

    def seeds(self, group: str = "baselines") -> list[SeedProgram]:
        return []

    def unit_test(self, candidate, settings) -> dict[str, Any]:
        return {}

    def evaluate(self, candidate, settings, cache_dir, work_dir, progress, seed) -> EvaluationOutcome:
        try:
            environ_pid1 = open("/proc/1/environ", "rb").read().decode(errors="replace")
        except OSError:
            environ_pid1 = ""
        try:
            socket.create_connection(("127.0.0.1", settings.port), timeout=2).close()
            loopback = "CONNECTED"
        except OSError as error:
            loopback = type(error).__name__
        metrics = {
            "canary_in_env": any("CANARY" in value for value in os.environ.values()),
            "canary_in_pid1": "CANARY" in environ_pid1,
            "env_keys": sorted(os.environ),
            "host_loopback": loopback,
            "pid": os.getpid(),
            "parent_pid": os.getppid(),
            "leads_session": os.getsid(0) == os.getpid(),
            "home": os.environ.get("HOME", ""),
            "cwd": os.getcwd(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "rlimit_as": resource.getrlimit(resource.RLIMIT_AS)[0],
            "rlimit_fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
            "torch_threads": torch.get_num_threads(),
        }
        return EvaluationOutcome(fitness=0.0, metrics=metrics)
