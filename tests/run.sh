#!/usr/bin/env bash
# Runs every EdgeSite check: formatting, lints, unit tests and end-to-end tests against real
# servers with the real kubectl. Installs what it needs (Debian, as root).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# shellcheck source=installer/deps.sh
. installer/deps.sh
install_build_deps
if ! command -v kubectl >/dev/null 2>&1; then
  # Debian's kubectl (1.20); the tests adapt to its older validation.
  apt_install kubernetes-client
fi
command -v kubectl >/dev/null 2>&1 || { echo "kubectl is required for the end-to-end tests and could not be installed" >&2; exit 1; }
# Debian's kubectl 1.20 as well, whatever kubectl is on PATH: the oldest kubectl served, the one
# that validates against OpenAPI v2 only.
export KUBECTL_OLD="$repo/target/tools/kubectl-1.20"
if ! "$KUBECTL_OLD" version --client >/dev/null 2>&1; then
  old_tmp=$(mktemp -d)
  (cd "$old_tmp" && apt-get download kubernetes-client >/dev/null 2>&1 || { apt-get update -qq && apt-get download kubernetes-client >/dev/null; }) \
    && dpkg -x "$old_tmp"/kubernetes-client_*.deb "$old_tmp/x" \
    && mkdir -p "$repo/target/tools" && cp "$old_tmp/x/usr/bin/kubectl" "$KUBECTL_OLD"
  rm -rf "$old_tmp"
fi
# Real containers: containerd, runc, CNI plugins; a registry and busybox for the test images.
# Each test starts its own containerd; nothing here starts a system-wide one.
install_node_deps
apt_install docker-registry busybox-static apache2-utils
# MQTT clients (a legacy mapper in the device tests) and mosquitto (compared in the benchmark);
# tinyproxy, the HTTPS proxy a site reaches its cloud hub through (each test starts its own);
# openssl makes a forged site certificate for the hub to refuse.
apt_install mosquitto mosquitto-clients tinyproxy openssl
# nginx: the benchmark's peer for the ingress (each run starts its own in a namespace); the
# package's own service is kept from starting (it would take port 80 of this machine).
if ! dpkg -s nginx >/dev/null 2>&1; then
  if [ -e /usr/sbin/policy-rc.d ]; then
    apt_install nginx
  else
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt_install nginx
    rm -f /usr/sbin/policy-rc.d
  fi
fi
# Debian's etcd: the etcd backend's tests and the API suite's etcd pass (below).
install_etcd_deps
# Client libraries nobody here wrote, for the compatibility tests: the official Python client,
# kr8s, lightkube, kubernetes-asyncio, kopf and pykube-ng (PyPI); pymodbus, the Modbus TCP server the
# Modbus mapper is tested against; @kubernetes/client-node (npm).
venv="$repo/target/python-venv"
python_packages=("kubernetes==37.0.2" "pymodbus==3.6.9" "kr8s==0.20.15" "lightkube==1.0.1"
  "kubernetes-asyncio==36.1.0" "kopf==1.45.2" "pykube-ng==23.6.0")
if ! "$venv/bin/python" -c "import kubernetes, pymodbus, kr8s, lightkube, kubernetes_asyncio, kopf, pykube" >/dev/null 2>&1; then
  command -v python3 >/dev/null 2>&1 || apt_install python3
  if [ ! -x "$venv/bin/pip" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  fi
  "$venv/bin/pip" install -q "${python_packages[@]}"
fi
export EDGESITE_PYTHON="$venv/bin/python"
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
export EDGESITE_NODE_CLIENT="$repo/target/node-client"
if [ ! -f "$EDGESITE_NODE_CLIENT/node_modules/@kubernetes/client-node/package.json" ]; then
  mkdir -p "$EDGESITE_NODE_CLIENT"
  echo '{"name": "edgesite-client-node-check", "private": true, "type": "module"}' > "$EDGESITE_NODE_CLIENT/package.json"
  (cd "$EDGESITE_NODE_CLIENT" && npm install --silent --no-audit --no-fund "@kubernetes/client-node@1.4.0")
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component add clippy rustfmt >/dev/null 2>&1 || true
fi

echo "== kubectl: $(kubectl version --client 2>/dev/null | head -n1)"
echo "== format"
cargo fmt --all -- --check
echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build"
cargo build --workspace --bins --tests --locked
export EDGESITE_BIN="$repo/target/debug/edgesite"
echo "== test"
status=0
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --test-threads 4 || status=$?
else
  cargo test --workspace --locked --no-fail-fast -- --test-threads 4 || status=$?
fi
# The kubectl tests again with the oldest kubectl served (1.20: OpenAPI v2 validation,
# autoscaling/v1, older stream protocols).
# (--workspace, as above: the same features, so nothing is built again.)
echo "== kubectl tests with $("$KUBECTL_OLD" version --client --short 2>/dev/null | head -n1)"
if command -v cargo-nextest >/dev/null 2>&1; then
  KUBECTL="$KUBECTL_OLD" cargo nextest run --workspace --locked --no-fail-fast --test-threads 4 \
    -E 'binary(kubectl)' || status=$?
else
  KUBECTL="$KUBECTL_OLD" cargo test --workspace --locked --test kubectl -- --test-threads 4 || status=$?
fi
# The API suite again with every site's state in etcd: one etcd (Debian's etcd-server) on free
# loopback ports, one key prefix per site (tests/src/lib.rs, EDGESITE_TEST_ETCD).
echo "== API tests with the state in etcd ($(etcd --version | head -n1))"
etcd_dir="$repo/target/tmp/etcd-suite"
rm -rf "$etcd_dir" && mkdir -p "$etcd_dir"
read -r client_port peer_port < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
etcd --name suite --data-dir "$etcd_dir/data" \
  --listen-client-urls "http://127.0.0.1:$client_port" --advertise-client-urls "http://127.0.0.1:$client_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "suite=http://127.0.0.1:$peer_port" >"$etcd_dir/etcd.log" 2>&1 &
etcd_pid=$!
trap 'kill "$etcd_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$client_port" endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done
api_suite='binary(kubectl) | binary(python) | binary(client_node) | binary(rbac) | binary(workloads) | binary(client) | binary(cloudhub)'
if command -v cargo-nextest >/dev/null 2>&1; then
  EDGESITE_TEST_ETCD="http://127.0.0.1:$client_port" cargo nextest run --workspace --locked --no-fail-fast \
    --test-threads 4 -E "$api_suite" || status=$?
else
  for t in kubectl python client_node rbac workloads client cloudhub; do
    EDGESITE_TEST_ETCD="http://127.0.0.1:$client_port" cargo test --workspace --locked --test "$t" -- --test-threads 4 || status=$?
  done
fi
kill "$etcd_pid" 2>/dev/null || true
exit "$status"
