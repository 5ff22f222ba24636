#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the whole test suite, one pytest-xdist worker
# per usable core (LDMKIT_TEST_WORKERS overrides: 0 runs in this process), each test file on
# one worker (its module fixtures are built once).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
workers="${LDMKIT_TEST_WORKERS:-$("$ROOT/.venv/bin/python" -c 'import os; print(len(os.sched_getaffinity(0)))')}"
exec "$ROOT/.venv/bin/python" -m pytest -q -n "$workers" --dist loadfile "$@"
