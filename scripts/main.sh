#!/usr/bin/env bash
# The README's main job: set-up (idempotent), then on a small built-in default:
#   1. assemble a small real English corpus (Gutenberg books; Brown + State of the Union held out),
#   2. tokenize it with GPT-2's vocabulary into MDS shards (seq_len 128),
#   3. train the tiny Kronecker model and the tiny BPE-tied baseline (configs/tiny-cpu*.yaml),
#   4. print and plot their validation losses (runs/compare/).
# Every step is resumable: a second run reuses the corpus and data and resumes the runs from `latest`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# the set-up the .venv was made for, else the CPU one (KSCALE_TARGET=cuda on a GPU node: docs/setup.md)
KSCALE_TARGET=${KSCALE_TARGET:-$(cat .venv/.kscale-target 2>/dev/null || echo cpu)} bash scripts/setup.sh
K=.venv/bin/kscale
$K demo-corpus --out runs/data/corpus
if [ ! -f runs/data/demo-gpt2-128/manifest.json ]; then
  $K prepare-data --tokenizer gpt2 --seq-len 128 --out runs/data/demo-gpt2-128 runs/data/corpus/train \
    --val-input runs/data/corpus/heldout
fi
$K train configs/tiny-cpu.yaml "$@"
$K train configs/tiny-cpu-bpe.yaml "$@"
$K compare runs/tiny-cpu runs/tiny-cpu-bpe --out runs/compare
# the README's demo table: spelling robustness and the paper's norm drift of the two checkpoints
$K probe typos runs/tiny-cpu runs/tiny-cpu-bpe --out runs/probes
$K probe norm-drift runs/tiny-cpu runs/tiny-cpu-bpe --out runs/probes
