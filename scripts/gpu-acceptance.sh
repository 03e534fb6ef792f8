#!/usr/bin/env bash
# GPU acceptance on one H100/H200, in at most 8 minutes from a prepared environment
# (`KSCALE_TARGET=cuda bash scripts/setup.sh`). Prints a markdown report and writes it to
# $KSCALE_ACCEPT_OUT/report.md (default runs/gpu-acceptance/; logs of every section beside it):
#   1. versions: GPU, driver, torch, CUDA, cuDNN, NCCL, triton and torch's triton pin, megatron-core,
#      DeepSpeed, Transformer Engine (if importable);
#   2. the compiled Triton kernels against the fp64 reference (tests/test_kernels.py,
#      tests/test_kronecker_embedding.py, TRITON_INTERPRET unset);
#   3. one embedding benchmark point: V=131,072, d=4,096, P=32, bf16, N=16,384 and 65,536, fwd+bwd of
#      KroneckerEmbedding(impl="triton") vs nn.Embedding, achieved GB/s (tools/gpu_bench_point.py);
#   4. a probe with N·d > 2^31 (N=266,240, d=8,192): triton forward vs the torch closed form on a few rows;
#   5. a 4-layer configs/scale/1b-131k.yaml, Kronecker and BPE arms, 20 steps each as 10 + a resume to 20
#      (data: `kscale demo-corpus` + `kscale prepare-data`, as scripts/main.sh, prepared in the background
#      meanwhile): tokens/s, MFU (peak 989 TFLOP/s, H100/H200 dense bf16), memory, Kronecker/BPE ratio.
# Each section catches its own failure (and time-out) and reports it; the script goes on. Exit: 0 when
# every section passed, 1 otherwise, 2 at once without a usable CUDA GPU.
# KSCALE_ACCEPT_BUDGET_S (default 460) caps the whole run: a section that would start past it is skipped.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_gpu() {
  echo "error: scripts/gpu-acceptance.sh needs a CUDA GPU: $1." \
       "Run it on a GPU machine after KSCALE_TARGET=cuda bash scripts/setup.sh (docs/setup.md)." >&2
  exit 2
}
command -v nvidia-smi >/dev/null 2>&1 || need_gpu "nvidia-smi is not found (no NVIDIA driver)"
nvidia-smi -L 2>/dev/null | grep -q '^GPU ' || need_gpu "nvidia-smi lists no GPU"
export PY=.venv/bin/python K=.venv/bin/kscale
[ -x "$PY" ] && [ -x "$K" ] || need_gpu "there is no .venv yet"
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null ||
  need_gpu "the torch in .venv cannot use one (KSCALE_TARGET=cuda bash scripts/setup.sh prints why)"

export OUT=${KSCALE_ACCEPT_OUT:-runs/gpu-acceptance}
BUDGET=${KSCALE_ACCEPT_BUDGET_S:-460}
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/report.md" ]; then
  echo "error: $OUT is not empty and holds no report.md of an earlier run: refusing to clear it" >&2
  exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT"
REPORT=$OUT/report.md
START=$SECONDS
FAILED=()
emit() { printf '%s\n' "$@" | tee -a "$REPORT"; }

# section TITLE CAP_SECONDS NAME FUNCTION: runs FUNCTION (exported; markdown on stdout, logs on stderr) under
# a time-out of min(CAP, what is left of the budget); its markdown, or why it failed, goes into the report.
section() {
  local title=$1 cap=$2 name=$3 fn=$4 rc=0 t0=$SECONDS
  local left=$(( BUDGET - (SECONDS - START) ))
  emit "" "## $title" ""
  if [ "$left" -lt 15 ]; then
    emit "**SKIPPED**: the time budget ($BUDGET s) is spent"
    FAILED+=("$title (skipped)")
    return
  fi
  local t=$(( cap < left ? cap : left ))
  timeout --kill-after=15 "$t" bash -c "$fn" > "$OUT/$name.md" 2> "$OUT/$name.log" || rc=$?
  report_section "$title" "$name" "$rc" "$(( SECONDS - t0 ))" "$t"
}
report_section() {   # TITLE NAME RC SECONDS [TIMEOUT]
  local title=$1 name=$2 rc=$3 secs=$4 t=${5:-}
  tee -a "$REPORT" < "$OUT/$name.md"
  if [ "$rc" -eq 0 ]; then
    emit "" "_passed in $secs s_"
  else
    local why="exit status $rc"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && why="timed out after ${t:-?} s"
    emit "" "**FAILED** ($why, $secs s); last lines of $OUT/$name.log:" "" '```' "$(tail -n 15 "$OUT/$name.log")" '```'
    FAILED+=("$title")
  fi
}

sec_versions() {
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, subprocess, torch
def ver(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"
pin = [r for r in (md.requires("torch") or []) if r.split(";")[0].strip().startswith("triton")]
try:
    import transformer_engine as te
    te_v = te.__version__
except Exception as e:
    te_v = f"not importable ({type(e).__name__})"
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
except Exception as e:
    driver = f"? ({type(e).__name__})"
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as e:
    nccl = f"? ({type(e).__name__})"
gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
rows = [("GPU", ", ".join(f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)" for p in gpus)),
        ("NVIDIA driver", driver or "?"),
        ("Python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"),
        ("NCCL", nccl),
        ("triton", ver("triton")),
        ("torch's triton pin", "; ".join(pin) or "none declared"),
        ("megatron-core", ver("megatron-core")),
        ("DeepSpeed", ver("deepspeed")),
        ("mosaicml-streaming", ver("mosaicml-streaming")),
        ("Transformer Engine", te_v),
        ("kronecker-scale", ver("kronecker-scale"))]
print("| component | version |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
EOF
}

sec_kernels() {
  local log=$OUT/kernel-tests.txt rc=0
  env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider --timeout=300 \
    tests/test_kernels.py tests/test_kronecker_embedding.py > "$log" 2>&1 || rc=$?
  echo "\`pytest tests/test_kernels.py tests/test_kronecker_embedding.py\`: compiled kernels (TRITON_INTERPRET unset)"
  echo "against the fp64 reference; full output in $log"
  echo; echo '```'; grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|error)" "$log" | tail -n 25; echo '```'
  return $rc
}

sec_bench() { "$PY" tools/gpu_bench_point.py bench --json "$OUT/bench.json"; }
sec_large_probe() { "$PY" tools/gpu_bench_point.py large-probe --json "$OUT/large_probe.json"; }

export DATA=runs/data/corpus-tekken-2048          # the path configs/scale/1b-131k.yaml reads
sec_data() {
  local train=runs/data/corpus/train heldout=runs/data/corpus/heldout source="kscale demo-corpus"
  if ! "$K" demo-corpus --out runs/data/corpus >&2; then
    # a GPU node without the network (and no npm cache): the Python standard library's own sources
    # are real English-and-code text that is always there
    local stdlib; stdlib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    mkdir -p runs/data/stdlib-corpus/train runs/data/stdlib-corpus/heldout
    cp "$stdlib"/[a-m]*.py runs/data/stdlib-corpus/train/ && cp "$stdlib"/[t-z]*.py runs/data/stdlib-corpus/heldout/
    for f in runs/data/stdlib-corpus/*/*.py; do mv "$f" "${f%.py}.txt"; done
    train=runs/data/stdlib-corpus/train heldout=runs/data/stdlib-corpus/heldout source="the Python standard library (offline)"
  fi
  if [ ! -f "$DATA/manifest.json" ]; then
    "$K" prepare-data --tokenizer tekken --seq-len 2048 --out "$DATA" "$train" --val-input "$heldout" >&2 || return
  fi
  echo "$source + \`kscale prepare-data --tokenizer tekken --seq-len 2048\` -> $DATA ($(du -sh "$DATA" | cut -f1))"
}

# the 4-layer 1b-131k: one GPU, no TP/SP, 32 sequences of 2,048 tokens per step (8 micro-batches of 4);
# the LR schedule is fixed to 20 steps (decay_steps) so that 10 steps + a resume to 20 is one schedule
TRAIN_ARGS="configs/scale/1b-131k.yaml model.n_layers=4 parallel.nproc=1 parallel.tensor=1 parallel.pipeline=1 \
parallel.sequence=false parallel.distributed_optimizer=false data.micro_batch_size=4 data.global_batch_size=32 \
schedule.warmup_steps=2 schedule.decay_steps=20 checkpoint.keep_last=1 eval.every=10 eval.batches=2 \
logging.peak_tflops=989 logging.tensorboard=false run.device=cuda"
export TRAIN_ARGS
train() {   # ARM (kronecker|bpe) STEPS: to step 10 saving a checkpoint there, then on to 20 without saving
  local arm=$1 steps=$2 ckpt="checkpoint.every=10"
  [ "$steps" -gt 10 ] && ckpt="checkpoint.every=0 checkpoint.save_at_end=false"
  # shellcheck disable=SC2086
  "$K" train $TRAIN_ARGS $ckpt model.input_layer="$arm" run.name="accept-$arm" run.dir="$OUT/runs/$arm" \
    schedule.train_steps="$steps" >&2 || return
  [ "$steps" -gt 10 ] && rm -rf "$OUT/runs/$arm/checkpoints"     # several GB each; the report is what counts
  "$PY" - "$OUT/runs/$arm/metrics.jsonl" "$steps" "$arm" <<'EOF'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1]) if '"tokens_per_s"' in line]
r = recs[-1]
print(f"`kscale train ... model.input_layer={sys.argv[3]} schedule.train_steps={sys.argv[2]}`: at step {r['step']} "
      f"loss {r['loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s ({r['step_time']:.2f} s/step), "
      f"MFU {r.get('mfu', float('nan')):.1%}, {r.get('memory_gb', float('nan')):.1f} GiB")
sys.exit(0 if r["step"] == int(sys.argv[2]) else 1)
EOF
}
export -f train
sec_kron_10() { train kronecker 10; }
sec_kron_20() { train kronecker 20; }
sec_bpe_10() { train bpe 10; }
sec_bpe_20() { train bpe 20; }

sec_training_summary() {
  "$PY" - "$OUT/runs" "$OUT/train-kron-20.log" "$OUT/train-bpe-20.log" <<'EOF'
import json, statistics, sys
from pathlib import Path
runs, logs = Path(sys.argv[1]), {"kronecker": sys.argv[2], "bpe": sys.argv[3]}
out, ok = {}, True
print("median over steps 2-10 and 12-20 (the first step of each process compiles and warms up);")
print("MFU as the trainer logs it: 6 · parameters · tokens/s / 989 TFLOP/s (the BPE arm's parameters include its")
print("131,072 x 2,048 input table, which costs no matmul FLOPs: its MFU reads high).\n")
print("| arm | steps | resumed at 10 | final loss | val loss | tokens/s | MFU | max memory GiB |")
print("|---|---|---|---|---|---|---|---|")
for arm in ("kronecker", "bpe"):
    path = runs / arm / "metrics.jsonl"
    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    steps = {r["step"]: r for r in recs if "tokens_per_s" in r}
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    timed = [r for s, r in steps.items() if s not in (1, 11)]
    tps = statistics.median(r["tokens_per_s"] for r in timed) if timed else float("nan")
    mfu = statistics.median(r["mfu"] for r in timed if "mfu" in r) if any("mfu" in r for r in timed) else float("nan")
    mem = max((r.get("memory_gb", float("nan")) for r in steps.values()), default=float("nan"))
    log = Path(logs[arm]).read_text(errors="replace") if Path(logs[arm]).exists() else ""
    resumed = "resumed from" in log and "step 10" in log
    complete = sorted(steps) == list(range(1, 21))
    ok &= complete and resumed
    out[arm] = tps
    final = steps[max(steps)]["loss"] if steps else float("nan")
    print(f"| {arm} | {len(steps)}/20 | {'yes' if resumed else 'NO'} | {final:.4f} | "
          f"{vals[-1] if vals else float('nan'):.4f} | {tps:,.0f} | {mfu:.1%} | {mem:.1f} |")
ratio = out["kronecker"] / out["bpe"] if out.get("bpe") else float("nan")
print(f"\nKronecker / BPE throughput (tokens/s): **{ratio:.3f}**")
sys.exit(0 if ok else 1)
EOF
}
export -f sec_versions sec_kernels sec_bench sec_large_probe sec_data sec_kron_10 sec_kron_20 sec_bpe_10 \
  sec_bpe_20 sec_training_summary

emit "# GPU acceptance: kronecker-scale $(git rev-parse --short HEAD 2>/dev/null || echo '?')" "" \
     "$(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), \`bash scripts/gpu-acceptance.sh\`; logs in $OUT/"

# the data is CPU work: prepared in the background while the GPU runs sections 1-4
( t0=$SECONDS; rc=0; timeout --kill-after=15 300 bash -c sec_data > "$OUT/data.md" 2> "$OUT/data.log" || rc=$?
  echo "$rc $(( SECONDS - t0 ))" > "$OUT/data.rc" ) &
DATA_PID=$!

section "1. Versions" 60 versions sec_versions
section "2. Compiled kernels vs the fp64 reference" 180 kernels sec_kernels
section "3. Embedding benchmark point (bf16, d = 4,096, P = 32)" 90 bench sec_bench
section "4. N·d > 2^31 probe" 60 large_probe sec_large_probe

wait "$DATA_PID"
emit "" "## 5. Training: 4-layer 1b-131k, Kronecker and BPE, 10 steps + resume to 20" "" \
     "\`kscale train $TRAIN_ARGS model.input_layer=kronecker|bpe run.dir=$OUT/runs/ARM schedule.train_steps=10\`," \
     "then the same with \`schedule.train_steps=20\` (resumes from the step-10 checkpoint)." "" "### Data" ""
read -r data_rc data_s < "$OUT/data.rc" || { data_rc=1; data_s=0; }
report_section "5. data" data "$data_rc" "$data_s" 300
if [ "$data_rc" -eq 0 ]; then
  section "5a. Kronecker, steps 1-10" 120 train-kron-10 sec_kron_10
  section "5b. Kronecker, resume to step 20" 120 train-kron-20 sec_kron_20
  section "5c. BPE, steps 1-10" 120 train-bpe-10 sec_bpe_10
  section "5d. BPE, resume to step 20" 120 train-bpe-20 sec_bpe_20
  section "5e. Training summary" 30 training-summary sec_training_summary
else
  emit "" "training skipped: no data"
  FAILED+=("5. training (no data)")
fi

emit "" "---" ""
if [ ${#FAILED[@]} -eq 0 ]; then
  emit "**All sections passed** in $(( SECONDS - START )) s."
  exit 0
fi
emit "**${#FAILED[@]} section(s) failed or skipped** in $(( SECONDS - START )) s: $(IFS=';'; echo "${FAILED[*]}")"
exit 1
