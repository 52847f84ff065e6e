"""Check that the root filesystem is read-only and that /job and /tmp are writable."""

from __future__ import annotations

import errno
import os


def _try_write(directory: str) -> str:
    """Create and delete a file in `directory`, and return "ok" or the errno name."""
    path = os.path.join(directory, f".evolve-probe-{os.getpid()}")
    try:
        with open(path, "w") as handle:
            handle.write("probe")
        os.unlink(path)
        return "ok"
    except OSError as error:
        return errno.errorcode.get(error.errno, str(error.errno))


def _mount_options(mount_point: str) -> list[str]:
    """Return the options of the mount at `mount_point` from /proc/self/mountinfo."""
    options: list[str] = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            if fields[4] == mount_point:
                # later lines stack over earlier ones, so the last match wins
                options = fields[5].split(",")
    return options


def probe() -> dict:
    tmp = os.statvfs("/tmp")
    return {
        "write_usr": _try_write("/usr"),
        "write_root": _try_write("/"),
        "root_mount_options": _mount_options("/"),
        "write_job": _try_write("/job"),
        "write_tmp": _try_write("/tmp"),
        "tmp_size_mb": tmp.f_blocks * tmp.f_frsize // (1024 * 1024),
        "source_mount_options": _mount_options("/opt/evolve/src/sandbox"),
    }
