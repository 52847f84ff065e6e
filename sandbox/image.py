"""Build the sandbox images, and check a Docker backend's isolation with a probe container."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sandbox.backend import Limits
from sandbox.docker_backend import DEFAULT_IMAGE, DockerBackend, container_environment

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_BUILD_SCRIPT = REPO_ROOT / "docker" / "build-cpu-image.sh"
GPU_DOCKERFILE = REPO_ROOT / "Dockerfile.gpu"
DEFAULT_GPU_IMAGE = "evolve-sandbox:gpu"
DEFAULT_GPU_BASE = "pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime"

CANARY_VARIABLE = "EVOLVE_CANARY_SECRET"
# Variables that Docker or the image itself set, besides the backend's allow-list.
IMAGE_VARIABLES = frozenset({"PATH", "HOSTNAME", "LANG", "PYTHONPATH"})


class ImageBuildError(RuntimeError):
    """Raised when an image build fails; the message names the command to rerun."""


@dataclass(frozen=True)
class BuildReport:
    """A finished image build."""

    tag: str
    size_mb: float
    seconds: float


def build_image(
    *,
    gpu: bool = False,
    tag: str | None = None,
    base_image: str = DEFAULT_GPU_BASE,
    force: bool = False,
    cache_dir: Path | None = None,
) -> BuildReport:
    """Build the CPU image offline (docker/build-cpu-image.sh) or the GPU image from Dockerfile.gpu.

    The GPU build pulls `base_image` and downloads packages, so it needs a
    registry; the CPU build needs only Debian's mirror and PyPI. Both print
    their progress to this process's stderr.
    """
    started = time.monotonic()
    if gpu:
        tag = tag or DEFAULT_GPU_IMAGE
        if not GPU_DOCKERFILE.is_file():
            raise ImageBuildError(f"{GPU_DOCKERFILE} not found; build images from a source checkout of evolve")
        # the context is docker/, which contains the requirements file and nothing large
        command = [
            "docker", "build", "-f", str(GPU_DOCKERFILE), "--build-arg", f"BASE_IMAGE={base_image}",
            "-t", tag, str(REPO_ROOT / "docker"),
        ]
        environment = None
    else:
        tag = tag or DEFAULT_IMAGE
        if not CPU_BUILD_SCRIPT.is_file():
            raise ImageBuildError(f"{CPU_BUILD_SCRIPT} not found; build images from a source checkout of evolve")
        command = ["bash", str(CPU_BUILD_SCRIPT), "--tag", tag] + (["--force"] if force else [])
        environment = dict(os.environ)
        if cache_dir is not None:
            environment["EVOLVE_DOCKER_CACHE"] = str(cache_dir)

    logger.info("building image %s: %s", tag, " ".join(command))
    completed = subprocess.run(command, env=environment, check=False)
    if completed.returncode != 0:
        raise ImageBuildError(
            f"building {tag} failed with exit status {completed.returncode}; command: {' '.join(command)}"
        )
    inspected = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True, check=False
    )
    size_mb = int(inspected.stdout.strip() or 0) / (1024 * 1024)
    return BuildReport(tag=tag, size_mb=size_mb, seconds=time.monotonic() - started)


# --- self-check -----------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """Verdict on one isolation property, with the evidence."""

    name: str
    passed: bool
    summary: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.name}: {self.summary}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class SelfCheckReport:
    """All checks of one probe container, printable one check per line."""

    checks: tuple[CheckResult, ...]
    container_s: float

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    @property
    def exit_code(self) -> int:
        """0 when every check passed, else 1: the exit status `evolve sandbox check` returns."""
        return 0 if self.passed else 1

    def lines(self) -> list[str]:
        lines = [check.line() for check in self.checks]
        lines.append(f"probe container: {self.container_s:.1f} s from start to exit")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def self_check(backend: DockerBackend, limits: Limits | None = None) -> SelfCheckReport:
    """Run every probe in one sandbox container and judge the isolation it reports.

    A canary secret is put into this process's environment for the duration
    of the run, and the check fails if it shows up anywhere in the container.
    With `limits.gpu`, the report also checks that torch sees a CUDA device.
    """
    limits = limits or Limits(timeout_s=120, memory_mb=2048, cpus=1.0)
    canary = f"sk-test-CANARY-{secrets.token_hex(8)}"
    previous = os.environ.get(CANARY_VARIABLE)
    os.environ[CANARY_VARIABLE] = canary
    try:
        with tempfile.TemporaryDirectory(prefix="evolve-check-") as job_dir:
            run = backend.run_in_container(
                ["python", "-m", "sandbox.probes"], Path(job_dir), limits, kind="check", candidate_id="probe"
            )
    finally:
        if previous is None:
            os.environ.pop(CANARY_VARIABLE, None)
        else:
            os.environ[CANARY_VARIABLE] = previous

    report = _probe_output(run.logs)
    if run.timed_out or run.exit_code != 0 or report is None:
        how = "timed out" if run.timed_out else f"exited with status {run.exit_code}"
        last = run.logs.strip().splitlines()[-1:] or ["no output"]
        failed = CheckResult("probe container", False, f"FAILED: it {how}", f"last output: {last[0]}")
        return SelfCheckReport((failed,), run.wall_s)

    return judge_probes(report, limits, canary_in_logs=canary in run.logs, container_s=run.wall_s)


def judge_probes(
    report: dict[str, Any], limits: Limits, *, canary_in_logs: bool = False, container_s: float = 0.0
) -> SelfCheckReport:
    """Judge the JSON object that `python -m sandbox.probes` printed, one check per isolation property."""
    expected_names = set(container_environment(limits)) | IMAGE_VARIABLES
    checks = [
        _judge("network", report, _network),
        _judge("environment", report, lambda facts: _environment(facts, canary_in_logs, expected_names)),
        _judge("filesystem", report, _root_filesystem, name="root filesystem"),
        _judge("filesystem", report, _job_directory, name="job directory"),
        _judge("filesystem", report, _temporary_directory, name="temporary directory"),
        _judge("filesystem", report, _source_mount, name="project source"),
        _judge("identity", report, _user, name="user"),
        _judge("identity", report, _capabilities, name="capabilities"),
        _judge("packages", report, _packages),
    ]
    if limits.gpu:
        checks.append(_judge("packages", report, _gpu, name="gpu"))
    return SelfCheckReport(tuple(checks), container_s)


def _probe_output(logs: str) -> dict[str, Any] | None:
    """Return the JSON object that `python -m sandbox.probes` prints last, or None."""
    for line in reversed(logs.strip().splitlines()):
        try:
            payload = json.loads(line)
        except ValueError:
            continue
        return payload if isinstance(payload, dict) else None
    return None


def _judge(
    probe: str, report: dict[str, Any], rule: Callable[[dict[str, Any]], CheckResult], name: str = ""
) -> CheckResult:
    facts = report.get(probe)
    label = name or probe
    if not isinstance(facts, dict) or "error" in facts:
        error = facts.get("error") if isinstance(facts, dict) else "no output"
        return CheckResult(label, False, "FAILED: the probe did not run", str(error))
    result = rule(facts)
    return CheckResult(label, result.passed, result.summary, result.detail)


def _network(facts: dict[str, Any]) -> CheckResult:
    connect = facts["connect"]
    resolve = facts["resolve"]
    interfaces = facts["interfaces"]
    leaks = [target for target, outcome in connect.items() if outcome == "CONNECTED"]
    leaks += [name for name, outcome in resolve.items() if outcome.startswith("RESOLVED")]
    outcomes = [f"{target} {outcome}" for target, outcome in {**connect, **resolve}.items()]
    detail = ", ".join(outcomes) + f"; interfaces: {', '.join(interfaces) or 'none'}"
    if leaks or set(interfaces) - {"lo"}:
        return CheckResult("network", False, "NOT BLOCKED", detail)
    return CheckResult("network", True, "blocked", detail)


def _environment(facts: dict[str, Any], canary_in_logs: bool, expected_names: set[str]) -> CheckResult:
    unexpected = sorted(set(facts["names"]) - expected_names)
    if facts["canary_in_env"] or facts["canary_in_pid1"] or canary_in_logs:
        return CheckResult("environment", False, "LEAKED", "the host's canary secret reached the container")
    if unexpected:
        return CheckResult("environment", False, "NOT CLEAN", f"unexpected variables: {', '.join(unexpected)}")
    detail = f"{len(facts['names'])} variables, all from the allow-list"
    return CheckResult("environment", True, "clean (canary absent)", detail)


def _root_filesystem(facts: dict[str, Any]) -> CheckResult:
    read_only = "ro" in facts["root_mount_options"]
    detail = f"writing /usr: {facts['write_usr']}, writing /: {facts['write_root']}"
    if facts["write_usr"] == "ok" or facts["write_root"] == "ok" or not read_only:
        return CheckResult("", False, "WRITABLE", detail)
    return CheckResult("", True, "read-only", detail)


def _job_directory(facts: dict[str, Any]) -> CheckResult:
    return CheckResult("", facts["write_job"] == "ok", "writable" if facts["write_job"] == "ok" else "NOT WRITABLE",
                       f"/job: {facts['write_job']}")


def _temporary_directory(facts: dict[str, Any]) -> CheckResult:
    writable = facts["write_tmp"] == "ok"
    return CheckResult("", writable, "writable tmpfs" if writable else "NOT WRITABLE",
                       f"/tmp: {facts['write_tmp']}, {facts['tmp_size_mb']} MiB")


def _source_mount(facts: dict[str, Any]) -> CheckResult:
    read_only = "ro" in facts["source_mount_options"]
    return CheckResult("", read_only, "read-only" if read_only else "WRITABLE", "/opt/evolve/src")


def _user(facts: dict[str, Any]) -> CheckResult:
    root = 0 in (facts["uid"], facts["euid"], facts["gid"])
    return CheckResult("", not root, "ROOT" if root else "non-root", f"uid {facts['uid']}, gid {facts['gid']}")


def _capabilities(facts: dict[str, Any]) -> CheckResult:
    sets = {key: facts[key] for key in ("cap_effective", "cap_permitted", "cap_bounding")}
    all_empty = all(value is not None and int(value, 16) == 0 for value in sets.values())
    no_new_privs = facts["no_new_privs"] == "1"
    detail = f"CapEff {sets['cap_effective']}, no_new_privs {facts['no_new_privs']}, seccomp mode {facts['seccomp']}"
    if all_empty and no_new_privs:
        return CheckResult("", True, "dropped", detail)
    return CheckResult("", False, "NOT DROPPED", detail)


def _packages(facts: dict[str, Any]) -> CheckResult:
    versions = facts["versions"]
    missing = [name for name, version in versions.items() if version.startswith("MISSING")]
    detail = f"python {facts['python']}, " + ", ".join(f"{name} {version}" for name, version in versions.items())
    return CheckResult("", not missing, "MISSING " + ", ".join(missing) if missing else "importable", detail)


def _gpu(facts: dict[str, Any]) -> CheckResult:
    devices = facts["cuda_devices"]
    return CheckResult("", devices > 0, "visible" if devices else "NOT VISIBLE", f"torch sees {devices} CUDA device(s)")
