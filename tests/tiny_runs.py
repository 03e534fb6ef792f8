"""Tiny trained checkpoints for the conversion and probe tests: real `kscale train` runs (gloo
processes, GPT-2's real vocabulary, real text), made once per pytest session and shared by the modules
that ask for them (kept under the session's base temporary directory)."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LICENSE = Path(sys.base_prefix) / "lib" / "python3.11" / "LICENSE.txt"

# the model shapes the exporter maps: GPT-2 style (the default) and Llama style
GPT2_STYLE = {}
LLAMA_STYLE = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False}


def kscale(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "kronecker_scale.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})


def real_text() -> str:
    return LICENSE.read_text()


def _dataset(base: Path) -> Path:
    from kronecker_scale.data import prepare_data
    from kronecker_scale.tokenizer.assets import tokenizer_path
    out = base / "data" / "ds"
    if (out / "manifest.json").is_file():
        return out
    (base / "data" / "in").mkdir(parents=True, exist_ok=True)
    (base / "data" / "in" / "python.txt").write_text(real_text())
    (base / "data" / "val.txt").write_text(real_text()[:8000])
    prepare_data(tokenizer_path("gpt2"), [base / "data" / "in"], out, 32, val_inputs=[base / "data" / "val.txt"],
                 workers=1)
    return out


def trained_run(base: Path, name: str, model: dict | None = None, steps: int = 20, every: int = 10,
                extra: list[str] = ()) -> Path:
    """The run directory of a tiny Kronecker model trained for `steps` steps (checkpoints every `every`)."""
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:          # xdist-safe: one writer per run
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = base / name
        if (run / "checkpoints" / "latest").is_file():
            return run
        data = _dataset(base)
        cfg = {"model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "seq_len": 32, "input_layer": "kronecker",
                         "head": "untied", "pos_dim": 16, **(model or {})},
               "tokenizer": {"path": "gpt2"},
               "data": {"train": [{"path": str(data)}], "micro_batch_size": 4, "global_batch_size": 4,
                        "cache_dir": str(base / "cache" / name)},
               "optim": {"lr": 3e-3, "min_lr": 3e-4},
               "schedule": {"train_steps": steps, "warmup_steps": 2},
               "checkpoint": {"every": every, "keep_last": 10}, "eval": {"every": 0},
               "logging": {"tensorboard": False, "every": every}, "run": {"dir": str(run), "name": name}}
        path = base / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = kscale("train", path, *extra)
        if r.returncode != 0:
            raise RuntimeError(f"training {name} failed:\n{r.stderr[-3000:]}")
        return run


def shared_base(tmp_path_factory) -> Path:
    """One folder per pytest session for the tiny runs, shared by every test module."""
    return tmp_path_factory.getbasetemp() / "tiny-runs"


# the runs the conversion and probe tests share
def gpt2_run(base: Path) -> Path:
    """GPT-2-shaped Kronecker model, untied head, TP=1: 40 steps, checkpoints at 20 and 40."""
    return trained_run(base, "gpt2", GPT2_STYLE, steps=40, every=20)


def llama_tp2_run(base: Path) -> Path:
    """Llama-shaped Kronecker model with the Kronecker-tied head, trained and saved at TP=2."""
    return trained_run(base, "llama_tp2", {**LLAMA_STYLE, "head": "kronecker_tied"}, steps=10, every=10,
                       extra=["parallel.nproc=2", "parallel.tensor=2"])


def bpe_run(base: Path) -> Path:
    """The BPE baseline with a tied table: 20 steps."""
    return trained_run(base, "bpe", {"input_layer": "bpe", "head": "tied"}, steps=20, every=10)


def hf_export(base: Path, run: Path) -> Path:
    """The run's latest checkpoint exported to transformers (once)."""
    from kronecker_scale.convert.to_hf import export_to_hf
    out = base / f"hf-{run.name}"
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            export_to_hf(run, out)
    return out
