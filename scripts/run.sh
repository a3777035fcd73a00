#!/usr/bin/env bash
# Run the service: set up what is missing, then one manager with its built-in checker
# on 127.0.0.1:8080 in the foreground. Ctrl-C stops it gracefully (lease released,
# replica deregistered); Redis, dockerd and the nodes' records stay consistent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
export TSM_CONFIG="${TSM_CONFIG:-$ROOT/config/manager.yml}"
echo "[run] manager on http://127.0.0.1:${TSM_PORT:-8080} (config: $TSM_CONFIG); Ctrl-C to stop"
exec "$ROOT/.venv/bin/toolserver-manager" --host 127.0.0.1 --port "${TSM_PORT:-8080}" "$@"
