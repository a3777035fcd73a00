#!/usr/bin/env bash
# Run the service: set up what is missing, then one manager with its built-in checker
# on 127.0.0.1:8080 (its console on 127.0.0.1:8081, an origin of its own) in the foreground.
# Ctrl-C stops it gracefully (lease released, replica deregistered); Redis, dockerd and the
# nodes' records stay consistent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
export TSM_CONFIG="${TSM_CONFIG:-$ROOT/config/manager.yml}"
STATE="${TSM_STATE_DIR:-/var/lib/toolserver-manager}"
# the project's Redis (set up above) requires the password setup.sh keeps root-only in the state dir
export TSM_REDIS__PASSWORD_FILE="${TSM_REDIS__PASSWORD_FILE:-$STATE/redis-password}"
# node secrets are derived from a key Redis never sees (shared/nodesecret.py), root only like the rest
if [ -z "${TSM_CLUSTER__NODE_SECRET_KEY:-}" ] && [ -z "${TSM_CLUSTER__NODE_SECRET_KEY_FILE:-}" ]; then
  export TSM_CLUSTER__NODE_SECRET_KEY_FILE="$STATE/node-secret-key"
  if [ ! -s "$TSM_CLUSTER__NODE_SECRET_KEY_FILE" ]; then
    (umask 077; head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$TSM_CLUSTER__NODE_SECRET_KEY_FILE")
  fi
fi
export TSM_ADMIN__CONSOLE_ASSETS_DIR="${TSM_ADMIN__CONSOLE_ASSETS_DIR:-$STATE/console-assets}"
# the admin API and console need a token: without one given, a random one kept in the state
# dir (root only), so the console works after this command with nothing else to do
if [ -z "${TSM_ADMIN__TOKEN:-}" ] && [ -z "${TSM_ADMIN__TOKEN_FILE:-}" ]; then
  export TSM_ADMIN__TOKEN_FILE="$STATE/admin-token"
  if [ ! -s "$TSM_ADMIN__TOKEN_FILE" ]; then
    (umask 077; head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$TSM_ADMIN__TOKEN_FILE")
  fi
fi
# each proxied connection holds two descriptors (the client's and the node's): raise the limit so
# proxy.max_client_connections fits (the manager lowers its cap to what the limit allows, and
# raises its own soft limit to the hard one, as it does in the chart's container)
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 65536 ]; then
  ulimit -Hn 65536 2>/dev/null ||
    echo "[run] the descriptor limit stays $(ulimit -Hn) (no CAP_SYS_RESOURCE): proxy.max_client_connections is lowered to fit it if need be" >&2
fi
ulimit -Sn "$(ulimit -Hn)"
echo "[run] manager on http://127.0.0.1:${TSM_PORT:-8080} (config: $TSM_CONFIG); Ctrl-C to stop"
export TSM_ADMIN__CONSOLE_PORT="${TSM_ADMIN__CONSOLE_PORT:-8081}"
echo "[run] console on http://127.0.0.1:${TSM_ADMIN__CONSOLE_PORT}/ui/ (admin token: ${TSM_ADMIN__TOKEN_FILE:-TSM_ADMIN__TOKEN})"
exec "$ROOT/.venv/bin/toolserver-manager" --host 127.0.0.1 --port "${TSM_PORT:-8080}" "$@"
