#!/usr/bin/env bash
# The README's test command: set-up (idempotent), then the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# CI and a fresh checkout test the CPU set-up; a .venv already made for another target (e.g. with
# KSCALE_TARGET=cuda on a GPU machine, where the kernel tests then run compiled) is kept and tested as it is.
KSCALE_TARGET=${KSCALE_TARGET:-$(cat .venv/.kscale-target 2>/dev/null || echo cpu)} bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q --timeout=900 tests "$@"
