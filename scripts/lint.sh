#!/usr/bin/env bash
# The static checks CI runs before the tests (seconds): ruff lint, ruff format, mypy. Needs the .venv of
# scripts/setup.sh. `bash scripts/lint.sh --fix` applies ruff's fixes and formatting instead of checking.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff check --fix .
  .venv/bin/ruff format .
else
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
fi
.venv/bin/mypy
