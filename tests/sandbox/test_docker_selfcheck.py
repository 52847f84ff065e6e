"""Judging of probe reports by the self-check: each broken property fails its own check.

No container runs here: the reports are what `python -m sandbox.probes`
printed in a real sandbox container, with one fact changed per case.
"""

from __future__ import annotations

import copy

import pytest

from sandbox.backend import Limits
from sandbox.image import judge_probes

LIMITS = Limits(timeout_s=120, memory_mb=2048, cpus=1.0)

# Output of `python -m sandbox.probes` in evolve-sandbox:cpu under DockerBackend.
SANDBOXED_REPORT = {
    "environment": {
        "canary_in_env": False,
        "canary_in_pid1": False,
        "pid1_readable": True,
        "names": [
            "CUBLAS_WORKSPACE_CONFIG", "HF_DATASETS_OFFLINE", "HF_HOME", "HF_HUB_OFFLINE", "HOME", "HOSTNAME",
            "LANG", "MKL_NUM_THREADS", "MPLCONFIGDIR", "OMP_NUM_THREADS", "PATH", "PYTHONDONTWRITEBYTECODE",
            "PYTHONHASHSEED", "PYTHONPATH", "PYTHONUNBUFFERED", "TOKENIZERS_PARALLELISM", "TQDM_DISABLE",
            "TRANSFORMERS_OFFLINE", "USER",
        ],
    },
    "filesystem": {
        "root_mount_options": ["ro", "relatime"],
        "source_mount_options": ["ro", "relatime"],
        "tmp_size_mb": 512,
        "write_job": "ok",
        "write_root": "EROFS",
        "write_tmp": "ok",
        "write_usr": "EROFS",
    },
    "identity": {
        "cap_bounding": "0000000000000000",
        "cap_effective": "0000000000000000",
        "cap_permitted": "0000000000000000",
        "euid": 65534,
        "gid": 65534,
        "groups": [65534],
        "no_new_privs": "1",
        "seccomp": "2",
        "uid": 65534,
    },
    "network": {
        "connect": {"169.254.169.254:80": "OSError ENETUNREACH", "198.51.100.7:80": "OSError ENETUNREACH"},
        "interfaces": ["lo"],
        "resolve": {"host.docker.internal": "gaierror"},
    },
    "packages": {
        "cuda_devices": 0,
        "python": "3.11.2",
        "versions": {"RestrictedPython": "9.0", "datasets": "5.2.0", "torch": "2.13.0+cpu", "trl": "1.16.0"},
    },
}


def check_named(report, name: str):
    matches = [check for check in report.checks if check.name == name]
    assert len(matches) == 1, [check.name for check in report.checks]
    return matches[0]


def test_sandboxed_report_passes():
    report = judge_probes(SANDBOXED_REPORT, LIMITS, container_s=5.4)
    assert report.passed, str(report)
    assert report.exit_code == 0
    lines = report.lines()
    assert lines[0].startswith("network: blocked (")
    assert "environment: clean (canary absent) (19 variables, all from the allow-list)" in lines
    assert "root filesystem: read-only (writing /usr: EROFS, writing /: EROFS)" in lines
    assert "user: non-root (uid 65534, gid 65534)" in lines
    assert lines[-1] == "probe container: 5.4 s from start to exit"


# (probe, fact, bad value, check that must fail, its summary)
BROKEN = [
    ("network", ("connect", "198.51.100.7:80"), "CONNECTED", "network", "NOT BLOCKED"),
    ("network", ("resolve", "host.docker.internal"), "RESOLVED 192.168.65.254", "network", "NOT BLOCKED"),
    ("network", ("interfaces",), ["eth0", "lo"], "network", "NOT BLOCKED"),
    ("environment", ("canary_in_env",), True, "environment", "LEAKED"),
    ("environment", ("canary_in_pid1",), True, "environment", "LEAKED"),
    ("environment", ("names",), ["HOME", "OPENAI_API_KEY"], "environment", "NOT CLEAN"),
    ("filesystem", ("write_usr",), "ok", "root filesystem", "WRITABLE"),
    ("filesystem", ("root_mount_options",), ["rw", "relatime"], "root filesystem", "WRITABLE"),
    ("filesystem", ("write_job",), "EACCES", "job directory", "NOT WRITABLE"),
    ("filesystem", ("write_tmp",), "EROFS", "temporary directory", "NOT WRITABLE"),
    ("filesystem", ("source_mount_options",), ["rw"], "project source", "WRITABLE"),
    ("identity", ("uid",), 0, "user", "ROOT"),
    ("identity", ("cap_effective",), "00000000a80425fb", "capabilities", "NOT DROPPED"),
    ("identity", ("no_new_privs",), "0", "capabilities", "NOT DROPPED"),
    ("packages", ("versions", "trl"), "MISSING (No module named 'trl')", "packages", "MISSING trl"),
]


@pytest.mark.parametrize("probe, fact, value, check, summary", BROKEN)
def test_broken_property_fails_its_check(probe, fact, value, check, summary):
    facts = copy.deepcopy(SANDBOXED_REPORT)
    target = facts[probe]
    for key in fact[:-1]:
        target = target[key]
    target[fact[-1]] = value

    report = judge_probes(facts, LIMITS)

    assert check_named(report, check).passed is False
    assert check_named(report, check).summary == summary
    assert report.exit_code == 1
    others = [result.name for result in report.checks if not result.passed and result.name != check]
    assert others == []


def test_canary_in_container_output_fails():
    report = judge_probes(SANDBOXED_REPORT, LIMITS, canary_in_logs=True)
    assert check_named(report, "environment").summary == "LEAKED"
    assert report.exit_code == 1


def test_probe_that_failed_to_run_fails():
    facts = copy.deepcopy(SANDBOXED_REPORT)
    facts["identity"] = {"error": "PermissionError: [Errno 13] /proc/self/status"}
    del facts["network"]
    report = judge_probes(facts, LIMITS)
    assert check_named(report, "network").summary == "FAILED: the probe did not run"
    assert check_named(report, "user").summary == "FAILED: the probe did not run"
    assert "PermissionError" in check_named(report, "capabilities").detail
    assert report.exit_code == 1


def test_gpu_request_needs_visible_device():
    gpu_limits = Limits(timeout_s=120, gpu=True)
    without_device = judge_probes(SANDBOXED_REPORT, gpu_limits)
    assert check_named(without_device, "gpu").summary == "NOT VISIBLE"
    assert without_device.exit_code == 1

    facts = copy.deepcopy(SANDBOXED_REPORT)
    facts["packages"]["cuda_devices"] = 1
    assert judge_probes(facts, gpu_limits).passed
