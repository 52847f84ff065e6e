#!/usr/bin/env bash
# Build the CPU sandbox image (evolve-sandbox:cpu) without pulling from any registry.
#
#   1. base image evolve-base:bookworm: a Debian bookworm minbase rootfs with
#      python3 (3.11) and venv, made by debootstrap and loaded with `docker import`;
#   2. wheelhouse: every wheel in docker/requirements-cpu.txt and its
#      dependencies, fetched on the host by pip for CPython 3.11 on x86_64 Linux;
#   3. `docker build --network none` installs the wheelhouse into /opt/venv.
#
# Each step is skipped when its output is present and its inputs did not
# change, so a second run takes seconds. Outputs are kept under the cache
# directory: the rootfs tarball, the wheelhouse and the build context.
#
# Usage: docker/build-cpu-image.sh [--force] [--tag TAG] [--cache-dir DIR]
#
# Environment variables:
#   EVOLVE_DOCKER_CACHE     cache directory (default ~/.cache/evolve/docker)
#   EVOLVE_DEBIAN_MIRROR    Debian mirror for debootstrap (default http://deb.debian.org/debian)
#   EVOLVE_TORCH_INDEX_URL  extra pip index that serves torch's +cpu wheels, such as
#                           https://download.pytorch.org/whl/cpu (default: none)
#   PYTHON                  host Python whose pip downloads the wheels (default python3)
#   DOCKER                  docker CLI (default docker)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_dir="${EVOLVE_DOCKER_CACHE:-${HOME}/.cache/evolve/docker}"
tag="evolve-sandbox:cpu"
base_tag="evolve-base:bookworm"
mirror="${EVOLVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
python="${PYTHON:-python3}"
docker="${DOCKER:-docker}"
force=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) force=1; shift ;;
        --tag) tag="$2"; shift 2 ;;
        --cache-dir) cache_dir="$2"; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "build-cpu-image: unknown argument '$1'; run with --help for usage" >&2; exit 2 ;;
    esac
done

requirements="${repo_root}/docker/requirements-cpu.txt"
dockerfile="${repo_root}/docker/Dockerfile.cpu"
started=$(date +%s)

log() { echo "[build-cpu-image] $(( $(date +%s) - started )) s: $*" >&2; }
fail() { echo "[build-cpu-image] error: $*" >&2; exit 1; }

sha256_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

if ! "${docker}" info >/dev/null 2>&1; then
    fail "the Docker engine is unreachable ('${docker} info' failed); start dockerd or run .ci/docker-setup.sh"
fi
mkdir -p "${cache_dir}"

# --- step 1: base image from a debootstrap rootfs ---------------------------

base_tar="${cache_dir}/base/bookworm-rootfs.tar"
if [[ ${force} -eq 0 ]] && "${docker}" image inspect "${base_tag}" >/dev/null 2>&1; then
    log "base image ${base_tag} present; reusing it"
else
    if [[ ${force} -eq 1 || ! -s "${base_tar}" ]]; then
        command -v debootstrap >/dev/null || fail "debootstrap is missing; install it with: apt-get install -y debootstrap"
        [[ $(id -u) -eq 0 ]] || fail "debootstrap needs root; rerun this script as root"
        rootfs="${cache_dir}/base/rootfs"
        rm -rf "${rootfs}"
        mkdir -p "${rootfs}"
        log "debootstrap bookworm (minbase + python3) from ${mirror}"
        debootstrap --variant=minbase --include=python3,python3-venv \
            bookworm "${rootfs}" "${mirror}" >"${cache_dir}/base/debootstrap.log" 2>&1 \
            || fail "debootstrap failed; see ${cache_dir}/base/debootstrap.log"

        # drop what a sandbox never uses: package caches, docs, man pages
        rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/* \
            "${rootfs}"/usr/share/doc/* "${rootfs}"/usr/share/man/* "${rootfs}"/usr/share/info/*
        tar -C "${rootfs}" --numeric-owner -cf "${base_tar}.tmp" .
        mv "${base_tar}.tmp" "${base_tar}"
        rm -rf "${rootfs}"
    fi
    log "importing ${base_tar} as ${base_tag}"
    "${docker}" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        "${base_tar}" "${base_tag}" >/dev/null
fi

# --- step 2: wheelhouse on the host -----------------------------------------

wheelhouse="${cache_dir}/context/wheelhouse"
wheel_stamp="${wheelhouse}/.requirements.sha256"
wheel_hash=$(sha256_of "${requirements}")
if [[ ${force} -eq 0 && -f "${wheel_stamp}" && "$(cat "${wheel_stamp}")" == "${wheel_hash}" ]]; then
    log "wheelhouse matches requirements-cpu.txt; reusing it"
else
    log "downloading wheels for CPython 3.11 x86_64 into ${wheelhouse}"
    rm -rf "${wheelhouse}.tmp"
    mkdir -p "${wheelhouse}.tmp"

    # bookworm has glibc 2.36, so every manylinux tag up to 2.36 fits
    platforms=()
    for platform_tag in manylinux_2_36 manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
        manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
        platforms+=(--platform "${platform_tag}_x86_64")
    done
    index_args=()
    if [[ -n "${EVOLVE_TORCH_INDEX_URL:-}" ]]; then
        index_args=(--extra-index-url "${EVOLVE_TORCH_INDEX_URL}")
    fi
    "${python}" -m pip download --quiet --only-binary=:all: --python-version 3.11 --implementation cp \
        "${platforms[@]}" "${index_args[@]}" --dest "${wheelhouse}.tmp" -r "${requirements}" \
        || fail "pip download failed; torch==2.13.0+cpu comes from a local wheel directory or from PyTorch's CPU index (set EVOLVE_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)"

    # a CUDA torch would pull nvidia-* and triton wheels; the CPU image must not hold them
    if compgen -G "${wheelhouse}.tmp/nvidia_*" >/dev/null || compgen -G "${wheelhouse}.tmp/triton-*" >/dev/null; then
        fail "the wheelhouse contains CUDA wheels (nvidia-*, triton); check that torch resolved to the +cpu build"
    fi
    compgen -G "${wheelhouse}.tmp/torch-*+cpu-*.whl" >/dev/null \
        || fail "no torch +cpu wheel in the wheelhouse; pip picked another torch build"

    cp "${requirements}" "${wheelhouse}.tmp/requirements.txt"
    echo "${wheel_hash}" >"${wheelhouse}.tmp/.requirements.sha256"
    rm -rf "${wheelhouse}"
    mv "${wheelhouse}.tmp" "${wheelhouse}"
fi

# --- step 3: the sandbox image, built offline --------------------------------

base_id=$("${docker}" image inspect --format '{{.Id}}' "${base_tag}")
build_hash=$( (cat "${dockerfile}" "${requirements}"; echo "${base_id}") | sha256sum | cut -d' ' -f1)
current_hash=$("${docker}" image inspect --format '{{index .Config.Labels "evolve.build-hash"}}' "${tag}" 2>/dev/null || true)
if [[ ${force} -eq 0 && "${current_hash}" == "${build_hash}" ]]; then
    log "${tag} is up to date"
else
    log "building ${tag} with --network none"
    # The classic builder is used because Docker CLI 23 and newer need the buildx
    # plugin for BuildKit, and bookworm has no buildx package. The multi-stage
    # Dockerfile keeps the wheelhouse out of the final image without BuildKit.
    DOCKER_BUILDKIT=0 "${docker}" build --quiet --network none \
        --build-arg "BASE_IMAGE=${base_tag}" \
        --label "evolve.build-hash=${build_hash}" \
        -f "${dockerfile}" -t "${tag}" "${cache_dir}/context" >/dev/null \
        || fail "docker build failed; rerun without --quiet to see the step that failed: DOCKER_BUILDKIT=0 ${docker} build --network none -f ${dockerfile} ${cache_dir}/context"
    # drop the install stage (the wheelhouse plus a second copy of the
    # virtualenv) and the untagged image this build replaced
    "${docker}" image prune --force --filter "label=evolve.build-stage=install" >/dev/null
    "${docker}" image prune --force --filter "label=evolve.build-hash" >/dev/null
fi

size_bytes=$("${docker}" image inspect --format '{{.Size}}' "${tag}")
log "done: ${tag} ($((size_bytes / 1024 / 1024)) MiB)"
