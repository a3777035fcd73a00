#!/usr/bin/env bash
# Start or stop the real parts the same way everywhere (set-up, tests, benchmarks):
#   services.sh start-redis | stop-redis | start-dockerd | stop-dockerd
set -euo pipefail
STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"
REDIS_PORT="${TSM_REDIS_PORT:-6379}"
DOCKER=/usr/bin/docker
mkdir -p "$STATE"
die() { printf '\033[31m[services] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

start_redis() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
  echo "[services] starting redis-server on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes --save '' --appendonly no \
    --logfile "$STATE/redis.log" || die "redis-server did not start (see $STATE/redis.log)"
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "redis-server not answering on 127.0.0.1:$REDIS_PORT (see $STATE/redis.log)"
}

stop_redis() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 || return 0; sleep 0.1; done
}

start_dockerd() {
  "$DOCKER" info >/dev/null 2>&1 && return 0
  echo "[services] starting dockerd (log: $STATE/dockerd.log)"
  # --live-restore: restarting dockerd must not kill the nodes
  nohup dockerd --live-restore >>"$STATE/dockerd.log" 2>&1 &
  for _ in $(seq 150); do "$DOCKER" info >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "dockerd did not start: $(grep -iE 'level=(error|fatal)' "$STATE/dockerd.log" | tail -1) (it needs root and cgroups; see $STATE/dockerd.log)"
}

stop_dockerd() {
  local pid
  # the default engine only: a second engine (scripts/second-engine.sh) is a dockerd too
  pid=$(cat /var/run/docker.pid 2>/dev/null || true)
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 0  # a stale pid file
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  die "dockerd did not stop"
}

case "${1:-}" in
  start-redis) start_redis ;;
  stop-redis) stop_redis ;;
  start-dockerd) start_dockerd ;;
  stop-dockerd) stop_dockerd ;;
  *) echo "usage: $0 start-redis|stop-redis|start-dockerd|stop-dockerd" >&2; exit 2 ;;
esac
