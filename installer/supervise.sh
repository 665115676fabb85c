#!/usr/bin/env bash
# Keeps a command running when systemd is not PID 1: restarts it with a growing delay (capped).
# usage: supervise.sh "COMMAND ARGS" LOGFILE
set -u
cmd="$1"
log="$2"
delay=1
# Fewer glibc malloc arenas: less memory under concurrency at the same speed (see edgesite.service).
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
trap 'kill "$child" 2>/dev/null; wait "$child" 2>/dev/null; exit 0' TERM INT
while true; do
  started=$(date +%s)
  # shellcheck disable=SC2086
  $cmd >>"$log" 2>&1 &
  child=$!
  wait "$child"
  code=$?
  echo "[supervisor] ${cmd%% *} exited with $code; restarting in ${delay}s" >>"$log"
  sleep "$delay"
  if [ $(( $(date +%s) - started )) -gt 60 ]; then delay=1; else delay=$(( delay * 2 > 30 ? 30 : delay * 2 )); fi
done
