#!/usr/bin/env bash
# Run the whole test suite on the real parts: same set-up as the service (plus the
# load balancer, Prometheus and helm the tests drive), lint and types (ruff, mypy: config in
# pyproject.toml; `.venv/bin/ruff check --fix .` fixes the safe ones), then pytest. Non-zero on failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" --test
cd "$ROOT"
"$ROOT/.venv/bin/ruff" check .
"$ROOT/.venv/bin/mypy"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
