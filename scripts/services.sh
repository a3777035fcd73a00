#!/usr/bin/env bash
# Start or stop the real parts the same way everywhere (set-up, tests, benchmarks):
#   services.sh redis-password | start-redis | stop-redis | start-dockerd
# No stop-dockerd: the engine is the machine's (its containers are not all ours); tests that need
# an engine to go away start one of their own (testing/hosts.py PrivateEngine).
set -euo pipefail
STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"
REDIS_PORT="${TSM_REDIS_PORT:-6380}"
REDIS_PASSWORD_FILE="$STATE/redis-password"   # root only (0600); testing/redis_env.py reads it
REDIS_CONF="$STATE/redis-$REDIS_PORT.conf"
REDIS_PIDFILE="$STATE/redis-$REDIS_PORT.pid"
DOCKER=/usr/bin/docker
mkdir -p "$STATE"
die() { printf '\033[31m[services] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

# The project's own Redis: never the machine's (127.0.0.1:6379 may be someone else's, without
# a password). It listens on 127.0.0.1:$REDIS_PORT and requires the password in a root-only file,
# so a local user can neither read node records nor rewrite them. The password reaches
# redis-server in a root-only config file and redis-cli in its environment, never on a command
# line (any local user reads /proc/<pid>/cmdline).
redis_password() {
  if [ ! -s "$REDIS_PASSWORD_FILE" ]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$REDIS_PASSWORD_FILE")
  fi
  chmod 600 "$REDIS_PASSWORD_FILE"
  cat "$REDIS_PASSWORD_FILE"
}

redis_ping() {
  [ "$(REDISCLI_AUTH="$(redis_password)" redis-cli --no-auth-warning -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
}

start_redis() {
  [ "$REDIS_PORT" != 6379 ] || die "TSM_REDIS_PORT=6379 is the machine's Redis: the project runs its own (6380 by default)"
  redis_ping && return 0
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 \
    && die "something on 127.0.0.1:$REDIS_PORT answers without the project's password ($REDIS_PASSWORD_FILE): not ours"
  echo "[services] starting the project's redis-server on 127.0.0.1:$REDIS_PORT (password: $REDIS_PASSWORD_FILE)"
  (umask 077; cat >"$REDIS_CONF" <<CONF
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
requirepass $(redis_password)
daemonize yes
pidfile $REDIS_PIDFILE
logfile $STATE/redis-$REDIS_PORT.log
dir $STATE
save ""
appendonly no
CONF
  )
  redis-server "$REDIS_CONF" || die "redis-server did not start (see $STATE/redis-$REDIS_PORT.log)"
  for _ in $(seq 50); do redis_ping && return 0; sleep 0.1; done
  die "redis-server not answering on 127.0.0.1:$REDIS_PORT (see $STATE/redis-$REDIS_PORT.log)"
}

stop_redis() {
  # only the server this script started (its pid file), whatever answers on the port
  local pid
  pid=$(cat "$REDIS_PIDFILE" 2>/dev/null || true)
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = redis-server ] || return 0
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  die "redis-server $pid did not stop"
}

start_dockerd() {
  "$DOCKER" info >/dev/null 2>&1 && return 0
  echo "[services] starting dockerd (log: $STATE/dockerd.log)"
  # --live-restore: restarting dockerd must not kill the nodes
  nohup dockerd --live-restore >>"$STATE/dockerd.log" 2>&1 &
  for _ in $(seq 150); do "$DOCKER" info >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "dockerd did not start: $(grep -iE 'level=(error|fatal)' "$STATE/dockerd.log" | tail -1) (it needs root and cgroups; see $STATE/dockerd.log)"
}

case "${1:-}" in
  redis-password) redis_password ;;
  start-redis) start_redis ;;
  stop-redis) stop_redis ;;
  start-dockerd) start_dockerd ;;
  *) echo "usage: $0 redis-password|start-redis|stop-redis|start-dockerd" >&2; exit 2 ;;
esac
