#!/usr/bin/env bash
# The container images built for real without a Docker daemon, for `make test-image`.
#
#   tools/container_image.sh tools           install buildah, podman and debootstrap if missing
#   tools/container_image.sh base            make the Python base image once (cached)
#   tools/container_image.sh build [TARGET]  build TARGET (cpu, wheel, gpu-standin) on it
#   tools/container_image.sh name [TARGET]   print the image name a build of TARGET tags
#   tools/container_image.sh layers [TARGET] print the built image's layers and their sizes
#   tools/container_image.sh clean           remove containers an interrupted test run left
#
# gpu-standin is the Dockerfile's gpu target on a stand-in for NVIDIA's TensorRT-LLM image (which
# cannot be pulled here): this base plus the CPU torch from TORCH_WHEELS, as that image brings its
# own torch. Its RUN lines run for real; there is no CUDA and no TensorRT-LLM in it.
#
# The base stands in for the official python:3.11-slim-bookworm (no registry is reachable here):
# Debian bookworm's minbase made by debootstrap, with Debian's python3 (3.11), its C headers,
# pip, the `python` name, ca-certificates, netbase and tzdata, and without Debian's EXTERNALLY-MANAGED marker (the
# official image has none, so `pip install` goes to the system Python as it does there). The
# root file system is cached as a tarball under ~/.cache/nemotron-serve/image
# (NEMOTRON_SERVE_CACHE overrides the root) and imported into the containers store once.
#
# torch comes from a directory of wheels (TORCH_WHEELS, default /opt/wheels, which must hold the
# torch-<version>+cpu wheel) handed to the build as the `torch-wheels` build context; its
# dependencies come from PyPI. Everything else the build fetches (Debian packages, PyPI
# packages, the embedded model) comes from the network, as in a real build. Where the network
# passes through a TLS-inspecting proxy (as here), the RUN steps must trust its CA: the host's
# bundle (BUILD_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt; empty: none) is mounted
# over the image's during the build only, with an /etc/pip.conf pointing pip at it (pip's own
# certifi would not know the proxy). Neither ends up in the image.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_ROOT=${NEMOTRON_SERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nemotron-serve}
DIR=$CACHE_ROOT/image
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_IMAGE=localhost/nemotron-serve-base:python3.11-$SUITE
BASE_TAR=$DIR/debian-$SUITE-python3.11.tar
TRTLLM_STAND_IN=localhost/nemotron-serve-base:python3.11-$SUITE-torch
TORCH_WHEELS=${TORCH_WHEELS:-/opt/wheels}
IMAGE_REPOSITORY=${IMAGE_REPOSITORY:-localhost/nemotron-serve}
# What the official image holds beside Python: its C headers (Python.h: torch.compile's CPU
# backend builds against them at run time), certificates, /etc/services and /etc/protocols, time
# zones. python-is-python3 gives the `python` name the Dockerfile's RUN lines use.
BASE_PACKAGES=python3,libpython3.11-dev,python3-pip,python-is-python3,ca-certificates,netbase,tzdata
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

log() { echo "container_image.sh: $*" >&2; }

ensure_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v podman >/dev/null || missing+=(podman)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v ip >/dev/null || missing+=(iproute2)  # the tests' network namespaces
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

make_rootfs_tar() {
  local rootfs=$DIR/rootfs.tmp
  mkdir -p "$DIR"
  $SUDO rm -rf "$rootfs"
  log "debootstrap $SUITE (minbase + $BASE_PACKAGES) into $rootfs"
  $SUDO debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
    >"$DIR/debootstrap.log" 2>&1 \
    || { log "debootstrap failed; see $DIR/debootstrap.log"; tail -20 "$DIR/debootstrap.log" >&2; exit 1; }
  # As the official image: pip may install into the system Python; no apt lists or caches.
  $SUDO rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
  $SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb
  $SUDO tar -C "$rootfs" --numeric-owner -cf "$BASE_TAR.tmp" .
  mv "$BASE_TAR.tmp" "$BASE_TAR"
  $SUDO rm -rf "$rootfs"
}

base() {
  ensure_tools
  if podman image exists "$BASE_IMAGE"; then
    return 0
  fi
  [ -f "$BASE_TAR" ] || make_rootfs_tar
  log "importing $BASE_TAR as $BASE_IMAGE"
  $SUDO podman import --quiet --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    "$BASE_TAR" "$BASE_IMAGE" >/dev/null
}

# The TensorRT-LLM image's stand-in: the base with the CPU torch installed (once).
trtllm_stand_in() {
  base
  if podman image exists "$TRTLLM_STAND_IN"; then
    return 0
  fi
  local trust ctr
  mapfile -t trust < <(trust_flags)
  ctr=$($SUDO buildah from --pull=never "$BASE_IMAGE")
  log "installing torch from $TORCH_WHEELS into $TRTLLM_STAND_IN"
  $SUDO buildah run --isolation chroot --network host "${trust[@]}" \
    --volume "$TORCH_WHEELS:/tmp/torch-wheels:ro" "$ctr" -- \
    pip install --no-cache-dir --find-links /tmp/torch-wheels "torch==$(torch_version)+cpu" \
    >"$DIR/trtllm-stand-in.log" 2>&1 \
    || { log "see $DIR/trtllm-stand-in.log"; $SUDO buildah rm "$ctr" >/dev/null; exit 1; }
  $SUDO buildah commit --quiet --rm "$ctr" "$TRTLLM_STAND_IN" >/dev/null
}

# The torch version pinned in pyproject.toml (the Dockerfile's TORCH_VERSION equals it).
torch_version() {
  sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' "$REPO_ROOT/pyproject.toml" | head -1
}

image_name() {
  local target=${1:-cpu}
  local version
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO_ROOT/pyproject.toml" | head -1)
  echo "$IMAGE_REPOSITORY:$version-$target"
}

# `buildah bud` flags that make the RUN steps trust the host's CA bundle, one a line.
trust_flags() {
  local bundle=${BUILD_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
  [ -n "$bundle" ] && [ -f "$bundle" ] || return 0
  mkdir -p "$DIR"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$DIR/pip.conf"
  echo "--volume=$bundle:/etc/ssl/certs/ca-certificates.crt:ro"
  echo "--volume=$DIR/pip.conf:/etc/pip.conf:ro"
}

build() {
  local target=${1:-cpu} stage=${1:-cpu} stand_in=()
  base
  if [ "$target" = gpu-standin ]; then
    trtllm_stand_in
    stage=gpu
    stand_in=(--build-arg TRTLLM_IMAGE="$TRTLLM_STAND_IN")
  fi
  local trust
  mapfile -t trust < <(trust_flags)
  [ -n "$(ls "$TORCH_WHEELS"/torch-*+cpu-*.whl 2>/dev/null)" ] \
    || { log "no torch-*+cpu-*.whl in $TORCH_WHEELS (TORCH_WHEELS)"; exit 1; }
  local name
  name=$(image_name "$target")
  log "building $name (target $target) with buildah"
  # --layers: a second build reuses every step whose inputs did not change. --format docker:
  # the OCI image format has no HEALTHCHECK (buildah drops it with a warning); Docker's keeps it.
  $SUDO buildah bud --isolation chroot --layers --format docker --target "$stage" \
    --build-arg PYTHON_IMAGE="$BASE_IMAGE" "${stand_in[@]}" \
    --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    --build-context torch-wheels="$TORCH_WHEELS" "${trust[@]}" \
    -t "$name" "$REPO_ROOT"
}

layers() {
  $SUDO podman history --format '{{.Size}}\t{{.CreatedBy}}' "$(image_name "${1:-cpu}")" \
    | cut -c1-160
}

# Working containers and memory cgroups of tests/deploy/image_container.py that an interrupted
# run did not remove (a cgroup goes only once no process is left in it).
clean() {
  local name
  for name in $($SUDO buildah containers --format '{{.ContainerName}}'); do
    case "$name" in
      nemotron-image-test-*) $SUDO buildah rm "$name" >/dev/null ;;
    esac
  done
  find /sys/fs/cgroup -mindepth 2 -maxdepth 8 -type d -name 'nemotron-image-test-*' \
    -exec $SUDO rmdir {} + 2>/dev/null || true
}

case "${1:-}" in
  tools) ensure_tools ;;
  base) base ;;
  build) build "${2:-cpu}" ;;
  name) image_name "${2:-cpu}" ;;
  layers) layers "${2:-cpu}" ;;
  clean) clean ;;
  *) echo "usage: $0 tools | base | build [TARGET] | name [TARGET] | layers [TARGET] | clean" >&2
     exit 2 ;;
esac
