#!/usr/bin/env bash
# Creates .venv in the repository root with everything kronecker-scale needs on a CPU machine, installs
# the package (editable) and its `kscale` command, and fetches the real tokenizer files the tests use.
# Idempotent: a second run with unchanged requirements only re-checks the tokenizer files.
# torch comes from the CPU wheel (torch==2.13.0+cpu) and every pip call is pinned against it, so no
# CUDA build is ever pulled. GPU clusters: see docs/setup.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${KSCALE_PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "error: Python 3.11 is required (the CPU torch wheel is cp311); set KSCALE_PYTHON=/path/to/python3.11" >&2
  exit 2
fi

C=requirements/constraints-cpu.txt
stamp_key=$(cat $C requirements/lock-cpu.txt requirements/no-deps.txt pyproject.toml | sha256sum | cut -c1-16)
stamp=.venv/.kscale-setup-$stamp_key

if [ ! -f "$stamp" ]; then
  echo "== kscale set-up: creating .venv (a few minutes the first time)"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pip_q() {  # quiet pip; drops this machine's harmless "find-links location is ignored" warnings
    { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1; } | { grep -v "is ignored: it is neither" || true; }
  }
  pip_q install torch==2.13.0 -c $C
  pip_q install -r requirements/lock-cpu.txt -c $C
  pip_q install --no-deps --ignore-requires-python -r requirements/no-deps.txt -c $C
  # PyPI's torchvision is a CUDA build that cannot load beside the CPU torch; streaming works without it
  pip_q uninstall -y torchvision >/dev/null 2>&1 || true
  pip_q install --no-deps -e . -c $C
  .venv/bin/python -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.endswith("+cpu") else f"expected the CPU torch, found {v}")'
  rm -f .venv/.kscale-setup-*
  touch "$stamp"
fi
.venv/bin/kscale tokenizers --fetch --quiet
