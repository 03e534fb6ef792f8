#!/usr/bin/env bash
# The README's main job: set-up (idempotent), then the main job on its small built-in default.
# Today: byte tables of five real tokenizers (exact vs decode, pos_dim 16/32), coverage and collision
# tables, a plot, and the parameter accounting of the paper. Output in runs/demo/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/kscale demo --out "${1:-runs/demo}"
