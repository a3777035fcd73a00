#!/usr/bin/env bash
# The host firewall chains that keep nodes off the host and off private ranges (see README,
# "Isolation"): TSM-INPUT (from INPUT), TSM-FORWARD (from DOCKER-USER), TSM-ALLOW.
#   firewall.sh install   -> idempotent; touches nothing but these chains and their two jumps
#   firewall.sh remove    -> takes away exactly that
#   firewall.sh show
# A manager installs the same rules at start (node.network.firewall); this is for set-ups
# where the manager runs without the privilege to.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${TSM_VENV:-$ROOT/.venv}/bin/python"
[ -x "$PY" ] || PY=python3
cd "$ROOT" && exec "$PY" -m shared.firewall "${1:-show}"
