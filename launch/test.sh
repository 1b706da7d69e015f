#!/usr/bin/env bash
# Run the test suite (creates ./.venv on first use). Extra arguments go to pytest.
#   launch/test.sh            the whole suite (what CI runs; 25-45 minutes on 2 cores)
#   launch/test.sh --fast     the fast tier for the edit-test loop (< 3 minutes on 2 cores): every
#                             module covered, the slow end-to-end runs left out (tests marked
#                             'slow' in tests/conftest.py SLOW_TESTS)
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup_venv.sh
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow" "$@"
fi
exec .venv/bin/python -m pytest tests "$@"
