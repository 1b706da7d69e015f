#!/usr/bin/env bash
# Formatter and linter check (ruff, settings in pyproject.toml); CI runs it before the tests.
#   launch/lint.sh          check only (exit 1 on any difference or finding)
#   launch/lint.sh --fix    reformat and apply the safe fixes
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup_venv.sh
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff format .
  .venv/bin/ruff check --fix .
else
  .venv/bin/ruff format --check .
  .venv/bin/ruff check .
fi
