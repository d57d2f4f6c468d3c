#!/usr/bin/env bash
# A real (old) kube-apiserver on loopback, for `make test-apiserver`.
#
#   tools/kube_apiserver.sh build            install etcd-server + Go, build kube-apiserver v1.20 once
#   tools/kube_apiserver.sh start RUNDIR     start etcd + kube-apiserver; writes RUNDIR/kubeconfig
#   tools/kube_apiserver.sh stop RUNDIR      stop what `start RUNDIR` started
#
# The binary is built from Debian bookworm's `kubernetes` source package (v1.20.x; there is no
# newer apiserver in these registries) and cached under
# ~/.cache/nemotron-serve/tools/kube-apiserver-1.20 (NEMOTRON_SERVE_CACHE overrides the root).
# Everything binds 127.0.0.1 only. There is no kubelet, scheduler or controller manager: objects
# are stored and validated, Pods never run, PVCs never bind.
set -euo pipefail

CACHE_ROOT=${NEMOTRON_SERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nemotron-serve}
DIR=$CACHE_ROOT/tools/kube-apiserver-1.20
BIN=$DIR/bin/kube-apiserver
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

log() { echo "kube_apiserver.sh: $*" >&2; }

ensure_packages() {
  local missing=()
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v go >/dev/null || missing+=(golang-go)
  command -v dpkg-source >/dev/null || missing+=(dpkg-dev)
  command -v make >/dev/null || missing+=(make)
  command -v rsync >/dev/null || missing+=(rsync)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_deb_src() {
  if ! grep -rqs '^Types:.*deb-src\|^deb-src ' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding a deb-src line for bookworm"
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      | $SUDO tee /etc/apt/sources.list.d/nemotron-serve-deb-src.sources >/dev/null
    $SUDO apt-get update -qq
  fi
}

build() {
  ensure_packages
  if [ -x "$BIN" ]; then
    return 0
  fi
  ensure_deb_src
  mkdir -p "$DIR/src" "$DIR/bin"
  local src
  src=$(find "$DIR/src" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -1)
  if [ -z "$src" ]; then
    log "fetching Debian's kubernetes source package"
    (cd "$DIR/src" && apt-get source -qq kubernetes >/dev/null)
    src=$(find "$DIR/src" -maxdepth 1 -mindepth 1 -type d -name 'kubernetes-*' | head -1)
  fi
  log "building kube-apiserver in $src (a few minutes)"
  (
    cd "$src"
    export GOFLAGS=-mod=vendor GO111MODULE=on GOPROXY=off GOTOOLCHAIN=local
    make generated_files >"$DIR/build.log" 2>&1
    make WHAT=cmd/kube-apiserver >>"$DIR/build.log" 2>&1
  ) || { log "build failed; see $DIR/build.log"; tail -30 "$DIR/build.log" >&2; exit 1; }
  cp "$(find "$src/_output" -type f -name kube-apiserver -perm -u+x | head -1)" "$BIN.tmp"
  mv "$BIN.tmp" "$BIN"
  log "built $BIN"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start() {
  local run=${1:?usage: start RUNDIR}
  build
  mkdir -p "$run"
  run=$(cd "$run" && pwd)
  local etcd_port peer_port api_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  # Serving certificate and service-account key, self-signed, per run.
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
    -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    -keyout "$run/serving.key" -out "$run/serving.crt" 2>/dev/null
  openssl genrsa -out "$run/sa.key" 2048 2>/dev/null
  local token
  token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  echo "$token,admin,admin,system:masters" >"$run/tokens.csv"

  etcd --name nemotron --data-dir "$run/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "nemotron=http://127.0.0.1:$peer_port" \
    >"$run/etcd.log" 2>&1 &
  echo $! >"$run/etcd.pid"

  "$BIN" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$run/serving.crt" --tls-private-key-file "$run/serving.key" \
    --token-auth-file "$run/tokens.csv" --authorization-mode RBAC \
    --service-account-key-file "$run/sa.key" --service-account-signing-key-file "$run/sa.key" \
    --service-account-issuer https://kubernetes.default.svc --api-audiences https://kubernetes.default.svc \
    --service-cluster-ip-range 10.96.0.0/16 \
    --enable-admission-plugins NamespaceLifecycle,LimitRanger,ResourceQuota,DefaultStorageClass,ServiceAccount \
    --disable-admission-plugins StorageObjectInUseProtection,DefaultTolerationSeconds,Priority,TaintNodesByCondition,PersistentVolumeClaimResize,RuntimeClass,CertificateApproval,CertificateSigning,CertificateSubjectRestriction,DefaultIngressClass,MutatingAdmissionWebhook,ValidatingAdmissionWebhook \
    >"$run/kube-apiserver.log" 2>&1 &
  echo $! >"$run/kube-apiserver.pid"

  cat >"$run/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: loopback
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $run/serving.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: loopback
  context: {cluster: loopback, user: admin}
current-context: loopback
KUBECONFIG

  local i
  for i in $(seq 1 120); do
    if curl -sf --cacert "$run/serving.crt" -H "Authorization: Bearer $token" \
        "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      log "kube-apiserver ready on https://127.0.0.1:$api_port (kubeconfig $run/kubeconfig)"
      return 0
    fi
    if ! kill -0 "$(cat "$run/kube-apiserver.pid")" 2>/dev/null; then
      log "kube-apiserver exited"; tail -20 "$run/kube-apiserver.log" >&2; stop "$run"; exit 1
    fi
    sleep 0.5
  done
  log "kube-apiserver not ready after 60 s"; tail -20 "$run/kube-apiserver.log" >&2; stop "$run"; exit 1
}

stop() {
  local run=${1:?usage: stop RUNDIR} name pid
  for name in kube-apiserver etcd; do
    if [ -f "$run/$name.pid" ]; then
      pid=$(cat "$run/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$run/$name.pid"
    fi
  done
}

case "${1:-}" in
  build) build ;;
  path) echo "$BIN" ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 build | path | start RUNDIR | stop RUNDIR" >&2; exit 2 ;;
esac
