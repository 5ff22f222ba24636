#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the whole test suite on pytest-xdist workers
# (LDMKIT_TEST_WORKERS overrides: 0 runs in this process), each test file on one worker (its
# module fixtures are built once).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
# one worker per usable core, at most 8 and one per 3 GiB of memory (each worker holds torch and
# the models of its tests)
workers="${LDMKIT_TEST_WORKERS:-$("$ROOT/.venv/bin/python" -c '
import os
memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
print(max(1, min(len(os.sched_getaffinity(0)), 8, int(memory // 3))))')}"
exec "$ROOT/.venv/bin/python" -m pytest -q -n "$workers" --dist loadfile "$@"
