#!/usr/bin/env bash
# Run the whole test suite on the real parts: same set-up as the service (plus the
# load balancer, Prometheus and helm the tests drive), then pytest. Non-zero on failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --test
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
