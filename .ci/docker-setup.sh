#!/usr/bin/env bash
# Start a Docker engine and build the CPU sandbox image offline.
#
# Run as root on a fresh Debian bookworm machine (CI runs it from .ci/run):
# installs Debian's docker.io and debootstrap when missing, starts dockerd
# when no engine responds, then runs docker/build-cpu-image.sh, which reuses
# its cached base image and wheelhouse on a second run.
set -euo pipefail
cd "$(dirname "$0")/.."

wait_s="${EVOLVE_DOCKERD_WAIT_S:-60}"
log="/var/log/dockerd.log"

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    echo "[docker-setup] installing docker.io and debootstrap from Debian's packages"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap
fi

if docker info >/dev/null 2>&1; then
    echo "[docker-setup] a Docker engine already responds; using it"
else
    # The sandbox never uses container networking, so this daemon gets no
    # bridge and writes no iptables rules on the host.
    echo "[docker-setup] starting dockerd (log: ${log})"
    nohup dockerd --bridge=none --iptables=false >"${log}" 2>&1 &
    for ((waited = 0; waited < wait_s; waited++)); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "[docker-setup] error: dockerd did not respond within ${wait_s} s; last lines of ${log}:" >&2
        tail -n 20 "${log}" >&2
        exit 1
    fi
    echo "[docker-setup] dockerd responded after ${waited} s"
fi

# the project's virtualenv has a current pip; any CPython's pip can fetch the wheels
python="python3"
[[ -x .venv/bin/python ]] && python=".venv/bin/python"
PYTHON="${python}" bash docker/build-cpu-image.sh
