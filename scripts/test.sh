#!/usr/bin/env bash
# The README's test command: set-up (idempotent), then the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q --timeout=900 tests "$@"
