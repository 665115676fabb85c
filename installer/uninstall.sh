#!/usr/bin/env bash
# Stops EdgeSite and removes it. Keeps the data dir unless --purge is given.
set -euo pipefail
data_dir="${EDGESITE_DATA_DIR:-/var/lib/edgesite}"
[ "$(id -u)" = 0 ] || { echo "run me as root" >&2; exit 1; }
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && [ -f /etc/systemd/system/edgesite.service ]; then
  systemctl disable --now edgesite.service >/dev/null 2>&1 || true
  rm -f /etc/systemd/system/edgesite.service
  systemctl daemon-reload
fi
if [ -f /run/edgesite-supervisor.pid ]; then
  kill "$(cat /run/edgesite-supervisor.pid)" 2>/dev/null || true
  rm -f /run/edgesite-supervisor.pid
fi
pkill -f "/usr/local/bin/edgesite server" 2>/dev/null || true
pkill -f "/usr/local/bin/edgesite agent" 2>/dev/null || true
# Containers keep running when edgesite stops (that is the point); removing it stops them.
sock=/run/containerd/containerd.sock
if command -v ctr >/dev/null 2>&1 && ctr --address "$sock" version >/dev/null 2>&1; then
  for t in $(ctr --address "$sock" -n edgesite tasks ls -q 2>/dev/null); do
    ctr --address "$sock" -n edgesite tasks kill -a -s SIGKILL "$t" >/dev/null 2>&1 || true
  done
  sleep 1
  for t in $(ctr --address "$sock" -n edgesite tasks ls -q 2>/dev/null); do
    ctr --address "$sock" -n edgesite tasks delete -f "$t" >/dev/null 2>&1 || true
  done
fi
# Pod network namespaces and tmpfs volumes are mounts under the data dir.
{ grep -o " $data_dir/[^ ]*" /proc/self/mountinfo 2>/dev/null || true; } | sort -r | while read -r m; do
  umount -l "$m" 2>/dev/null || true
done
ip link del edgesite0 2>/dev/null || true
# The mesh's DNS address and iptables rules (the agent removes its rules when it stops cleanly;
# after a kill they remain).
ip link del edgemesh0 2>/dev/null || true
ip addr del 169.254.96.16/32 dev lo 2>/dev/null || true
# Every rule the mesh hooked into the built-in chains (services, node ports, network policy),
# then every EDGEMESH chain, in both tables.
for table in nat filter; do
  iptables-save -t "$table" 2>/dev/null | grep '^-A .*--comment "edgesite mesh: ' | sed 's/^-A /-D /' | while read -r rule; do
    eval "iptables -w 5 -t $table $rule" 2>/dev/null || true
  done
  chains=$(iptables-save -t "$table" 2>/dev/null | sed -n 's/^:\(EDGEMESH[^ ]*\) .*/\1/p')
  for chain in $chains; do iptables -w 5 -t "$table" -F "$chain" 2>/dev/null || true; done
  for chain in $chains; do iptables -w 5 -t "$table" -X "$chain" 2>/dev/null || true; done
done
# The pods' egress rules (kept while the agent is stopped, for the pods that still run).
iptables-save -t nat 2>/dev/null | grep -- '--comment "edgesite: pods of ' | sed 's/^-A /-D /' | while read -r rule; do
  eval "iptables -w 5 -t nat $rule" 2>/dev/null || true
done
# The containerd this installer started without systemd (a system one is left alone).
if [ -f /run/edgesite-containerd-supervisor.pid ]; then
  kill "$(cat /run/edgesite-containerd-supervisor.pid)" 2>/dev/null || true
  rm -f /run/edgesite-containerd-supervisor.pid
  pkill -x containerd 2>/dev/null || true
fi
rm -f /usr/local/bin/edgesite /usr/local/bin/edgesite-mapper-modbus /usr/local/bin/edgesite-mapper-virtual
rm -rf /etc/edgesite
if [ "${1:-}" = "--purge" ]; then
  rm -rf "$data_dir" /var/log/edgesite
  echo "[edgesite] removed, data included"
else
  echo "[edgesite] removed; data kept in $data_dir (use --purge to delete it)"
fi
