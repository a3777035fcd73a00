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
# Test files run side by side, whole files per worker, the longest first (tests/conftest.py): a
# test spends most of its time waiting on dockerd, Redis or a node, not on a core (three workers
# used 47 % of the 2 cores: 13.5 CPU-minutes in 14.3; four took 9 m 45 s where three took 13 m 23 s,
# with the file order since corrected; six took the same 14 m 4 s as four on 2026-12-07, the two
# cores busy throughout). Each file's module fixtures stay in one process; the end-of-run machine
# check runs once all are done.
# TSM_TEST_WORKERS=0 runs them one after the other (as does `-n 0`).
# Every replica a test starts is a new Python process: with PYTHONDONTWRITEBYTECODE set (as in some
# CI shells) each compiled the project's sources anew, 0.35 s of CPU a start and some 300 starts a
# run. Bytecode is cached under the venv instead, so the source tree still gets none.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX="$ROOT/.venv/pycache"
WORKERS="${TSM_TEST_WORKERS:-4}"
PARALLEL=()
[ "$WORKERS" != 0 ] && PARALLEL=(-n "$WORKERS" --dist loadfile --no-loadscope-reorder)
exec "$ROOT/.venv/bin/python" -m pytest "${PARALLEL[@]}" "$@"
