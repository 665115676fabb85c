#!/usr/bin/env bash
# Installs and starts an EdgeSite site on this machine (Debian, as root).
#
#   ./installer/install.sh            build from this checkout, install, start `edgesite server`
#   EDGESITE_URL=https://SERVER:6443 EDGESITE_TOKEN=K10... ./installer/install.sh
#                                     the same, but join SERVER's site as an agent (K3s-style)
#   EDGESITE_EXEC="server --cluster-init" ./installer/install.sh
#                                     the first of several servers (an embedded etcd)
#   EDGESITE_EXEC="server --server https://FIRST:6443" EDGESITE_TOKEN=... ./installer/install.sh
#                                     another server of FIRST's site (FIRST's <data-dir>/server/token)
#
# Environment: EDGESITE_EXEC ("server --tls-san my.host"), EDGESITE_DATA_DIR (/var/lib/edgesite),
# EDGESITE_PORT (6443), EDGESITE_KUBECONFIG (/etc/edgesite/edgesite.yaml), EDGESITE_URL and
# EDGESITE_TOKEN (agent mode).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
data_dir="${EDGESITE_DATA_DIR:-/var/lib/edgesite}"
port="${EDGESITE_PORT:-6443}"
kubeconfig="${EDGESITE_KUBECONFIG:-/etc/edgesite/edgesite.yaml}"
if [ -n "${EDGESITE_URL:-}" ]; then
  exec_args="${EDGESITE_EXEC:-agent}"
else
  exec_args="${EDGESITE_EXEC:-server}"
fi
mode="${exec_args%% *}"
log_dir=/var/log/edgesite

say() { printf '[edgesite] %s\n' "$*"; }
die() { printf '[edgesite] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run me as root (I install packages and a service)"
command -v apt-get >/dev/null || die "this installer supports Debian and derivatives (apt-get not found)"

# shellcheck source=installer/deps.sh
. "$here/deps.sh"
install_build_deps
install_node_deps
# An embedded etcd (several servers per site) runs Debian's etcd.
case " $exec_args " in
  *" --cluster-init "*|*" --server "*|*" --server="*) install_etcd_deps ;;
  *) [ -d "$data_dir/server/db/etcd" ] && install_etcd_deps ;;
esac

say "building the release binary (a few minutes on a small machine)"
(cd "$repo" && cargo build --release --locked -p edgesite -p devices --bins)
install -m 0755 "$repo/target/release/edgesite" /usr/local/bin/edgesite
# The bundled device mappers (docs/devices.md).
for m in edgesite-mapper-modbus edgesite-mapper-virtual; do
  install -m 0755 "$repo/target/release/$m" "/usr/local/bin/$m"
done
install -d -m 0755 /etc/edgesite
install -d -m 0700 "$data_dir"
say "installed /usr/local/bin/edgesite ($(/usr/local/bin/edgesite --version))"

# The node agent runs containers through containerd (skip with EDGESITE_EXEC="server --disable-agent").
if ! ctr --address /run/containerd/containerd.sock version >/dev/null 2>&1; then
  if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    systemctl enable --now containerd >/dev/null
  else
    install -d -m 0755 "$log_dir"
    nohup "$here/supervise.sh" "/usr/bin/containerd" "$log_dir/containerd.log" >/dev/null 2>&1 &
    echo $! > /run/edgesite-containerd-supervisor.pid
  fi
  for _ in $(seq 1 50); do
    ctr --address /run/containerd/containerd.sock version >/dev/null 2>&1 && break
    sleep 0.2
  done
  ctr --address /run/containerd/containerd.sock version >/dev/null 2>&1 \
    || die "containerd did not start; see journalctl -u containerd or $log_dir/containerd.log"
  say "containerd is running"
fi
install -d -m 0755 "$data_dir/agent/images"

# shellcheck disable=SC2086
if [ "$mode" = agent ]; then
  [ -n "${EDGESITE_URL:-}" ] || die "agent mode needs EDGESITE_URL=https://SERVER:6443 (and EDGESITE_TOKEN for the first join)"
  # The token is needed once (the agent keeps its certificate); keep it out of ps and unit files.
  umask 077
  printf 'EDGESITE_URL=%s\nEDGESITE_TOKEN=%s\n' "$EDGESITE_URL" "${EDGESITE_TOKEN:-}" > /etc/edgesite/agent.env
  umask 022
  args="$exec_args --data-dir $data_dir"
else
  args="$exec_args --data-dir $data_dir --https-listen-port $port --write-kubeconfig $kubeconfig"
  # A server joining another (--server) reads the site's token from the environment, not ps.
  umask 077
  printf 'EDGESITE_TOKEN=%s\n' "${EDGESITE_TOKEN:-}" > /etc/edgesite/server.env
  [ -n "${EDGESITE_TOKEN:-}" ] || : > /etc/edgesite/server.env
  umask 022
fi
env_file=/etc/edgesite/agent.env
[ "$mode" = agent ] || env_file=/etc/edgesite/server.env

if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
  sed -e "s|@ARGS@|$args|" "$here/edgesite.service" > /etc/systemd/system/edgesite.service
  sed -i -e "s|^\\[Service\\]|[Service]\\nEnvironmentFile=$env_file|" /etc/systemd/system/edgesite.service
  systemctl daemon-reload
  systemctl enable edgesite.service >/dev/null
  systemctl restart edgesite.service
  say "started the systemd unit edgesite.service (logs: journalctl -u edgesite)"
else
  # No systemd (containers, CI): a supervised background process with a log file.
  install -d -m 0755 "$log_dir"
  if [ -f /run/edgesite-supervisor.pid ] && kill -0 "$(cat /run/edgesite-supervisor.pid)" 2>/dev/null; then
    kill "$(cat /run/edgesite-supervisor.pid)" 2>/dev/null || true
    pkill -f "/usr/local/bin/edgesite (server|agent)" 2>/dev/null || true
    sleep 1
  fi
  set -a
  # shellcheck disable=SC1090
  . "$env_file"
  set +a
  nohup "$here/supervise.sh" "/usr/local/bin/edgesite $args" "$log_dir/edgesite.log" >/dev/null 2>&1 &
  echo $! > /run/edgesite-supervisor.pid
  say "started edgesite under a supervisor (pid $(cat /run/edgesite-supervisor.pid)); log: $log_dir/edgesite.log"
fi

if [ "$mode" = agent ]; then
  say "waiting for the agent to join $EDGESITE_URL"
  for _ in $(seq 1 150); do
    if [ -f "$data_dir/agent/pki/node.crt" ]; then
      say "joined. On the server: kubectl get nodes"
      exit 0
    fi
    sleep 0.2
  done
  die "the agent did not join within 30 s; see journalctl -u edgesite or $log_dir/edgesite.log"
fi

say "waiting for the API server to be ready"
# A joining server first waits its turn in etcd and catches up.
tries=150
case " $exec_args " in *" --server "*|*" --server="*) tries=600 ;; esac
for _ in $(seq 1 "$tries"); do
  if [ -f "$kubeconfig" ] && curl -fsk "https://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
    say "ready. Try:"
    echo
    echo "    KUBECONFIG=$kubeconfig kubectl get ns"
    echo
    exit 0
  fi
  sleep 0.2
done
die "edgesite did not become ready within $((tries / 5)) s; see journalctl -u edgesite or $log_dir/edgesite.log"
