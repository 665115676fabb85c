# Shared by install.sh and tests/run.sh: what building EdgeSite needs on Debian.
# shellcheck shell=bash

apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[edgesite] installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

install_build_deps() {
  # libprotobuf-dev: the well-known .proto files the etcd client is generated from.
  apt_install ca-certificates curl build-essential pkg-config protobuf-compiler libprotobuf-dev
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      # Debian's toolchain when no rustup toolchain is present.
      apt_install cargo rustc
    fi
  fi
  # The workspace needs Rust 1.89 or newer (edition 2024, kube 5).
  local version minor
  version="$(rustc --version 2>/dev/null | awk '{print $2}')"
  minor="$(echo "$version" | cut -d. -f2)"
  if [ -z "$version" ] || [ "${minor:-0}" -lt 89 ]; then
    echo "[edgesite] error: Rust 1.89 or newer is needed to build EdgeSite, found ${version:-none}." >&2
    echo "[edgesite] Install a current toolchain with rustup (https://rustup.rs) and run me again." >&2
    exit 1
  fi
}

# What a node needs to run containers: containerd, runc, the CNI plugins and iptables, all
# from the OS packages.
install_node_deps() {
  # conntrack: the service proxy clears UDP flows to endpoints that left.
  apt_install containerd runc containernetworking-plugins iptables iproute2 procps conntrack
}

# What a server with an embedded etcd (--cluster-init) or its tests need: Debian's etcd and etcdctl.
install_etcd_deps() {
  apt_install etcd-server etcd-client
}
