#!/usr/bin/env bash
# Creates .venv in the repository root with everything kronecker-scale needs, installs the package
# (editable) and its `kscale` command, and fetches the real tokenizer files the tests use.
# Idempotent: a second run with unchanged requirements only re-checks (the GPU and) the tokenizer files.
#
# KSCALE_TARGET picks what is installed (default: cuda when `nvidia-smi -L` lists a GPU, else cpu):
#   cpu   torch==2.13.0+cpu from the CPU wheel + requirements/lock-cpu.txt; every pip call is pinned
#         against the CPU build (constraints-cpu.txt), so no CUDA build is ever pulled. CI and the README.
#   cuda  torch 2.13.0's CUDA build + requirements/lock-cuda.txt (tools/lock_cuda.py), every pip call
#         pinned with constraints-cuda.txt; then checks that torch sees a GPU (KSCALE_GPU_CHECK=0: only warn,
#         e.g. on a login node without GPUs).
#   ngc   inside an NVIDIA NGC PyTorch container: .venv sees the container's packages and keeps its torch,
#         triton and Transformer Engine (pinned to what is installed, from `pip list --format=freeze`);
#         the rest of lock-cuda.txt goes on top. KSCALE_PYTHON defaults to the container's python3.
# Switching a .venv to another target recreates it. Details: docs/setup.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TARGET=${KSCALE_TARGET:-}
if [ -z "$TARGET" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then TARGET=cuda; else TARGET=cpu; fi
fi
case "$TARGET" in
  cpu|cuda|ngc) ;;
  *) echo "error: KSCALE_TARGET=$TARGET is not a set-up target; use one of: cpu, cuda, ngc (docs/setup.md)" >&2
     exit 2 ;;
esac

PY=${KSCALE_PYTHON:-}
if [ "$TARGET" = ngc ]; then
  PY=${PY:-python3}
  if ! "$PY" -c 'import sys, torch; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: KSCALE_TARGET=ngc keeps the torch of an NGC PyTorch container, but '$PY' cannot import torch" \
         "(or is older than Python 3.11); run inside the container, or set KSCALE_PYTHON to its python" >&2
    exit 2
  fi
elif [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "error: Python 3.11 is required (the CPU torch wheel and the locks are cp311); set KSCALE_PYTHON=/path/to/python3.11" >&2
  exit 2
fi

case "$TARGET" in
  cpu)  C=requirements/constraints-cpu.txt
        stamp_key=$(cat $C requirements/lock-cpu.txt requirements/no-deps.txt pyproject.toml | sha256sum | cut -c1-16) ;;
  cuda) C=requirements/constraints-cuda.txt
        stamp_key=$( (echo cuda; cat $C requirements/lock-cuda.txt requirements/no-deps.txt pyproject.toml) | sha256sum | cut -c1-16) ;;
  ngc)  C=.venv/ngc-constraints.txt
        stamp_key=$( (echo ngc; "$PY" -c 'import sys, torch; print(sys.version, torch.__version__)' 2>/dev/null;
                      cat requirements/lock-cuda.txt requirements/no-deps.txt pyproject.toml) | sha256sum | cut -c1-16) ;;
esac
stamp=.venv/.kscale-setup-$stamp_key

if [ -d .venv ]; then
  made_for=$(cat .venv/.kscale-target 2>/dev/null || echo cpu)   # a .venv from before targets existed is a cpu one
  if [ "$made_for" != "$TARGET" ]; then
    echo "== kscale set-up: .venv was made for KSCALE_TARGET=$made_for; recreating it for $TARGET"
    rm -rf .venv
  fi
fi

if [ ! -f "$stamp" ]; then
  echo "== kscale set-up ($TARGET): creating .venv (a few minutes the first time)"
  pip_q() {  # quiet pip; drops this machine's harmless "find-links location is ignored" warnings
    { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1; } | { grep -v "is ignored: it is neither" || true; }
  }
  case "$TARGET" in
    cpu)
      [ -x .venv/bin/python ] || "$PY" -m venv .venv
      pip_q install torch==2.13.0 -c $C
      pip_q install -r requirements/lock-cpu.txt -c $C
      pip_q install --no-deps --ignore-requires-python -r requirements/no-deps.txt -c $C
      # PyPI's torchvision is a CUDA build that cannot load beside the CPU torch; streaming works without it
      pip_q uninstall -y torchvision >/dev/null 2>&1 || true
      pip_q install --no-deps -e . -c $C
      .venv/bin/python -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.endswith("+cpu") else f"expected the CPU torch, found {v}")'
      ;;
    cuda)
      [ -x .venv/bin/python ] || "$PY" -m venv .venv
      pip_q install -r requirements/lock-cuda.txt -c $C
      pip_q install --no-deps --ignore-requires-python -r requirements/no-deps.txt -c $C
      pip_q install --no-deps -e . -c $C
      .venv/bin/python -c 'import torch, sys; v = torch.__version__; sys.exit(0 if torch.version.cuda and "+cpu" not in v else f"expected torch'"'"'s CUDA build, found {v}")'
      ;;
    ngc)
      # the container's own PIP_CONSTRAINT (/etc/pip/constraint.txt, NGC >= 25.03) pins its whole system
      # environment and would refuse the lock; .venv is separate (the system stays as it is), and the
      # packages that matter are pinned below
      unset PIP_CONSTRAINT
      if [ ! -x .venv/bin/python ]; then   # without ensurepip in the container, the system's pip serves .venv
        "$PY" -m venv --system-site-packages .venv 2>/dev/null ||
          { rm -rf .venv; "$PY" -m venv --system-site-packages --without-pip .venv; }
      fi
      # the container's own stack, pinned to what is installed (pip list --format=freeze: always name==version)
      { echo "# the NGC container's torch, triton and Transformer Engine, kept as installed (scripts/setup.sh)"
        .venv/bin/python -m pip --disable-pip-version-check list --format=freeze 2>/dev/null |
          grep -i -E '^(torch|triton|pytorch[-_]triton|transformer[-_]engine[-_a-z0-9]*|flash[-_]attn|apex)==' || true
      } > $C
      grep -q -i '^torch==' $C || { echo "error: no torch found in the container's python ($PY)" >&2; exit 2; }
      # lock-cuda.txt without the CUDA stack (torch, triton, nvidia-*, cuda-*): the container brings its own
      grep -v -i -E '^(torch|triton|nvidia-[^=]*|cuda-[^=]*)==' requirements/lock-cuda.txt > .venv/ngc-requirements.txt
      pip_q install -r .venv/ngc-requirements.txt -c $C
      pip_q install --no-deps --ignore-requires-python -r requirements/no-deps.txt -c $C
      pip_q install --no-deps -e . -c $C
      ;;
  esac
  rm -f .venv/.kscale-setup-*
  echo "$TARGET" > .venv/.kscale-target
  touch "$stamp"
fi

if [ "$TARGET" != cpu ]; then
  # what the GPU stack looks like from this .venv, or what is missing (driver, CUDA build, devices)
  if ! .venv/bin/python - "$TARGET" <<'EOF'
import ctypes, os, shutil, subprocess, sys, warnings
import torch
target = sys.argv[1]
caught = []
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ok = torch.cuda.is_available()
    caught = [str(x.message).strip() for x in w]
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""
smi = shutil.which("nvidia-smi")
driver = run(smi, "--query-gpu=driver_version", "--format=csv,noheader").splitlines()[:1] if smi else []
driver_cuda = None
try:
    v = ctypes.c_int()
    if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0:
        driver_cuda = f"{v.value // 1000}.{v.value % 1000 // 10}"
except OSError:
    pass
try:
    import triton; tri = triton.__version__
except Exception as e:
    tri = f"not importable ({type(e).__name__})"
nccl = ".".join(map(str, torch.cuda.nccl.version())) if ok else "n/a"
print(f"== GPU check ({target}): torch {torch.__version__} (built for CUDA {torch.version.cuda}), triton {tri}, "
      f"NCCL {nccl}; driver {driver[0] if driver else 'not found'} (supports CUDA {driver_cuda or '?'})")
if ok:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"   cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    if target == "ngc":
        try:
            import transformer_engine as te; print(f"   Transformer Engine {te.__version__}")
        except Exception as e:
            print(f"   Transformer Engine: not importable ({type(e).__name__})")
    sys.exit(0)
why = []
NEED = "CUDA 13.x needs driver >= 580, CUDA 12.x >= 525; docs/setup.md"
if torch.version.cuda is None:
    why.append(f"this torch ({torch.__version__}) is a CPU build: " + (
        "use an NGC PyTorch container, whose torch is a CUDA build" if target == "ngc" else
        "remove .venv and run KSCALE_TARGET=cuda bash scripts/setup.sh again"))
if not smi and driver_cuda is None:
    why.append(f"no NVIDIA driver: neither nvidia-smi nor libcuda.so.1 is found (install one: {NEED})")
elif driver_cuda and torch.version.cuda and int(driver_cuda.split(".")[0]) < int(torch.version.cuda.split(".")[0]):
    why.append(f"the driver supports CUDA {driver_cuda} only, this torch is built for CUDA {torch.version.cuda}: "
               f"upgrade the driver ({NEED})")
vis = os.environ.get("CUDA_VISIBLE_DEVICES")
if vis is not None:
    why.append(f"CUDA_VISIBLE_DEVICES={vis!r} may hide the devices")
if smi and not run(smi, "-L"):
    why.append("nvidia-smi -L lists no GPU")
why += [f"torch says: {m}" for m in caught]
print("error: torch.cuda.is_available() is False; " + ("; ".join(why) or "torch gives no reason (check dmesg, the "
      "driver and /dev/nvidia*)"), file=sys.stderr)
sys.exit(1)
EOF
  then
    if [ "${KSCALE_GPU_CHECK:-1}" = 0 ]; then
      echo "warning: no usable GPU from this .venv (KSCALE_GPU_CHECK=0: continuing; fine on a login node)" >&2
    else
      echo "(set KSCALE_GPU_CHECK=0 to install without a GPU, e.g. on a cluster's login node)" >&2
      exit 1
    fi
  fi
fi
.venv/bin/kscale tokenizers --fetch --quiet
